"""Every error in the issue's Errors list, through the real `edgeopt` CLI: one clear line, a non-zero exit
code, and no file at the output path."""
from __future__ import annotations

import subprocess
import sys
import tarfile

import pytest

from edgeopt.sdk.errors import ExitCode


def _package(cli, model, out, *extra):
    return cli("package", model, "-o", out, "--no-sign", "--iterations", "5", *extra)


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_not_a_model(cli, not_a_model, tmp_path):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, not_a_model, out)
    assert code == ExitCode.INPUT and not out.exists()
    assert _one_error_line(err) == ("error: model.onnx is not an ONNX model (it does not parse as an ONNX protobuf) "
                                    "(pass an .onnx, OpenVINO .xml or .tflite file)")


def test_truncated_onnx(cli, truncated_onnx, tmp_path):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, truncated_onnx, out)
    assert code == ExitCode.INPUT and not out.exists()
    line = _one_error_line(err)
    assert line.startswith("error: digits_truncated.onnx: ONNX file is truncated or corrupt (")
    assert line.endswith("(export or download the model again)")


def test_external_data_outside_folder(cli, external_data_outside, tmp_path):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, external_data_outside, out)
    assert code == ExitCode.SECURITY and not out.exists()
    line = _one_error_line(err)
    assert line.startswith("error: model.onnx: external data '../outside.bin' of tensor ")
    assert line.endswith("points outside the model's folder; refused (move the data file next to the model and "
                         "re-save it with a relative location)")


def test_missing_model_file(cli, tmp_path):
    code, _, err = _package(cli, tmp_path / "nope.onnx", tmp_path / "o.eopkg")
    assert code == ExitCode.INPUT
    assert _one_error_line(err) == (f"error: model file {tmp_path / 'nope.onnx'} not found "
                                    "(pass an .onnx, OpenVINO .xml or .tflite file)")


def test_unknown_profile_suggests_nearest(cli, digits_model, tmp_path):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, digits_model, out, "--profile", "npuu")
    assert code == ExitCode.INPUT and not out.exists()
    assert _one_error_line(err) == "error: unknown profile 'npuu' (did you mean 'npu'?)"


def test_calibration_wrong_name(cli, digits_model, digits_calib_wrong_name, tmp_path):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, digits_model, out, "--calib", digits_calib_wrong_name)
    assert code == ExitCode.INPUT and not out.exists()
    assert _one_error_line(err) == (
        f"error: calibration file {digits_calib_wrong_name.name} has arrays ['input'], but the model's inputs are "
        "['images'] (missing ['images']) (unexpected ['input']) (key each array by the model input name "
        "(plus optional 'labels'))")


def test_calibration_wrong_shape(cli, digits_model, digits_calib_wrong_shape, tmp_path):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, digits_model, out, "--calib", digits_calib_wrong_shape)
    assert code == ExitCode.INPUT and not out.exists()
    assert _one_error_line(err) == ("error: calibration array 'images' has shape [16, 1, 28, 28], but the input "
                                    "needs [?,1,8,8] (dim 2: expected 8, found 28) (preprocess the samples to the "
                                    "model's input shape (samples along axis 0), or fix a dynamic dim with "
                                    "--input-shape)")


def test_dynamic_model_for_static_profile(cli, dynamic_model, digits_calib, tmp_path):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, dynamic_model["path"], out, "--profile", "npu", "--calib", digits_calib)
    assert code == ExitCode.UNSUPPORTED and not out.exists()
    assert _one_error_line(err) == (
        "error: profile 'npu' needs static shapes, but the model has dynamic dims: input 'images' [batch,1,8,8]: "
        "dim 0 (batch) (fix them with --input-shape images:1,1,8,8)")


@pytest.mark.parametrize("profile, runtime, message", [
    ("igpu", "openvino", "error: OpenVINO {ver} cannot convert op com.example.Frobnicate in frobnicate.onnx (choose a profile "
                         "with another runtime, or replace the op)"),
    ("gpu", "onnxruntime", None),
])
def test_op_the_runtime_cannot_run(cli, unsupported_op_model, tmp_path, profile, runtime, message):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, unsupported_op_model, out, "--profile", profile)
    assert code == ExitCode.UNSUPPORTED and not out.exists()
    line = _one_error_line(err)
    if runtime == "openvino":
        import openvino as ov

        assert line == message.format(ver=ov.get_version().split("-")[0])
    else:
        import onnxruntime as ort

        assert line.startswith(f"error: ONNX Runtime {ort.__version__} cannot run op com.example.Frobnicate in ")
        assert line.endswith("(choose a profile with another runtime, or replace the op)")


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == {blocked!r}:
            raise ImportError('blocked', name=name)
