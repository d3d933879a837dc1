"""Checks of the test-asset fixtures: each model loads in ONNX Runtime and gives finite outputs."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort


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
