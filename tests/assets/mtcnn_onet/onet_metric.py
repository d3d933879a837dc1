"""ONet's task, as a ``--metric`` for ``edgeopt package`` / ``edgeopt compare`` (issue 11).

ONet is MTCNN's last stage: for a 48x48 proposal it says face or not (``output2``, softmax over [not face,
face]; MTCNN keeps a proposal at face probability >= 0.7) and, for a face, refines the box (``output0``, four
offsets in units of the proposal's side) and places five landmarks (``output1``: five x then five y, in units
of the box). A per-sample cosine of the 4-value box offsets is the wrong judge (on a non-face crop they are
small meaningless numbers whose direction flips at the slightest change), so the generic gate refused every
candidate. These metrics are what MTCNN's user sees; fp32 against itself scores 1.0 in each:

``agreement``: the share of held-out proposals on which the optimized model keeps or rejects as fp32 does and,
on the proposals fp32 keeps, refines the box to one overlapping fp32's by IoU >= :data:`BOX_IOU`.
``agreement_with_landmarks``: the same, and the five landmarks within :data:`LANDMARK_TOL` of fp32's (mean
point distance, in units of the box side: 0.05 is 2.4 px on the 48 px crop).

    edgeopt compare mtcnn_onet.py:build --weights onet.pt --metric onet_metric:agreement --max-metric-drop 0.1 ...
"""
from __future__ import annotations

import numpy as np

THRESHOLD = 0.7  # facenet-pytorch's ONet threshold (MTCNN thresholds [0.6, 0.7, 0.7])
BOX_IOU = 0.7
LANDMARK_TOL = 0.05


def _stack(outputs: list[dict], name: str) -> np.ndarray:
    return np.concatenate([np.asarray(o[name], dtype=np.float64).reshape(len(o[name]), -1) for o in outputs])


def box_iou(ref_offsets: np.ndarray, opt_offsets: np.ndarray) -> np.ndarray:
    """IoU of the boxes two sets of offsets [N, 4] make of the same unit proposal [0, 0, 1, 1]."""
    def boxes(o):
        return np.stack([o[:, 0], o[:, 1], 1 + o[:, 2], 1 + o[:, 3]], axis=1)

    a, b = boxes(ref_offsets), boxes(opt_offsets)
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    area = (lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None))
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def _kept_and_same(reference: list[dict], optimized: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    ref_face = _stack(reference, "output2")[:, 1] >= THRESHOLD
    opt_face = _stack(optimized, "output2")[:, 1] >= THRESHOLD
    same = (ref_face == opt_face) & (~ref_face | (box_iou(_stack(reference, "output0"),
                                                           _stack(optimized, "output0")) >= BOX_IOU))
    return ref_face, same


def agreement(reference: list[dict], optimized: list[dict], labels=None) -> float:
    """Share of proposals kept/rejected as fp32 does, with the box at IoU >= BOX_IOU on the kept ones."""
    _, same = _kept_and_same(reference, optimized)
    return float(same.mean()) if len(same) else 0.0


def agreement_with_landmarks(reference: list[dict], optimized: list[dict], labels=None) -> float:
    """:func:`agreement`, and on the kept proposals the landmarks within LANDMARK_TOL (mean point distance)."""
    ref_face, same = _kept_and_same(reference, optimized)
    ref, opt = _stack(reference, "output1"), _stack(optimized, "output1")
    dist = np.sqrt((ref[:, :5] - opt[:, :5]) ** 2 + (ref[:, 5:] - opt[:, 5:]) ** 2).mean(axis=1)
    same &= ~ref_face | (dist <= LANDMARK_TOL)
    return float(same.mean()) if len(same) else 0.0