sys.meta_path.insert(0, Block())
from edgeopt.sdk.cli import main
main({argv!r})
"""


def test_missing_runtime_names_the_extra(digits_model, digits_calib, tmp_path):
    """openvino made unimportable in a fresh interpreter: the npu profile (OpenVINO only) names the extra."""
    out = tmp_path / "o.eopkg"
    argv = ["package", str(digits_model), "-p", "npu", "--input-shape", "images:1,1,8,8", "--calib",
            str(digits_calib), "--no-sign", "-o", str(out)]
    proc = subprocess.run([sys.executable, "-c", BLOCK.format(blocked="openvino", argv=argv)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == ExitCode.MISSING_DEPENDENCY, proc.stderr
    assert _one_error_line(proc.stderr) == ("error: runtime 'openvino' is not installed (openvino cannot be imported) "
                                            "(install it with: pip install 'edgeopt[sdk]')")
    assert not out.exists()


def test_int8_without_calibration_is_refused(cli, digits_model, tmp_path):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, digits_model, out)
    assert code == ExitCode.INPUT and not out.exists()
    assert _one_error_line(err).startswith("error: profile 'cpu' quantizes to int8, which needs calibration data, "
                                           "and none was given (pass --calib calib.npz")


def test_unsigned_needs_explicit_flag_and_conflicts(cli, digits_model, tmp_path, keypair):
    out = tmp_path / "o.eopkg"
    code, _, err = cli("package", digits_model, "-o", out)
    assert code == ExitCode.USAGE and not out.exists()
    assert "--sign-key KEY is required (create one with: edgeopt keygen --out keys/); pass --no-sign to write an " \
           "unsigned package on purpose" in err
    code, _, err = cli("package", digits_model, "-o", out, "--no-sign", "--sign-key", keypair[0])
    assert code == ExitCode.USAGE and "--sign-key and --no-sign cannot be used together" in err
    code, _, err = cli("package", digits_model, "-o", out, "--no-sign", "--weight-only", "--precision", "fp16")
    assert code == ExitCode.USAGE and "--weight-only and --precision fp16 cannot be used together" in err
    code, _, err = cli("package", digits_model, "-o", out, "--no-sign", "--accuracy-aware", "--precision", "fp32")
    assert code == ExitCode.USAGE and "--accuracy-aware and --precision fp32 cannot be used together" in err


def test_accuracy_miss_writes_nothing_and_names_layers(cli, tiny_model, tiny_calib, tmp_path):
    """A profile file with an impossible budget and int8 insisted on: it misses, the sensitive layers are named."""
    from edgeopt.sdk.profile import builtin_profile_paths

    strict = tmp_path / "strict.toml"
    strict.write_text(builtin_profile_paths()["cpu"].read_text().replace("min_cosine = 0.99", "min_cosine = 0.9999999")
                      .replace('name = "cpu"', 'name = "strict"'))
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, tiny_model, out, "--profile", strict, "--calib", tiny_calib, "--runtime", "onnxruntime",
                            "--task", "generic", "--precision", "int8")
    assert code == ExitCode.ACCURACY and not out.exists()
    line = _one_error_line(err)
    assert line.startswith("error: int8 on onnxruntime misses the accuracy budget of profile 'strict': cosine of "
                           "'logits' 0.")
    assert "< 0.9999999; most sensitive layers (generic metric gained when kept in float): " in line
    assert any(f"{layer} (" in line for layer in ("conv1", "conv2", "fc"))
    assert line.endswith("no package written (rerun with --accuracy-aware to keep the most sensitive layers in float, "
                         "or choose --precision fp16/fp32)")


def _digits_pkg(cli, digits_model, digits_calib, key, out):
    code, _, err = cli("package", digits_model, "-o", out, "--calib", digits_calib, "--sign-key", key,
                       "--runtime", "onnxruntime", "--iterations", "5")
    assert code == 0, err
    return out


def test_signature_by_another_key(cli, digits_model, digits_calib, keypair, tmp_path):
    from edgeopt.sdk.package import generate_keypair

    pkg = _digits_pkg(cli, digits_model, digits_calib, keypair[0], tmp_path / "d.eopkg")
    _, other_pub = generate_keypair(tmp_path / "other")
    code, _, err = cli("verify", pkg, "--public-key", other_pub)
    assert code == ExitCode.SECURITY
    assert _one_error_line(err).startswith("error: signature does not match any trusted key (signed by key ")
    code, out, _ = cli("verify", pkg, "--public-key", keypair[1])
    assert code == 0 and "OK" in out


def test_tampered_package_file(cli, digits_model, digits_calib, keypair, tmp_path):
    pkg = _digits_pkg(cli, digits_model, digits_calib, keypair[0], tmp_path / "d.eopkg")
    tampered = tmp_path / "t.eopkg"
    with tarfile.open(pkg) as src, tarfile.open(tampered, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "model.onnx":
                data = data[:-4] + b"\0\0\0\0"
            m.size = len(data)
            import io

            dst.addfile(m, io.BytesIO(data))
    for args in (("bench", tampered, "--iterations", "5"), ("verify", tampered, "--public-key", keypair[1])):
        code, _, err = cli(*args)
        assert code == ExitCode.SECURITY
        assert _one_error_line(err) == (f"error: {tampered}: model.onnx does not match its sha256 in the manifest "
                                        "(file was changed after signing)")


def test_runtime_override_must_belong_to_the_profile(cli, digits_model, digits_calib, tmp_path):
    out = tmp_path / "o.eopkg"
    code, _, err = _package(cli, digits_model, out, "--calib", digits_calib, "--runtime", "tflite")
    assert code == ExitCode.INPUT and not out.exists()
    assert _one_error_line(err) == ("error: runtime 'tflite' is not a runtime of profile 'cpu' (openvino, onnxruntime)"
                                    " (drop --runtime or choose another profile)")
