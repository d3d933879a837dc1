"""Pytest fixtures for the project's test models and inputs (re-exported by tests/conftest.py).

Every fixture returns plain paths (``pathlib.Path``) or dicts of paths so tests can hand them to
the CLI exactly as a user would. See tests/assets/README.md for what each model is.
"""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".cache"
DIGITS = HERE / "digits"

__all__ = [
    "digits_model", "digits_calib", "digits_heldout", "digits_metrics",
]


@pytest.fixture(scope="session")
def digits_model() -> Path:
    """Committed digits CNN: input ``images`` float32 [batch,1,8,8] (pixel/16), output ``logits`` [batch,10]."""
    return DIGITS / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def digits_calib() -> Path:
    """Calibration ``.npz``: key ``images`` float32 [300,1,8,8], drawn from the train split."""
    return DIGITS / "digits_calib.npz"


@pytest.fixture(scope="session")
def digits_heldout() -> Path:
    """Held-out ``.npz``: ``images`` float32 [450,1,8,8] and ``labels`` int64 [450]; never trained on."""
    return DIGITS / "digits_heldout.npz"


@pytest.fixture(scope="session")
def digits_metrics() -> dict:
    """Recorded fp32 figures of the committed digits model (``fp32_heldout_accuracy`` etc.)."""
    import json

    return json.loads((DIGITS / "digits_metrics.json").read_text())
