"""Shared fixtures. Test assets live in tests/assets; downloaded pretrained models are cached in .cache/.

Model fixtures (see tests/assets/README.md for licences, shapes and preprocessing) are defined in
tests/assets/fixtures.py and re-exported here so every test directory can use them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"



def _load_asset_fixtures():
    """Import tests/assets/fixtures.py by path (tests/ is not a package) and return its fixtures."""
    import importlib.util
    import sys

    name = "edgeopt_test_assets_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ASSETS / "fixtures.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    module = sys.modules[name]
    return {key: getattr(module, key) for key in module.__all__}


globals().update(_load_asset_fixtures())


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def keypair(tmp_path_factory):
    """An Ed25519 key pair written with the SDK's own keygen."""
    from edgeopt.sdk.package import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))
