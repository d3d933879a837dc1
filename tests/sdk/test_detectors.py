"""Real pretrained detectors on real photos of people: judged by detections, not by an output cosine.

Two head styles: a YOLOv8n (Ultralytics export, one [1, 22, 2100] output, letterboxed input, metadata) and
MediaPipe's BlazeFace (TFLite, SSD anchors: regressors + classificators), quantized through OpenVINO's TFLite
frontend. Slow (quantization on 2 cores), run in CI.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeopt.sdk.errors import ExitCode
from edgeopt.sdk.package import PackageReader
from edgeopt.sdk.pipeline import PackageRequest, accuracy, prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def yolo_prepared(yolo_model, people_photos):
    """The YOLO model prepared once: letterboxed held-out photos, fp32 outputs, the detect evaluator."""
    req = PackageRequest(model=yolo_model, profile="cpu", heldout=people_photos["heldout"], precision="fp32")
    with prepare(req) as prep:
        yield prep


def _collapse_class_scores(model_path, out_path, factor: float):
    """The fp32 detector with its 18 class-score rows scaled by ``factor``: what a broken int8 head does."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    out = model.graph.output[0].name
    raw = out + "_raw"
    for node in model.graph.node:
        node.output[:] = [raw if o == out else o for o in node.output]
    scale = np.ones((1, 22, 1), np.float32)
    scale[0, 4:] = factor
    model.graph.initializer.append(numpy_helper.from_array(scale, "collapse_scale"))
    model.graph.node.append(helper.make_node("Mul", [raw, "collapse_scale"], [out], name="collapse"))
    onnx.save(model, str(out_path))
    return out_path


def test_collapsed_class_scores_refused_although_whole_output_cosine_is_high(yolo_prepared, tmp_path):
    """The issue's failure: box coordinates (0..320) dominate one output tensor, class scores (0..1) collapse
    under them. The gate (accuracy.compare with the model's evaluator) must refuse it."""
    from edgeopt.agent.runtimes import get_runtime

    prep = yolo_prepared
    assert prep.evaluator.task == "detect" and "YOLOv8" in prep.evaluator.describe()
    damaged = _collapse_class_scores(prep.reference, tmp_path / "damaged.onnx", 0.3)
    loaded = get_runtime("onnxruntime").load(damaged, device="CPUExecutionProvider")
    try:
        outs = [loaded.infer(feed) for feed in prep.heldout.samples]
    finally:
        loaded.close()
    report = accuracy.compare(prep.reference_outputs, outs, prep.profile.accuracy, None, prep.evaluator)
    assert report.min_cosine >= 0.99  # the old gate passed this
    assert not report.passed
    assert report.figures["optimized_detections"] < report.figures["fp32_detections"] / 2
    assert any(f.startswith("F1 vs fp32") for f in report.failures)
    # the fp32 model against itself: perfect
    same = accuracy.compare(prep.reference_outputs, prep.reference_outputs, prep.profile.accuracy, None,
                            prep.evaluator)
    assert same.passed and same.metric.optimized == pytest.approx(1.0)
    assert same.figures["fp32_detections"] >= 40  # the held-out photos hold real detections


