"""The detect task's pieces one at a time: head choice, decoding, NMS, IoU, PRF, COCO mAP edges, labels (issue 15).

Boxes, scores and classes are built by hand (a few rows each) so every expected value is exact; the real
detectors are in test_detectors.py. The whole file takes about a second.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeopt.sdk.errors import InputError
from edgeopt.sdk.pipeline.tasks import ModelInfo, TaskOptions
from edgeopt.sdk.pipeline.tasks import detect, detect_heads as dh
from edgeopt.sdk.pipeline.tasks.detect import DetectEvaluator, _input_hw, _mean, coco_labels, coco_map, prf
from edgeopt.sdk.pipeline.tasks.detect_heads import Detections, Head, box_iou, choose_head, decode, nms
from edgeopt.sdk.profile import AccuracyBudget

BUDGET = AccuracyBudget()


def _dets(boxes, scores, classes):
    return Detections(np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores, float), np.asarray(classes, np.int64))


# ------------------------------------------------------------------ constants, Detections, IoU, NMS


def test_constants():
    assert (dh.MAX_DETECTIONS, dh.MAX_CANDIDATES) == (300, 30000)
    assert dh.FORMATS == ("auto", "yolov8", "yolov8t", "yolov5", "nms", "tuple", "ssd")
    assert dh.KNOWN_ANCHORS == {(128, 896): [(8, 2), (16, 6)], (192, 2304): [(4, 1)]}
    assert (detect.PRED_FLOOR, detect.MAX_LABEL_BYTES) == (0.001, 64 * 1024 * 1024)


def test_detections_above_is_inclusive():
    d = _dets([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3]], [0.2, 0.25, 0.3], [0, 1, 2])
    kept = d.above(0.25)
    assert len(kept) == 2 and list(kept.classes) == [1, 2] and kept.boxes[0, 2] == 2.0
    assert len(d) == 3


def test_box_iou_exact():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1.0, 2.0]])
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 1.0, 0.0, 0.5]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4) and box_iou(a, np.zeros((0, 4))).shape == (1, 0)
    # degenerate boxes (zero or negative size) have no area: IoU 0, never NaN
    flat = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0]])
    np.testing.assert_array_equal(box_iou(flat, flat), np.zeros((2, 2)))
    # an inverted box does not count negative area against a normal one
    np.testing.assert_allclose(box_iou(np.array([[2.0, 2.0, 0.0, 0.0]]), a), [[0.0]])


def test_nms_per_class_threshold_and_order():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 5], [0, 0, 10, 10], [20, 20, 30, 30]]
    d = _dets(boxes, [0.9, 0.8, 0.7, 0.6, 0.95], [0, 0, 0, 1, 0])
    kept = nms(d, 0.5)
    # 0.8's box overlaps 0.9's at IoU 0.9: gone; 0.7's at 0.5: kept (only > iou suppresses); class 1 apart
    assert list(kept.scores) == [0.95, 0.9, 0.7, 0.6] and list(kept.classes) == [0, 0, 0, 1]
    assert list(nms(d, 0.49).scores) == [0.95, 0.9, 0.6]
    assert len(nms(_dets([], [], []), 0.5)) == 0
    # equal scores keep their order (stable)
    tie = nms(_dets([[0, 0, 1, 1], [5, 5, 6, 6]], [0.5, 0.5], [3, 4]), 0.5)
    assert list(tie.classes) == [3, 4]


def test_nms_keeps_at_most_max_detections(monkeypatch):
    monkeypatch.setattr(dh, "MAX_DETECTIONS", 2)
    d = _dets([[i * 10, 0, i * 10 + 5, 5] for i in range(4)], [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0])
    assert list(nms(d, 0.5).scores) == [0.9, 0.8]
    monkeypatch.setattr(dh, "MAX_DETECTIONS", 300)
    monkeypatch.setattr(dh, "MAX_CANDIDATES", 3)
    assert list(nms(d, 0.5).scores) == [0.9, 0.8, 0.7]


def test_nms_classes_never_suppress_each_other_even_far_out():
    # the class offset is twice the largest coordinate: boxes of two classes never overlap after it
    d = _dets([[-100, -100, 0, 0], [-100, -100, 0, 0], [0, 0, 100, 100]], [0.9, 0.8, 0.7], [0, 1, 2])
    assert len(nms(d, 0.1)) == 3


def test_sigmoid_and_cxcywh():
    np.testing.assert_allclose(dh._sigmoid(np.array([0.0, 1000.0, -1000.0])), [0.5, 1.0, 0.0], atol=1e-40)
    assert dh._sigmoid(np.array([-100.0]))[0] == pytest.approx(1 / (1 + np.exp(100.0)))
    assert dh._sigmoid(np.array([-200.0]))[0] == dh._sigmoid(np.array([-100.0]))[0]  # clipped
    np.testing.assert_array_equal(dh._cxcywh(np.array([[10.0, 20.0, 4.0, 6.0]])), [[8.0, 17.0, 12.0, 23.0]])


def test_ssd_anchors_layout():
    a = dh.ssd_anchors(16, [(8, 2)])
    assert a.shape == (8, 4) and a.dtype == np.float64
    np.testing.assert_allclose(a[:, :2], [[0.25, 0.25]] * 2 + [[0.75, 0.25]] * 2 + [[0.25, 0.75]] * 2 +
                               [[0.75, 0.75]] * 2)
    np.testing.assert_array_equal(a[:, 2:], np.ones((8, 2)))
    assert dh.ssd_anchors(17, [(8, 1)]).shape == (9, 4)  # ceil(17 / 8) = 3 cells a side
    assert dh.ssd_anchors(128, [(8, 2), (16, 6)]).shape == (16 * 16 * 2 + 8 * 8 * 6, 4)


# ------------------------------------------------------------------ naming and format choice


def test_named_matches():
    outs = {"Model/Detection-Boxes": 0, "raw_scores": 0, "scores_2": 0, "class": 0}
    assert dh._lower("A-b:c/D") == "a_b_c_d"
    assert dh._named(outs, ("boxes",)) == "Model/Detection-Boxes"  # ends with _boxes
    assert dh._named(outs, ("scores",)) == "raw_scores"
    assert dh._named(outs, ("scores",), ("raw_scores",)) == "scores_2"  # starts with
    assert dh._named(outs, ("class",)) == "class"
    assert dh._named(outs, ("conf",)) is None
    assert dh._named({"subscores": 0}, ("scores",)) is None  # neither equal, _suffix nor prefix


def test_integral():
    assert dh._integral(np.array([0.0, 1.0, 3.0]))
    assert not dh._integral(np.array([0.0, 1.5]))
    assert not dh._integral(np.array([-1.0, 1.0]))
    assert not dh._integral(np.array([]))


def _v8(n=120, nc=3, scale=1.0):
    out = np.zeros((1, 4 + nc, n))
    out[0, :4] = 50.0
    out[0, 4:] = 0.5 * scale
    return out


def test_choose_head_yolo_family_reasons_and_classes():
    head = choose_head({"o": _v8()}, "auto", None, (320, 320))
    assert (head.format, head.outputs, head.num_classes, head.sigmoid) == ("yolov8", ["o"], 3, False)
    assert head.reason == "output 'o' [1, 7, 120]: YOLOv8-style rows (4 box + 3 class scores)"
    assert head.input_hw == (320, 320) and not head.suppressed
    # class count from metadata when it fits, else from the width; extra columns (masks) ignored
    assert choose_head({"o": _v8(nc=5)}, "auto", 3, None).num_classes == 3
    assert choose_head({"o": _v8(nc=5)}, "auto", 6, None).num_classes == 5
    assert choose_head({"o": _v8(nc=5)}, "auto", 5, None).num_classes == 5
    # logits need a sigmoid; scores within [-1e-3, 1 + 1e-3] do not
    assert choose_head({"o": _v8(scale=2.004)}, "auto", None, None).sigmoid
    assert not choose_head({"o": _v8(scale=2.0 + 1e-3)}, "auto", None, None).sigmoid
    neg = _v8()
    neg[0, 4, 0] = -2e-3
    assert choose_head({"o": neg}, "auto", None, None).sigmoid
    neg[0, 4, 0] = -1e-3
    assert not choose_head({"o": neg}, "auto", None, None).sigmoid
    t = choose_head({"o": np.transpose(_v8(), (0, 2, 1))}, "auto", 3, None)
    assert (t.format, t.reason) == ("yolov8t", "output 'o' [1, 120, 7]: YOLOv8 rows, transposed")
    v5 = choose_head({"o": np.transpose(_v8(), (0, 2, 1))}, "auto", None, None)
    assert (v5.format, v5.num_classes) == ("yolov5", 2)
    assert v5.reason == "output 'o' [1, 120, 7]: YOLOv5-style rows (4 box, objectness, 2 classes)"
    assert choose_head({"o": np.transpose(_v8(), (0, 2, 1))}, "yolov5", 2, None).num_classes == 2
    assert choose_head({"o": np.transpose(_v8(), (0, 2, 1))}, "yolov5", 3, None).num_classes == 2


def test_choose_head_nms_format_and_forced_formats():
    rows = np.zeros((1, 100, 6))
    rows[0, :, 4] = 0.5
    rows[0, :, 5] = 2.0
    head = choose_head({"d": rows}, "auto", None, None)
    assert head.format == "nms" and head.suppressed and head.num_classes is None
    assert head.reason == "output 'd' [1, 100, 6]: already suppressed (x1, y1, x2, y2, score, class)"
    assert choose_head({"d": np.concatenate([rows, rows[:, :, :1]], 2)}, "auto", None, None).format == "nms"
    assert choose_head({"d": np.zeros((1, 1001, 6))}, "auto", None, None).format == "yolov5"  # too many rows
    assert choose_head({"d": np.zeros((1, 1000, 6))}, "auto", None, None).format == "nms"
    frac = rows.copy()
    frac[0, 0, 5] = 0.5
    assert choose_head({"d": frac}, "auto", None, None).format == "yolov5"
    forced = choose_head({"d": rows}, "nms", None, None)
    assert forced.reason == "--detect-format nms"
    with pytest.raises(InputError) as e:
        choose_head({"d": np.zeros((1, 100, 5))}, "yolov5", None, None)
    assert e.value.message == ("detection output 'd' [1, 100, 5] is too narrow for format yolov5 (rows of 5 values, "
                               "at least 6 needed)")
    assert e.value.hint == "choose --detect-format, or --task generic"
    assert choose_head({"d": np.zeros((1, 100, 5))}, "yolov8t", None, None).num_classes == 1
    with pytest.raises(InputError, match="rows of 4 values, at least 5 needed"):
        choose_head({"d": np.zeros((1, 100, 4))}, "yolov8t", None, None)
    with pytest.raises(InputError) as e:
        choose_head({"d": rows}, "yolo", None, None)
    assert e.value.message == "--detect-format 'yolo' is not one of auto, yolov8, yolov8t, yolov5, nms, tuple, ssd"
    with pytest.raises(InputError) as e:
        choose_head({"d": np.zeros((1, 6))}, "nms", None, None)
    assert e.value.message == "no 3-D detection output among {'d': [1, 6]}"
    assert e.value.hint == "pass --detect-format or --task generic"


def test_guess_errors_and_tuple_and_ssd_reasons():
    with pytest.raises(InputError) as e:
        choose_head({"a": np.zeros((1, 4))}, "auto", None, None)
    assert e.value.message == "cannot tell how to read detections from outputs {'a': [1, 4]}"
    assert e.value.hint == "pass --detect-format (yolov8, yolov5, nms, tuple, ssd) or --task generic"
    tup = {"boxes": np.zeros((1, 5, 4)), "scores": np.zeros((1, 5)), "num_detections": np.array([0])}
    head = choose_head(tup, "auto", None, None)
    assert head.format == "tuple" and head.outputs == ["boxes", "scores", "", "num_detections"]
    assert head.reason == "outputs 'boxes', 'scores' and classes/count: already suppressed detections"
    ssd = {"loc": np.full((1, 200, 4), 0.5), "conf": np.full((1, 200, 2), 0.5)}
    head = choose_head(ssd, "auto", None, None)
    assert head.format == "ssd" and head.outputs == ["loc", "conf"]
    assert head.reason == "outputs 'loc' [1, 200, 4] and 'conf' [1, 200, 2]: SSD-style boxes + scores per anchor"
    unnamed = {"x": np.full((1, 200, 2), 0.5), "y": np.full((1, 200, 4), 0.5)}
    head = choose_head(unnamed, "auto", None, None)
    assert head.format == "ssd" and head.outputs == ["y", "x"]
    assert head.reason == "outputs 'y' [1, 200, 4] and 'x' [1, 200, 2]: SSD-style boxes + scores per anchor"
    with pytest.raises(InputError) as e:
        choose_head({"x": np.zeros((1, 200, 2)), "y": np.zeros((1, 100, 4))}, "auto", None, None)
    assert e.value.message == ("format ssd needs boxes [B, N, 4+] and scores [B, N, C] with the same N; outputs are "
                               "{'x': [1, 200, 2], 'y': [1, 100, 4]}")
    with pytest.raises(InputError) as e:
        choose_head({"x": np.zeros((1, 200, 2))}, "tuple", None, None)
    assert e.value.message == "format tuple needs outputs named like boxes and scores; the model has ['x']"


def test_ssd_head_scores_background_and_anchors():
    boxes = np.tile(np.array([0.1, 0.1, 0.5, 0.5]), (1, 200, 1))
    soft = np.tile(np.array([0.7, 0.2, 0.1]), (1, 200, 1))
    head = choose_head({"boxes": boxes, "scores": soft}, "ssd", None, None)
    assert head.background and not head.sigmoid and head.num_classes == 2 and head.anchors is None
    nosum = np.tile(np.array([0.7, 0.2, 0.2]), (1, 200, 1))
    head = choose_head({"boxes": boxes, "scores": nosum}, "ssd", None, None)
    assert not head.background and head.num_classes == 3
    head = choose_head({"boxes": boxes, "scores": soft * 3}, "ssd", None, None)
    assert head.sigmoid and not head.background
    head = choose_head({"boxes": boxes, "scores": np.full((1, 200), 0.5)}, "ssd", None, None)
    assert head.num_classes == 1 and not head.background
    one = np.ones((1, 200, 1))  # a single softmax column sums to 1 but is not a background layout
    assert not choose_head({"boxes": boxes, "scores": one}, "ssd", None, None).background
    # corners just inside the tolerance are corners; offsets need a known anchor layout
    edge = boxes.copy()
    edge[0, 0] = [-0.05, -0.05, 1.05, 1.05]
    assert choose_head({"boxes": edge, "scores": soft}, "ssd", None, None).anchors is None
    flipped = boxes.copy()
    flipped[0, 0] = [0.5, 0.1, 0.5 - 1e-6, 0.5]  # x2 a hair below x1: still corners
    assert choose_head({"boxes": flipped, "scores": soft}, "ssd", None, None).anchors is None
    flipped[0, 0] = [0.5, 0.1, 0.4, 0.5]
    with pytest.raises(InputError) as e:
        choose_head({"boxes": flipped, "scores": soft}, "ssd", None, (300, 300))
    assert e.value.message == ("SSD output 'boxes' [1, 200, 4] holds anchor offsets, and no anchor layout is known for "
                               "200 anchors at input (300, 300)")
    assert e.value.hint == "export the model with decoded boxes, or judge it with --task generic"
    yflip = boxes.copy()
    yflip[0, 0] = [0.1, 0.5, 0.5, 0.4]
    with pytest.raises(InputError):
        choose_head({"boxes": yflip, "scores": soft}, "ssd", None, (300, 300))
    big = np.zeros((1, 896, 16))
    big[0, :, :4] = 5.0
    head = choose_head({"regressors": big, "classificators": np.zeros((1, 896, 1))}, "auto", None, (128, 128))
    assert head.anchors.shape == (896, 4) and head.notes == ["SSD anchors generated for 896 boxes at 128x128 "
                                                             "(strides 8, 16)"]
    with pytest.raises(InputError, match="at input \\(128, 96\\)"):  # not square: no layout
        choose_head({"regressors": big, "classificators": np.zeros((1, 896, 1))}, "auto", None, (128, 96))
    with pytest.raises(InputError, match="at input None"):
        choose_head({"regressors": big, "classificators": np.zeros((1, 896, 1))}, "auto", None, None)


# ------------------------------------------------------------------ decoding


def test_decode_yolov8_sigmoid_floor_and_nms():
    out = np.zeros((2, 6, 100))
    out[:, :4] = [[10], [10], [4], [4]]
    out[:, :4, 50:] = [[60], [60], [4], [4]]
    out[:, 4:] = -10.0
    out[0, 4, 0] = 2.0  # image 0: class 0 at sigmoid(2) = 0.881
    out[1, 5, 0] = 0.0  # image 1: class 1 at 0.5
    head = Head("yolov8", ["o"], num_classes=2, sigmoid=True)
    dets = decode(head, {"o": out}, 0.5, 0.45)
    assert len(dets) == 2
    assert len(dets[0]) == 1 and dets[0].scores[0] == pytest.approx(1 / (1 + np.exp(-2)))
    np.testing.assert_allclose(dets[0].boxes[0], [8, 8, 12, 12])
    assert list(dets[1].classes) == [1] and dets[1].scores[0] == 0.5  # at the floor: kept
    assert [len(d) for d in decode(head, {"o": out}, 0.51, 0.45)] == [1, 0]


def test_decode_yolov5_objectness_times_class():
    rows = np.zeros((1, 120, 8))
    rows[0, :, :4] = [50, 50, 10, 10]
    rows[0, 0, :] = [50, 50, 10, 10, 0.5, 0.2, 0.8, 0.1]
    head = Head("yolov5", ["o"], num_classes=3)
    (d,) = decode(head, {"o": rows}, 0.3, 0.45)
    assert list(d.classes) == [1] and d.scores[0] == pytest.approx(0.4)
    logits = rows.copy()
    logits[0, 0, 4:] = [0.0, 0.0, 0.0, 0.0]
    (d,) = decode(Head("yolov5", ["o"], num_classes=3, sigmoid=True), {"o": logits}, 0.2, 0.45)
    assert d.scores[0] == pytest.approx(0.25)  # sigmoid of both objectness and class


def test_decode_nms_rows_and_tuple_variants():
    rows = np.zeros((1, 3, 6))
    rows[0, 0] = [1, 2, 3, 4, 0.9, 2.4]
    rows[0, 1] = [1, 2, 3, 4, 0.0, 1.0]
    (d,) = decode(Head("nms", ["d"]), {"d": rows}, 0.5, 0.45)
    assert list(d.classes) == [2] and d.classes.dtype == np.int64 and list(d.boxes[0]) == [1, 2, 3, 4]
    (d,) = decode(Head("nms", ["d"], sigmoid=True), {"d": rows}, 0.5, 0.45)
    # no NMS (already suppressed): the two empty rows at sigmoid(0) = 0.5 stay too
    assert sorted(d.scores) == [0.5, 0.5, pytest.approx(1 / (1 + np.exp(-0.9)))]
    boxes = np.array([[[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]], float)
    tup = {"b": boxes, "s": np.array([[0.9, 0.8, 0.7]]), "c": np.array([[1.2, 2.0, 3.0]]), "n": np.array([2])}
    (d,) = decode(Head("tuple", ["b", "s", "c", "n"]), tup, 0.1, 0.45)
    assert list(d.classes) == [1, 2] and list(d.scores) == [0.9, 0.8]
    (d,) = decode(Head("tuple", ["b", "s", "", ""]), tup, 0.1, 0.45)
    assert list(d.classes) == [0, 0, 0] and d.classes.dtype == np.int64
    per_class = {"b": boxes, "s": np.array([[[0.1, 0.9], [0.8, 0.2], [0.3, 0.4]]])}
    (d,) = decode(Head("tuple", ["b", "s", "", ""]), per_class, 0.35, 0.45)
    assert list(d.classes) == [1, 0, 1] and list(d.scores) == [0.9, 0.8, 0.4]


def test_decode_ssd_corners_background_and_anchor_offsets():
    raw = np.zeros((1, 3, 4))
    raw[0] = [[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.1, 0.1]]
    soft = np.array([[[0.1, 0.3, 0.6], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1]]])
    (d,) = decode(Head("ssd", ["b", "s"], background=True), {"b": raw, "s": soft}, 0.5, 0.45)
    assert list(d.classes) == [0, 1] and list(d.scores) == [0.7, 0.6]  # column 0 (background) dropped
    (d,) = decode(Head("ssd", ["b", "s"]), {"b": raw, "s": soft}, 0.5, 0.45)
    assert list(d.classes) == [0, 1, 2] and list(d.scores) == [0.8, 0.7, 0.6]
    (d,) = decode(Head("ssd", ["b", "s"], sigmoid=True), {"b": raw, "s": np.zeros((1, 3))}, 0.5, 0.45)
    assert list(d.scores) == [0.5, 0.5, 0.5] and list(d.classes) == [0, 0, 0]
    anchors = np.array([[0.5, 0.25, 1.0, 1.0]] * 3)
    off = np.zeros((1, 3, 4))
    off[0, 0] = [8.0, 16.0, 32.0, 64.0]  # pixels at a 64-px input
    head = Head("ssd", ["b", "s"], anchors=anchors, input_hw=(64, 64))
    d = decode(head, {"b": off, "s": np.array([[[0.9], [0.0], [0.0]]])}, 0.5, 0.45)[0]
    np.testing.assert_allclose(d.boxes[0], [0.625 - 0.25, 0.5 - 0.5, 0.625 + 0.25, 0.5 + 0.5])
    anchors2 = np.array([[0.5, 0.5, 2.0, 4.0]] * 3)  # anchor sizes scale the offsets
    head = Head("ssd", ["b", "s"], anchors=anchors2, input_hw=(64, 64))
    d = decode(head, {"b": off, "s": np.array([[[0.9], [0.0], [0.0]]])}, 0.5, 0.45)[0]
    np.testing.assert_allclose(d.boxes[0], [0.75 - 0.5, 1.5 - 2.0, 0.75 + 0.5, 1.5 + 2.0])


# ------------------------------------------------------------------ PRF, COCO mAP, labels, the evaluator


def test_prf_exact():
    t = [_dets([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], [0, 1])]
    p = [_dets([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    assert prf(t, p, 0.5) == (1 / 3, 1 / 2, 2 / 5)  # one hit; a duplicate; a box of the wrong class
    assert prf([_dets([], [], [])], [_dets([], [], [])], 0.5) == (1.0, 1.0, 1.0)
    assert prf([_dets([[0, 0, 10, 10]], [1], [0])], [_dets([], [], [])], 0.5) == (1.0, 0.0, 0.0)
    assert prf([_dets([], [], [])], [_dets([[0, 0, 10, 10]], [1], [0])], 0.5) == (0.0, 1.0, 0.0)
    half = [_dets([[0, 0, 10, 5]], [1], [0])]
    assert prf([_dets([[0, 0, 10, 10]], [1], [0])], half, 0.5)[2] == 1.0  # IoU exactly 0.5 matches
    assert prf([_dets([[0, 0, 10, 10]], [1], [0])], half, 0.51)[2] == 0.0
    # the higher score picks first, and takes the truth box it overlaps most
    t2 = [_dets([[0, 0, 10, 10], [0, 0, 10, 12]], [1, 1], [0, 0])]
    p2 = [_dets([[0, 0, 10, 11.9], [0, 0, 10, 10]], [0.5, 0.9], [0, 0])]
    assert prf(t2, p2, 0.8) == (1.0, 1.0, 1.0)


def test_coco_map_edges():
    empty = _dets([], [], [])
    box = _dets([[0, 0, 10, 10]], [0.9], [0])
    assert coco_map([empty], [empty]) == (1.0, 1.0)
    assert coco_map([empty], [box]) == (0.0, 0.0)
    assert coco_map([box], [empty]) == (0.0, 0.0)
    assert coco_map([box], [box]) == (pytest.approx(1.0), pytest.approx(1.0))
    shifted = _dets([[0, 0, 10, 8]], [0.9], [0])  # IoU 0.8: counts at 0.5 .. 0.8, not above
    m50, m5095 = coco_map([box], [shifted])
    assert m50 == pytest.approx(1.0) and m5095 == pytest.approx(7 / 10)
    wrong = _dets([[0, 0, 10, 10]], [0.9], [1])
    assert coco_map([box], [wrong]) == (0.0, 0.0)
    assert _mean(np.array([-1.0, -1.0])) == 0.0 and _mean(np.array([-1.0, 0.5, 1.0])) == 0.75


def test_input_hw_layouts():
    assert _input_hw(ModelInfo(input_shapes={"x": (1, 3, 320, 256)})) == (320, 256)
    assert _input_hw(ModelInfo(input_shapes={"x": (1, 1, 64, 32)})) == (64, 32)
    assert _input_hw(ModelInfo(input_shapes={"x": (1, 4, 64, 32)})) == (64, 32)
    assert _input_hw(ModelInfo(input_shapes={"x": (1, 320, 256, 3)})) == (320, 256)
    assert _input_hw(ModelInfo(input_shapes={"s": (1, 10), "x": (1, 2, 64, 32)})) == (2, 64)
    assert _input_hw(ModelInfo(input_shapes={"s": (1, 10)})) is None


def _labels_file(tmp_path, doc):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_labels_mapping_classes_and_errors(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "dir/a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
           "annotations": [{"image_id": 1, "category_id": 7, "bbox": [10, 20, 30, 40]},
                           {"image_id": 2, "category_id": 3, "bbox": [0, 0, 2, 2]},
                           {"image_id": 9, "category_id": 3, "bbox": [0, 0, 2, 2]}],
           "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]}
    path = _labels_file(tmp_path, doc)
    truth = coco_labels(path, ["a.jpg", "b.jpg", "c.jpg"], [(0.5, 1.0, 2.0), (1.0, 0.0, 0.0), (1, 0, 0)], 3,
                        ["cat", "dog"])
    assert len(truth) == 3 and len(truth[2]) == 0
    np.testing.assert_allclose(truth[0].boxes, [[6.0, 12.0, 21.0, 32.0]])
    assert list(truth[0].classes) == [1] and list(truth[1].classes) == [0] and truth[0].classes.dtype == np.int64
    assert list(truth[0].scores) == [1.0]
    # without class names the category id is the class; names beyond n_images are not matched
    truth = coco_labels(path, ["a.jpg", "b.jpg"], [(1, 0, 0), (1, 0, 0)], 1, None)
    assert len(truth) == 1 and list(truth[0].classes) == [7]
    truth = coco_labels(path, ["a.jpg"], [(1, 0, 0)], 1, ["bird"])
    assert list(truth[0].classes) == [7]  # a name the model does not know: the id
    with pytest.raises(InputError) as e:
        coco_labels(path, None, [(1, 0, 0)], 1, None)
    assert e.value.message == ("--labels (COCO JSON) needs --heldout to be a folder of images, whose file names the "
                               "labels' 'images' entries name")
    with pytest.raises(InputError):
        coco_labels(path, ["a.jpg"], None, 1, None)
    with pytest.raises(InputError) as e:
        coco_labels(path, ["x.jpg", "y.jpg", "z.jpg", "w.jpg"], [(1, 0, 0)] * 4, 4, None)
    assert e.value.message == "labels file labels.json names none of the held-out images (x.jpg, y.jpg, z.jpg, ...)"
    with pytest.raises(InputError) as e:
        coco_labels(path, ["x.jpg", "y.jpg", "z.jpg"], [(1, 0, 0)] * 3, 3, None)
    assert e.value.message == "labels file labels.json names none of the held-out images (x.jpg, y.jpg, z.jpg)"
    with pytest.raises(InputError) as e:
        coco_labels(tmp_path / "none.json", ["a.jpg"], [(1, 0, 0)], 1, None)
    assert e.value.message == f"labels file {tmp_path / 'none.json'} not found"
    bad = _labels_file(tmp_path, {"images": []})
    with pytest.raises(InputError) as e:
        coco_labels(bad, ["a.jpg"], [(1, 0, 0)], 1, None)
    assert e.value.message == "labels file labels.json is not COCO-format JSON (KeyError: 'annotations')"
    assert e.value.hint.startswith("give {'images': [{'id', 'file_name'}], 'annotations'")


def test_coco_labels_size_limit(tmp_path, monkeypatch):
    path = _labels_file(tmp_path, {"images": [], "annotations": []})
    size = path.stat().st_size
    monkeypatch.setattr(detect, "MAX_LABEL_BYTES", size)
    with pytest.raises(InputError, match="names none"):  # at the limit: read
        coco_labels(path, ["a.jpg"], [(1, 0, 0)], 1, None)
    monkeypatch.setattr(detect, "MAX_LABEL_BYTES", size - 1)
    with pytest.raises(InputError) as e:
        coco_labels(path, ["a.jpg"], [(1, 0, 0)], 1, None)
    assert e.value.message == "labels file labels.json is larger than 0 MiB"


def _v8_image(boxes, scores, classes, n=100):
    out = np.zeros((1, 7, n))
    out[0, :4] = 1.0
    for i, (b, s, c) in enumerate(zip(boxes, scores, classes)):
        out[0, :4, i] = b
        out[0, 4 + c, i] = s
    return out


def _detect_eval(budget=BUDGET, **kw):
    info = ModelInfo(input_shapes={"images": (1, 3, 320, 320)}, class_names=["a", "b", "c"])
    return DetectEvaluator(budget, info, TaskOptions(**kw), "why")


def test_detect_evaluator_checks_figures_and_floor():
    ref = [{"o": _v8_image([(50, 50, 20, 20), (150, 150, 20, 20)], [0.9, 0.8], [0, 1])}]
    # the second box drops to 0.2: below the deployment threshold, above the mAP floor
    opt = [{"o": _v8_image([(50, 50, 20, 20), (150, 150, 20, 20)], [0.9, 0.2], [0, 1])}]
    ev = _detect_eval()
    result = ev.evaluate(ref, opt)
    assert ev.reason == "why; output 'o' [1, 7, 100]: YOLOv8-style rows (4 box + 3 class scores)"
    assert [(c.name, c.rule) for c in result.checks] == [("mAP@0.5 vs fp32", "min"), ("F1 vs fp32 at conf 0.25", "min"),
                                                         ("mAP@0.5:0.95 vs fp32", "")]
    assert result.checks[0].optimized == pytest.approx(1.0)  # the ranking is intact
    assert result.checks[1].optimized == pytest.approx(2 / 3) and not result.checks[1].passed
    assert result.figures == {"fp32_detections": 2.0, "optimized_detections": 1.0, "map50_95": pytest.approx(1.0),
                              "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3)}
    assert result.notes == []
    nof1 = _detect_eval(AccuracyBudget(min_f1=None)).evaluate(ref, opt)
    assert (nof1.checks[1].name, nof1.checks[1].rule, nof1.checks[1].passed) == ("F1 vs fp32 at conf 0.25", "", True)
    # a box under the 0.001 floor is not a prediction at all
    gone = [{"o": _v8_image([(50, 50, 20, 20), (150, 150, 20, 20)], [0.9, 0.0009], [0, 1])}]
    assert _detect_eval().evaluate(ref, gone).checks[0].optimized == pytest.approx(0.5)
    low = [{"o": _v8_image([(50, 50, 20, 20), (150, 150, 20, 20)], [0.9, 0.001], [0, 1])}]
    assert _detect_eval().evaluate(ref, low).checks[0].optimized == pytest.approx(1.0)
    # a deployment threshold under the floor lowers the floor with it
    tiny = AccuracyBudget(detect_conf=0.0005)
    assert _detect_eval(tiny).evaluate(ref, gone).figures["optimized_detections"] == 2.0


def test_detect_evaluator_when_fp32_finds_nothing():
    none = [{"o": _v8_image([], [], [])}]
    some = [{"o": _v8_image([(50, 50, 20, 20)], [0.9], [0])}]
    result = _detect_eval().evaluate(none, none)
    assert [c.optimized for c in result.checks] == [1.0, 1.0, 1.0]
    assert result.notes == ["fp32 detected nothing on the held-out data at the deployment threshold: give held-out "
                            "images that contain the objects, or the detection check says little"]
    result = _detect_eval().evaluate(none, some)
    assert [c.optimized for c in result.checks] == [0.0, 0.0, 0.0]
    # only optimized detections above the threshold count as found
    below = [{"o": _v8_image([(50, 50, 20, 20)], [0.2], [0])}]
    assert _detect_eval().evaluate(none, below).checks[0].optimized == 1.0


def test_detect_evaluator_prepare_uses_input_size_and_class_names():
    big = np.zeros((1, 896, 16))
    big[0, :, :4] = 5.0
    ref = {"regressors": big, "classificators": np.zeros((1, 896, 1))}
    ev = DetectEvaluator(BUDGET, ModelInfo(input_shapes={"x": (1, 3, 128, 128)}), TaskOptions())
    ev.prepare([ref])
    assert ev.head.anchors.shape == (896, 4) and ev.head.input_hw == (128, 128)
    assert ev.reason.startswith("outputs 'regressors' [1, 896, 16]")  # no reason of its own: no "; "
    wide = np.zeros((1, 4 + 5, 120))  # 5 score rows, of which the model names 3 classes (the rest: extras)
    ev = DetectEvaluator(BUDGET, ModelInfo(class_names=["a", "b", "c"]), TaskOptions())
    ev.prepare([{"o": wide}])
    assert ev.head.num_classes == 3
    ev = DetectEvaluator(BUDGET, ModelInfo(), TaskOptions(detect_format="yolov8"))
    ev.prepare([{"o": wide}])
    assert ev.head.num_classes == 5 and ev.head.reason == "--detect-format yolov8"


def test_detect_against_labels_reports_map_in_points(tmp_path):
    # fp32 finds the class-0 box and misses the class-1 one (its box is elsewhere): mAP@0.5 0.5 -> 50 points
    doc = {"images": [{"id": 1, "file_name": "img0.jpg"}],
           "annotations": [{"image_id": 1, "category_id": 0, "bbox": [40, 40, 20, 20]},
                           {"image_id": 1, "category_id": 1, "bbox": [240, 240, 20, 20]}],
           "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}
    labels = _labels_file(tmp_path, doc)
    ref = [{"o": _v8_image([(50, 50, 20, 20), (150, 150, 20, 20)], [0.9, 0.8], [0, 1])}]
    ev = _detect_eval(labels_file=str(labels), sample_names=["img0.jpg"], transforms=[(1.0, 0.0, 0.0)])
    result = ev.evaluate(ref, ref)
    c = result.checks[0]
    assert (c.name, c.rule) == ("mAP@0.5 on labels (points)", "max_drop")
    assert c.fp32 == pytest.approx(50.0) and c.optimized == pytest.approx(50.0) and c.passed
    assert [x.name for x in result.checks[1:]] == ["mAP@0.5 vs fp32", "F1 vs fp32 at conf 0.25", "mAP@0.5:0.95 vs fp32"]


def test_coco_map_without_pycocotools(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(Exception) as e:
        coco_map([_dets([[0, 0, 1, 1]], [1], [0])], [_dets([[0, 0, 1, 1]], [1], [0])])
    assert e.value.message == "pycocotools is not installed"
    assert e.value.hint == "install it with: pip install 'edgeopt[sdk]'"


def test_coco_map_reads_300_detections_at_iou_05_for_any_box_size():
    truth = [_dets([[0, 0, 10, 10]], [1], [0])]
    # the one true box ranked 11th, then 300th, then 301st among the predictions of its image
    for rank, found in ((11, True), (300, True), (301, False)):
        boxes = [[100 + i, 100, 110 + i, 110] for i in range(rank - 1)] + [[0, 0, 10, 10]]
        scores = list(np.linspace(0.9, 0.5, rank))
        m50, _ = coco_map(truth, [_dets(boxes, scores, [0] * rank)])
        assert (m50 > 0) is found, rank
    # IoU 0.52 counts at 0.5 (mAP@0.5 is the first threshold, not 0.55)
    m50, m5095 = coco_map(truth, [_dets([[0, 0, 10, 5.2]], [0.9], [0])])
    assert m50 == pytest.approx(1.0) and m5095 == pytest.approx(1.0 / 10)
    # normalized boxes (area far below 1), and huge ones, are judged like any other
    small = [_dets([[0.1, 0.1, 0.3, 0.3]], [1], [0])]
    assert coco_map(small, small) == (pytest.approx(1.0), pytest.approx(1.0))
    huge = [_dets([[0, 0, 1e6, 9.9e5]], [1], [0])]
    assert coco_map(huge, huge) == (pytest.approx(1.0), pytest.approx(1.0))
    # beyond 1e12 square units a box falls outside the one area range: nothing is scored
    beyond = [_dets([[0, 0, 1e6, 1.5e6]], [1], [0])]
    assert coco_map(beyond, beyond) == (0.0, 0.0)
    # a degenerate fp32 box (zero height) does not break the evaluation
    flat = [_dets([[0, 0, 10, 0]], [1], [0])]
    assert coco_map(flat, flat) == (0.0, 0.0)


def test_prf_greedy_by_descending_score_over_several_images():
    a, b = [0, 0, 10, 10], [0, 0, 10, 12]
    # the high-score box takes A (its best IoU); the low one then finds no free box it overlaps enough
    t = [_dets([a, b], [1, 1], [0, 0])]
    p = [_dets([[0, 0, 10, 10.5], [0, 0, 10, 9.5]], [0.9, 0.3], [0, 0])]
    assert prf(t, p, 0.8) == (0.5, 0.5, 0.5)
    # misses add up over images
    t2 = [_dets([a], [1], [0]), _dets([a], [1], [0])]
    assert prf(t2, [_dets([], [], []), _dets([a], [1], [0])], 0.5) == (1.0, 0.5, 2 / 3)


def test_labels_size_message_in_mib(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(3 * 2**20 + 1)  # sparse: nothing is written
    monkeypatch.setattr(detect, "MAX_LABEL_BYTES", 3 * 2**20)
    with pytest.raises(InputError) as e:
        coco_labels(path, ["a.jpg"], [(1, 0, 0)], 1, None)
    assert e.value.message == "labels file big.json is larger than 3 MiB"


def test_labels_json_error_text_and_hint(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{\n  nope")
    with pytest.raises(InputError) as e:
        coco_labels(path, ["a.jpg"], [(1, 0, 0)], 1, None)
    assert e.value.message == ("labels file bad.json is not COCO-format JSON (JSONDecodeError: Expecting property name "
                               "enclosed in double quotes: line 2 column 3 (char 4))")
    assert e.value.hint == ("give {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'category_id', "
                            "'bbox': [x, y, w, h]}], 'categories': [{'id', 'name'}]}")


def test_labels_of_other_images_are_skipped_not_the_rest(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "other.jpg"}],
           "annotations": [{"image_id": 2, "category_id": 0, "bbox": [0, 0, 1, 1]},
                           {"image_id": 1, "category_id": 0, "bbox": [0, 0, 2, 2]}]}
    truth = coco_labels(_labels_file(tmp_path, doc), ["a.jpg"], [(1, 0, 0)], 1, None)
    np.testing.assert_array_equal(truth[0].boxes, [[0, 0, 2, 2]])


@pytest.mark.parametrize("keys, name, key", [
    ("_BOX_NAMES", "pred_boxes", "boxes"), ("_BOX_NAMES", "bbox_out", "bbox"), ("_BOX_NAMES", "x_bboxes", "bboxes"),
    ("_BOX_NAMES", "detection_boxes:0", "detection_boxes"), ("_BOX_NAMES", "regressors", "regressors"),
    ("_BOX_NAMES", "loc", "loc"), ("_BOX_NAMES", "box", "box"),
    ("_SCORE_NAMES", "pred_scores", "scores"), ("_SCORE_NAMES", "score", "score"),
    ("_SCORE_NAMES", "detection_scores:0", "detection_scores"), ("_SCORE_NAMES", "classificators", "classificators"),
    ("_SCORE_NAMES", "conf", "conf"), ("_SCORE_NAMES", "x_confidence", "confidence"), ("_SCORE_NAMES", "logits", "logits"),
    ("_CLASS_NAMES", "pred_classes", "classes"), ("_CLASS_NAMES", "labels", "labels"),
    ("_CLASS_NAMES", "detection_classes:0", "detection_classes"), ("_CLASS_NAMES", "x_class_ids", "class_ids"),
    ("_CLASS_NAMES", "class", "class"),
    ("_COUNT_NAMES", "x_num_detections", "num_detections"), ("_COUNT_NAMES", "count", "count"),
    ("_COUNT_NAMES", "num", "num"), ("_COUNT_NAMES", "x_num_dets", "num_dets"), ("_COUNT_NAMES", "valid", "valid")])
def test_each_output_name_key_is_recognized(keys, name, key):
    """Every key of the name lists finds an export's output that no other key of its list finds."""
    names = getattr(dh, keys)
    assert dh._named({name: 0}, names) == name
    assert dh._named({name: 0}, tuple(k for k in names if k != key)) is None


