"""Decode the common detection heads into boxes, scores and classes per image, and suppress overlaps.

Head formats (``--detect-format``, default ``auto``):

| format | outputs | what a row holds |
|---|---|---|
| ``yolov8`` | one ``[B, 4+C(+extra), N]`` | cx, cy, w, h, C class scores (Ultralytics v8/v11 raw export) |
| ``yolov8t`` | one ``[B, N, 4+C]`` | the same, transposed |
| ``yolov5`` | one ``[B, N, 5+C]`` | cx, cy, w, h, objectness, C class scores (score = obj x class) |
| ``nms`` | one ``[B, N, 6+]`` | x1, y1, x2, y2, score, class: already suppressed (end-to-end exports) |
| ``tuple`` | boxes ``[B, N, 4]``, scores ``[B, N]``, classes ``[B, N]``, optional count ``[B]`` | already suppressed |
| ``ssd`` | boxes ``[B, N, 4+]`` and scores ``[B, N, C]`` | corners, or offsets from anchors (BlazeFace) |

The choice, and whether scores need a sigmoid, is made once on the fp32 reference outputs and then applied
to both models, so the fp32 and the optimized model are always read the same way. Box coordinates only need
to be consistent between the two models (agreement is judged by IoU), except against COCO labels, which
are mapped into the model's input frame (see ``detect.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ...errors import InputError

FORMATS = ("auto", "yolov8", "yolov8t", "yolov5", "nms", "tuple", "ssd")
MAX_DETECTIONS = 300  # per image, after NMS (Ultralytics' default)
MAX_CANDIDATES = 30000  # per image, before NMS

# SSD anchor layouts of known models, by (input side, anchor count): [(stride, anchors per cell), ...].
# MediaPipe's SsdAnchorsCalculator merges layers of equal stride: BlazeFace short-range has strides
# 8, 16, 16, 16 with 2 anchors per layer (aspect 1.0 plus an interpolated scale) -> 2 + 6 per cell.
KNOWN_ANCHORS = {
    (128, 896): [(8, 2), (16, 6)],  # BlazeFace short range (MediaPipe face_detection_short_range)
    (192, 2304): [(4, 1)],  # BlazeFace full range
}

_BOX_NAMES = ("boxes", "bbox", "bboxes", "detection_boxes", "regressors", "loc", "box")
_SCORE_NAMES = ("scores", "score", "detection_scores", "classificators", "conf", "confidence", "logits")
_CLASS_NAMES = ("classes", "labels", "detection_classes", "class_ids", "class")
_COUNT_NAMES = ("num_detections", "count", "num", "num_dets", "valid")


@dataclass
class Detections:
    """One image's detections (xyxy boxes in the model's input frame or normalized, scores, class ids)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def above(self, conf: float) -> "Detections":
        keep = self.scores >= conf
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class Head:
    """How to read one model's detection outputs (decided on the fp32 outputs)."""

    format: str
    outputs: list[str]
    num_classes: int | None = None
    sigmoid: bool = False
    background: bool = False  # softmax scores with a background class at index 0 (ssd)
    anchors: np.ndarray | None = None  # [N, 4] cx, cy, w, h normalized (ssd with offsets)
    input_hw: tuple[int, int] | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def suppressed(self) -> bool:
        return self.format in ("nms", "tuple")


def _lower(name: str) -> str:
    return name.lower().replace("-", "_").replace(":", "_").replace("/", "_")


def _named(outputs: dict[str, np.ndarray], keys: tuple[str, ...], exclude: tuple = ()) -> str | None:
    for name in outputs:
        if name in exclude:
            continue
        low = _lower(name)
        if any(low == k or low.endswith("_" + k) or low.startswith(k) for k in keys):
            return name
    return None


