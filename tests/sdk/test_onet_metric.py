"""The task metric for the pretrained ONet (tests/assets/mtcnn_onet/onet_metric.py): it must see the failures
MTCNN's user would (a collapsed face score, a shifted box, misplaced landmarks), and score fp32 itself 1.0."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "assets" / "mtcnn_onet" / "onet_metric.py"
_spec = importlib.util.spec_from_file_location("onet_metric", _PATH)
onet_metric = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(onet_metric)


def _outputs(n: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    face = np.arange(n) % 2 == 0
    p = np.where(face, 0.95, 0.05)
    return [{"output0": rng.normal(0, 0.05, (1, 4)).astype(np.float32),
             "output1": rng.uniform(0.2, 0.8, (1, 10)).astype(np.float32),
             "output2": np.array([[1 - p[i], p[i]]], np.float32)} for i in range(n)]


def _edit(outputs: list[dict], name: str, fn) -> list[dict]:
    return [dict(o, **{name: fn(o[name].copy(), i)}) for i, o in enumerate(outputs)]


def test_fp32_against_itself_scores_one():
    ref = _outputs()
    assert onet_metric.agreement(ref, ref) == 1.0 and onet_metric.agreement_with_landmarks(ref, ref) == 1.0


def test_collapsed_face_scores_lose_every_face():
    ref = _outputs()
    collapsed = _edit(ref, "output2", lambda a, i: np.array([[1.0, 0.0]], np.float32))
    assert onet_metric.agreement(ref, collapsed) == 0.5  # the non-faces still agree


def test_a_shifted_box_fails_on_faces_only():
    ref = _outputs()
    shifted = _edit(ref, "output0", lambda a, i: a + np.float32(0.2))  # IoU of two unit boxes 0.2 apart: 0.47
    assert onet_metric.agreement(ref, shifted) == 0.5
    small = _edit(ref, "output0", lambda a, i: a + np.float32(0.02))
    assert onet_metric.agreement(ref, small) == 1.0
    assert onet_metric.box_iou(np.zeros((1, 4)), np.full((1, 4), 0.2))[0] == pytest.approx(0.64 / 1.36)


def test_landmarks_count_only_in_the_landmark_metric():
    ref = _outputs()
    moved = _edit(ref, "output1", lambda a, i: a + np.float32(0.1))  # every point 0.14 box sides away
    assert onet_metric.agreement(ref, moved) == 1.0
    assert onet_metric.agreement_with_landmarks(ref, moved) == 0.5