def test_head_defaults():
    head = Head("yolov8", ["o"])
    assert (head.num_classes, head.sigmoid, head.background, head.anchors, head.input_hw, head.reason, head.notes) == \
        (None, False, False, None, None, "", [])
    assert head.sigmoid is False and head.background is False
    assert Head("nms", ["o"]).notes is not head.notes


def test_one_class_yolov8_and_suppressed_formats_skip_nms():
    one = np.zeros((1, 5, 120))  # 4 box rows and a single class row
    head = choose_head({"o": one}, "yolov8", None, None)
    assert head.num_classes == 1
    with pytest.raises(InputError, match="rows of 5 values, at least 6 needed"):
        choose_head({"o": np.zeros((1, 100, 5))}, "nms", None, None)
    # already suppressed exports keep overlapping boxes of one class as they are
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 9]]], float)
    tup = {"b": boxes, "s": np.array([[0.9, 0.8]])}
    head = Head("tuple", ["b", "s", "", ""])
    assert head.suppressed and len(decode(head, tup, 0.1, 0.45)[0]) == 2
    assert not Head("ssd", ["b", "s"]).suppressed


def test_sigmoid_decision_reads_only_the_score_columns():
    # yolov8 with 3 named classes and 2 extra columns (mask coefficients, far outside [0, 1])
    out = np.zeros((1, 9, 120))
    out[0, 4:7] = 0.5
    out[0, 7:] = 50.0
    assert not choose_head({"o": out}, "yolov8", 3, None).sigmoid
    # yolov5: objectness and classes decide, not what follows them
    rows = np.full((1, 120, 9), 0.5)
    rows[0, :, 7:] = 50.0
    assert not choose_head({"o": rows}, "yolov5", 2, None).sigmoid
    rows[0, :, 4] = -3.0  # objectness as a logit
    assert choose_head({"o": rows}, "yolov5", 2, None).sigmoid
    # nms rows: the score column only (the class column holds 2.0)
    nms_rows = np.zeros((1, 100, 6))
    nms_rows[0, :, 4], nms_rows[0, :, 5] = 0.5, 2.0
    assert not choose_head({"d": nms_rows}, "nms", None, None).sigmoid
    nms_rows[0, 0, 4] = 3.0
    assert choose_head({"d": nms_rows}, "nms", None, None).sigmoid
    edge = _v8()
    edge[0, 4, 0] = 1 + 1e-3  # exactly the tolerance: still a probability
    assert not choose_head({"o": edge}, "auto", None, None).sigmoid