def choose_head(reference: dict[str, np.ndarray], fmt: str, num_classes: int | None,
                input_hw: tuple[int, int] | None) -> Head:
    """Pick the head format from the fp32 outputs of one sample (and the model's class count, if known)."""
    if fmt not in FORMATS:
        raise InputError(f"--detect-format {fmt!r} is not one of {', '.join(FORMATS)}")
    shapes = {n: np.asarray(v).shape for n, v in reference.items()}
    names = list(reference)
    if fmt == "auto":
        fmt, reason = _guess(reference, shapes, num_classes)
    else:
        reason = f"--detect-format {fmt}"
    head = Head(fmt, names[:1], num_classes=num_classes, input_hw=input_hw, reason=reason)
    if fmt in ("yolov8", "yolov8t", "yolov5", "nms"):
        name = _single_3d(shapes)
        head.outputs = [name]
        rows = _rows(np.asarray(reference[name])[0], fmt)
        width = rows.shape[1]
        need = {"yolov8": 5, "yolov8t": 5, "yolov5": 6, "nms": 6}[fmt]
        if width < need:
            raise InputError(f"detection output {name!r} {list(shapes[name])} is too narrow for format {fmt} "
                             f"(rows of {width} values, at least {need} needed)",
                             hint="choose --detect-format, or --task generic")
        if fmt in ("yolov8", "yolov8t"):
            head.num_classes = num_classes if num_classes and 4 + num_classes <= width else width - 4
            scores = rows[:, 4:4 + head.num_classes]
        elif fmt == "yolov5":
            head.num_classes = num_classes if num_classes and 5 + num_classes <= width else width - 5
            scores = rows[:, 4:5 + head.num_classes]
        else:
            scores = rows[:, 4:5]
        head.sigmoid = bool(scores.size and (scores.min() < -1e-3 or scores.max() > 1 + 1e-3))
    elif fmt == "tuple":
        head.outputs = _tuple_outputs(reference, shapes)
    elif fmt == "ssd":
        boxes, scores = _ssd_outputs(reference, shapes)
        head.outputs = [boxes, scores]
        s = np.asarray(reference[scores])
        head.sigmoid = bool(s.min() < -1e-3 or s.max() > 1 + 1e-3)
        if not head.sigmoid and s.ndim == 3 and s.shape[-1] > 1 and np.allclose(s.sum(-1), 1.0, atol=1e-3):
            head.background = True
        b = np.asarray(reference[boxes])
        n = b.shape[1]
        corners = b.shape[-1] >= 4 and b[..., :4].min() >= -0.05 and b[..., :4].max() <= 1.05 and \
            np.all(b[..., 2] >= b[..., 0] - 1e-6) and np.all(b[..., 3] >= b[..., 1] - 1e-6)
        if not corners:
            side = input_hw[0] if input_hw and input_hw[0] == input_hw[1] else None
            layout = KNOWN_ANCHORS.get((side, n)) if side else None
            if layout is None:
                raise InputError(f"SSD output {boxes!r} {list(b.shape)} holds anchor offsets, and no anchor layout is "
                                 f"known for {n} anchors at input {input_hw}",
                                 hint="export the model with decoded boxes, or judge it with --task generic")
            head.anchors = ssd_anchors(side, layout)
            head.notes.append(f"SSD anchors generated for {n} boxes at {side}x{side} (strides "
                              f"{', '.join(str(s) for s, _ in layout)})")
        head.num_classes = (s.shape[-1] - (1 if head.background else 0)) if s.ndim == 3 else 1
    return head