def test_yolo_cpu_package_is_judged_by_detections(cli, yolo_model, people_photos, keypair, tmp_path):
    """Plain `--profile cpu`: whatever ships holds the detection budget (int8, or the float fallback that says
    why), and the manifest and `inspect` show the task, the metric and each output's figures."""
    out = tmp_path / "yolo.eopkg"
    code, stdout, err = cli("package", yolo_model, "-p", "cpu", "--calib", people_photos["calib"], "--heldout",
                            people_photos["heldout"], "--sign-key", keypair[0], "-o", out, "--iterations", "10",
                            "--json")
    assert code == 0, err
    s = json.loads(stdout)
    v = s["validation"]
    assert v["task"] == "detect" and v["passed"]
    assert v["metric"]["name"] == "mAP@0.5 vs fp32" and v["metric"]["optimized"] >= 0.95
    f1 = next(c for c in v["checks"] if c["name"].startswith("F1 vs fp32"))
    assert f1["optimized"] >= 0.9 and f1["rule"] == "min"
    assert [o["name"] for o in v["outputs"]] == ["output0"]
    assert any("letterboxed" in d for d in s["decisions"])
    assert any("fixed to [1, 3, 320, 320] from the model's metadata" in d for d in s["decisions"])
    int8 = [c for c in s["candidates"] if c["precision"] == "int8"]
    assert int8 and all(c["task"] == "detect" for c in int8)
    if s["precision"] != "int8":  # no int8 held the budget: float, and the output says why
        assert any(d.startswith("float fallback: no int8 configuration held the accuracy budget") for d in
                   s["decisions"])
    with PackageReader(out) as pkg:
        assert pkg.manifest.validation.task == "detect"
    code, text, err = cli("inspect", out)
    assert code == 0, err
    assert "task detect" in text and "mAP@0.5 vs fp32" in text and "output0" in text


def test_yolo_explicit_int8_that_misses_is_refused(cli, yolo_model, people_photos, keypair, tmp_path):
    """--precision int8 insists on int8: a miss is exit 6, one line naming the task metric, nothing written."""
    out = tmp_path / "yolo.eopkg"
    code, _, err = cli("package", yolo_model, "-p", "cpu", "--runtime", "onnxruntime", "--precision", "int8",
                       "--calib", people_photos["calib"], "--heldout", people_photos["heldout"],
                       "--sign-key", keypair[0], "-o", out, "--iterations", "5")
    assert code == ExitCode.ACCURACY and not out.exists()
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1
    assert "misses the accuracy budget of profile 'cpu': mAP@0.5 vs fp32 0." in lines[0]
    assert "most sensitive layers" in lines[0]


def test_blazeface_ssd_anchors_through_openvino(cli, tflite_model, face_photos, keypair, tmp_path):
    """A second head style: BlazeFace's anchor offsets + logits, decoded with MediaPipe's anchors; the .tflite is
    quantized by OpenVINO (cpu profile) and judged by its face detections."""
    out = tmp_path / "face.eopkg"
    code, stdout, err = cli("package", tflite_model, "-p", "cpu", "--calib", face_photos["calib"], "--heldout",
                            face_photos["heldout"], "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
                            "--sign-key", keypair[0], "-o", out, "--iterations", "10", "--accuracy-aware", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    v = s["validation"]
    assert v["task"] == "detect" and "SSD" in v["task_reason"] and v["passed"]
    assert v["figures"]["fp32_detections"] >= 20  # the crops hold faces, and fp32 finds them
    assert s["runtime"] == "openvino"
    assert any("SSD anchors generated for 896 boxes at 128x128" in n for n in v["notes"])


def test_yolo_accuracy_aware_onnxruntime_finds_the_output_quantizer(cli, yolo_model, people_photos, keypair,
                                                                    tmp_path):
    """ONNX Runtime's default int8 quantizes the output concat of boxes (0..320) and class scores (0..1) with
    one uint8 scale: the class scores collapse. Ranking quantizers by the detection metric finds it, and
    --accuracy-aware keeps a handful of activations in float instead of the whole model."""
    out = tmp_path / "yolo-aa.eopkg"
    code, stdout, err = cli("package", yolo_model, "-p", "cpu", "--runtime", "onnxruntime", "--accuracy-aware",
                            "--calib", people_photos["calib"], "--heldout", people_photos["heldout"],
                            "--sign-key", keypair[0], "-o", out, "--iterations", "10", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    aa = next(c for c in s["candidates"] if c["accuracy_aware"])
    assert aa["passed"] and aa["metric_value"] >= 0.95
    assert 1 <= len(aa["float_layers"]) <= 4, aa["float_layers"]
    assert "rank 31 groups of 8 activation quantizers by the detect metric" in err
