"""Shared fixtures. Test assets live in tests/assets; downloaded pretrained models are cached in .cache/."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def keypair(tmp_path_factory):
    """An Ed25519 key pair written with the SDK's own keygen."""
    from edgeopt.sdk.package import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))