def _guess(reference, shapes, num_classes) -> tuple[str, str]:
    if _named(reference, _BOX_NAMES) and _named(reference, _SCORE_NAMES):
        b, s = _named(reference, _BOX_NAMES), _named(reference, _SCORE_NAMES)
        if _named(reference, _CLASS_NAMES, (b, s)) or _named(reference, _COUNT_NAMES, (b, s)):
            return "tuple", f"outputs {b!r}, {s!r} and classes/count: already suppressed detections"
        return "ssd", (f"outputs {b!r} {list(shapes[b])} and {s!r} {list(shapes[s])}: SSD-style boxes + scores "
                       f"per anchor")
    three = [n for n, s in shapes.items() if len(s) == 3]
    if len(shapes) >= 2 and len(three) >= 2:
        b, s = _ssd_outputs(reference, shapes)
        return "ssd", (f"outputs {b!r} {list(shapes[b])} and {s!r} {list(shapes[s])}: SSD-style boxes + scores "
                       f"per anchor")
    if len(three) != 1:
        raise InputError(f"cannot tell how to read detections from outputs "
                         f"{ {n: list(s) for n, s in shapes.items()} }",
                         hint="pass --detect-format (yolov8, yolov5, nms, tuple, ssd) or --task generic")
    name = three[0]
    _, a, b = shapes[name]
    if a < b:  # channels first: [B, 4+C, N]
        return "yolov8", f"output {name!r} {list(shapes[name])}: YOLOv8-style rows (4 box + {a - 4} class scores)"
    rows = np.asarray(reference[name])[0]
    if b in (6, 7) and a <= 1000 and _integral(rows[:, 5]):
        return "nms", f"output {name!r} {list(shapes[name])}: already suppressed (x1, y1, x2, y2, score, class)"
    if num_classes and b == 4 + num_classes:
        return "yolov8t", f"output {name!r} {list(shapes[name])}: YOLOv8 rows, transposed"
    return "yolov5", f"output {name!r} {list(shapes[name])}: YOLOv5-style rows (4 box, objectness, {b - 5} classes)"


def _integral(col: np.ndarray) -> bool:
    return bool(col.size) and np.allclose(col, np.round(col)) and col.min() >= 0


def _single_3d(shapes) -> str:
    three = [n for n, s in shapes.items() if len(s) == 3]
    if not three:
        raise InputError(f"no 3-D detection output among {({n: list(s) for n, s in shapes.items()})}",
                         hint="pass --detect-format or --task generic")
    return three[0]


def _tuple_outputs(reference, shapes) -> list[str]:
    b, s = _named(reference, _BOX_NAMES), _named(reference, _SCORE_NAMES)
    if not b or not s:
        raise InputError(f"format tuple needs outputs named like boxes and scores; the model has {list(shapes)}")
    c, n = _named(reference, _CLASS_NAMES, (b, s)), _named(reference, _COUNT_NAMES, (b, s))
    return [b, s, c or "", n or ""]


def _ssd_outputs(reference, shapes) -> tuple[str, str]:
    b, s = _named(reference, _BOX_NAMES), _named(reference, _SCORE_NAMES)
    if b and s:
        return b, s
    three = sorted((n for n, sh in shapes.items() if len(sh) == 3), key=lambda n: -shapes[n][-1])
    if len(three) < 2 or shapes[three[0]][1] != shapes[three[1]][1]:
        raise InputError(f"format ssd needs boxes [B, N, 4+] and scores [B, N, C] with the same N; outputs are "
                         f"{ {n: list(sh) for n, sh in shapes.items()} }")
    boxes = next(n for n in three if shapes[n][-1] >= 4)
    scores = next(n for n in three if n != boxes)
    return boxes, scores


def ssd_anchors(side: int, layout: list[tuple[int, int]]) -> np.ndarray:
    """Anchor centres (normalized cx, cy; w = h = 1, MediaPipe's fixed anchor size) for a square input."""
    rows = []
    for stride, per_cell in layout:
        grid = math.ceil(side / stride)
        ys, xs = np.meshgrid((np.arange(grid) + 0.5) / grid, (np.arange(grid) + 0.5) / grid, indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        rows.append(np.repeat(centres, per_cell, axis=0))
    cxy = np.concatenate(rows, axis=0)
    return np.concatenate([cxy, np.ones_like(cxy)], axis=1).astype(np.float64)


def _rows(arr: np.ndarray, fmt: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    return arr.T if fmt == "yolov8" else arr


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -100, 100)))


def _cxcywh(b: np.ndarray) -> np.ndarray:
    return np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


def decode(head: Head, outputs: dict[str, np.ndarray], floor: float, nms_iou: float) -> list[Detections]:
    """Every image's detections with score >= ``floor``, after NMS (unless the model already suppressed)."""
    first = np.asarray(outputs[head.outputs[0]])
    images = []
    for i in range(first.shape[0]):
        dets = _decode_one(head, outputs, i)
        dets = dets.above(floor)
        if not head.suppressed:
            dets = nms(dets, nms_iou)
        images.append(dets)
    return images