@pytest.mark.parametrize("low, high, sigmoid", [(0.0, 0.5, False), (-1e-3, 1 + 1e-3, False), (-0.5, 0.5, True),
                                                 (0.0, 1.5, True), (0.0, 0.9995, False), (0.0, 2.5, True)])
def test_ssd_scores_sigmoid_bounds(low, high, sigmoid):
    boxes = np.tile(np.array([0.1, 0.1, 0.5, 0.5]), (1, 200, 1))
    scores = np.full((1, 200, 3), 0.2)
    scores[0, 0, 0], scores[0, 1, 0] = low, high
    assert choose_head({"boxes": boxes, "scores": scores}, "ssd", None, None).sigmoid is sigmoid


def test_ssd_background_with_two_columns_and_corner_bounds():
    boxes = np.tile(np.array([0.1, 0.1, 0.5, 0.5]), (1, 200, 1))
    two = np.tile(np.array([0.3, 0.7]), (1, 200, 1))
    head = choose_head({"boxes": boxes, "scores": two}, "ssd", None, None)
    assert head.background and head.num_classes == 1
    # three anchors in corner form are corners (no anchor layout needed)
    assert choose_head({"boxes": boxes[:, :3], "scores": two[:, :3]}, "ssd", None, None).anchors is None
    # columns after the four box values (key points) do not count
    extra = np.concatenate([boxes, np.full((1, 200, 2), -10.0)], -1)
    extra[0, 0, 4] = 10.0
    assert choose_head({"boxes": extra, "scores": two}, "ssd", None, None).anchors is None
    for column, bad in ((0, -0.5), (2, 1.5)):  # x1 below the range; x2 above it (the boxes stay ordered)
        off = boxes.copy()
        off[0, 0, column] = bad
        with pytest.raises(InputError, match="holds anchor offsets"):
            choose_head({"boxes": off, "scores": two}, "ssd", None, (300, 300))


