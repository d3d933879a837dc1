"""A signed manifest that names a file outside its package is refused by `edgeopt verify` (issue 9).

The signature only proves who wrote the manifest; ``model_file: ../../../../etc/passwd`` would make a
loader read outside the package folder. The agent refused it already; verification now does too.
"""
from __future__ import annotations

import pytest

from edgeopt.sdk.errors import ExitCode
from edgeopt.sdk.package import (GoldenSpec, Manifest, SourceModel, TensorSpec, load_private_key,
                                 write_package)
from edgeopt.sdk.profile import load_profile


def crafted_package(path, private_key, model_file="model.onnx", golden_file=None):
    """A correctly signed package whose manifest names ``model_file`` (and optionally a golden file)."""
    golden = (GoldenSpec(file=golden_file, count=1, atol=1e-3, rtol=1e-3, min_cosine=0.99)
              if golden_file else None)
    manifest = Manifest(name="toy", version="1.0.0", profile=load_profile("cpu").to_dict(), runtime="onnxruntime",
                        runtime_version="x", device="CPUExecutionProvider", precision="fp32", model_file=model_file,
                        inputs=[TensorSpec(name="x", dtype="float32", shape=[1, 4])],
                        outputs=[TensorSpec(name="y", dtype="float32", shape=[1, 2])],
                        source_model=SourceModel(filename="toy.onnx", format="onnx", sha256="0" * 64),
                        golden=golden)
    write_package(path, manifest, {"model.onnx": b"fake-model-bytes", "golden.npz": b"g"}, private_key=private_key)
    return path


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("model_file, golden_file, key, name", [
    ("../../../../etc/passwd", None, "model_file", "../../../../etc/passwd"),
    ("/etc/passwd", None, "model_file", "/etc/passwd"),
    ("model.onnx", "../../golden.npz", "golden.file", "../../golden.npz"),
])
def test_verify_refuses_names_outside_the_package(cli, keypair, tmp_path, model_file, golden_file, key, name):
    pkg = crafted_package(tmp_path / "evil.eopkg", load_private_key(keypair[0]), model_file, golden_file)
    code, out, err = cli("verify", pkg, "--public-key", keypair[1])
    assert code == ExitCode.INPUT, (out, err)
    assert "OK" not in out
    assert _error_lines(err) == [
        f"error: {pkg}: manifest {key} {name!r} is not one of the package's files (golden.npz, model.onnx); refused "
        "(a manifest may only name files inside its own package)"]


def test_verify_accepts_the_same_package_with_a_safe_name(cli, keypair, tmp_path):
    pkg = crafted_package(tmp_path / "ok.eopkg", load_private_key(keypair[0]), "model.onnx", "golden.npz")
    code, out, err = cli("verify", pkg, "--public-key", keypair[1])
    assert code == ExitCode.OK, err
    assert f"{pkg}: OK" in out