def _decode_one(head: Head, outputs: dict, i: int) -> Detections:
    fmt = head.format
    if fmt in ("yolov8", "yolov8t", "yolov5"):
        rows = _rows(np.asarray(outputs[head.outputs[0]])[i], fmt)
        if fmt == "yolov5":
            obj = rows[:, 4:5]
            cls = rows[:, 5:5 + head.num_classes]
            if head.sigmoid:
                obj, cls = _sigmoid(obj), _sigmoid(cls)
            cls = cls * obj
        else:
            cls = rows[:, 4:4 + head.num_classes]
            if head.sigmoid:
                cls = _sigmoid(cls)
        classes = cls.argmax(1)
        scores = cls[np.arange(len(cls)), classes]
        return Detections(_cxcywh(rows[:, :4]), scores, classes)
    if fmt == "nms":
        rows = np.asarray(outputs[head.outputs[0]], dtype=np.float64)[i]
        scores = _sigmoid(rows[:, 4]) if head.sigmoid else rows[:, 4]
        return Detections(rows[:, :4], scores, np.round(rows[:, 5]).astype(np.int64))
    if fmt == "tuple":
        b_name, s_name, c_name, n_name = head.outputs
        boxes = np.asarray(outputs[b_name], dtype=np.float64)[i].reshape(-1, 4)
        scores = np.asarray(outputs[s_name], dtype=np.float64)[i]
        if scores.ndim == 2:  # per-class scores
            classes = scores.argmax(1)
            scores = scores[np.arange(len(scores)), classes]
        else:
            classes = (np.round(np.asarray(outputs[c_name])[i]).astype(np.int64).reshape(-1) if c_name
                       else np.zeros(len(scores), np.int64))
        if n_name:
            count = int(np.asarray(outputs[n_name]).reshape(-1)[i])
            boxes, scores, classes = boxes[:count], scores[:count], classes[:count]
        return Detections(boxes, scores.reshape(-1), classes)
    # ssd
    b_name, s_name = head.outputs
    raw = np.asarray(outputs[b_name], dtype=np.float64)[i]
    s = np.asarray(outputs[s_name], dtype=np.float64)[i]
    s = s.reshape(len(s), -1)
    if head.sigmoid:
        s = _sigmoid(s)
    if head.background:
        s = s[:, 1:]
    classes = s.argmax(1)
    scores = s[np.arange(len(s)), classes]
    if head.anchors is not None:
        side = float(head.input_hw[0])
        a = head.anchors
        cx = raw[:, 0] / side * a[:, 2] + a[:, 0]
        cy = raw[:, 1] / side * a[:, 3] + a[:, 1]
        w = raw[:, 2] / side * a[:, 2]
        h = raw[:, 3] / side * a[:, 3]
        boxes = _cxcywh(np.stack([cx, cy, w, h], 1))
    else:
        boxes = raw[:, :4]
    return Detections(boxes, scores, classes)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a [N, 4] and b [M, 4]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(dets: Detections, iou: float) -> Detections:
    """Greedy per-class NMS (classes offset apart, as Ultralytics and torchvision's batched_nms do)."""
    if len(dets) == 0:
        return dets
    order = np.argsort(-dets.scores, kind="stable")[:MAX_CANDIDATES]
    boxes, scores, classes = dets.boxes[order], dets.scores[order], dets.classes[order]
    span = float(np.max(np.abs(boxes))) + 1.0
    shifted = boxes + (classes.astype(np.float64) * span * 2)[:, None]
    keep = []
    alive = np.ones(len(order), bool)
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        if len(keep) >= MAX_DETECTIONS:
            break
        rest = np.nonzero(alive[i + 1:])[0] + i + 1
        if len(rest):
            ious = box_iou(shifted[i:i + 1], shifted[rest])[0]
            alive[rest[ious > iou]] = False
    keep = np.asarray(keep, dtype=np.int64)
    return Detections(boxes[keep], scores[keep], classes[keep])
