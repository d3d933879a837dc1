"""Fixtures for the SDK tests: tiny generated ONNX models (fast unit tests) and a CLI runner."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """Conv-Relu-Conv-Relu-GAP-Gemm classifier, input ``input`` float32 [N,1,8,8], opset 17."""
    return tiny_models.tiny_cnn(tmp_path / "tiny.onnx")


@pytest.fixture
def tiny_calib(tmp_path, tiny_model) -> Path:
    return tiny_models.calib_npz(tmp_path / "tiny_calib.npz", n=40)


@pytest.fixture
def cli(capsys):
    """Run the real `edgeopt` CLI in-process: returns (exit code, stdout, stderr)."""
    from edgeopt.sdk.cli import cli as group, run_cli

    def run(*args: str):
        capsys.readouterr()
        code = run_cli(group, [str(a) for a in args], prog_name="edgeopt")
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