def test_corner_tolerances_and_head_guesses_at_their_edges():
    two = np.tile(np.array([0.3, 0.7]), (1, 200, 1))
    boxes = np.tile(np.array([0.1, 0.1, 0.5, 0.3]), (1, 200, 1))  # wider than tall: y2 below x2 is fine
    assert choose_head({"boxes": boxes, "scores": two}, "ssd", None, None).anchors is None
    tol = boxes.copy()
    tol[0, 0, 3] = tol[0, 0, 1] - 1e-6  # y2 a hair (exactly the tolerance) above... below y1: still corners
    assert choose_head({"boxes": tol, "scores": two}, "ssd", None, None).anchors is None
    for column, other in ((2, 0), (3, 1)):
        off = boxes.copy()
        off[0, 0, column] = off[0, 0, other] - 1.5e-6  # beyond the tolerance: offsets, not corners
        with pytest.raises(InputError, match="holds anchor offsets"):
            choose_head({"boxes": off, "scores": two}, "ssd", None, (300, 300))
    # boxes named, scores not: read as SSD by shapes, without a crash
    head = choose_head({"boxes": np.full((1, 200, 4), 0.5), "x": np.full((1, 200, 2), 0.5)}, "auto", None, None)
    assert head.format == "ssd" and head.outputs == ["boxes", "x"]
    # a square [1, 6, 6] output with integral classes is already suppressed, not YOLOv8 rows
    assert choose_head({"d": np.zeros((1, 6, 6))}, "auto", None, None).format == "nms"
