"""Task evaluators and budget rules: fast, exact tests on synthetic outputs (real models: test_detectors.py)."""
from __future__ import annotations

import numpy as np
import pytest

from edgeopt.sdk.errors import InputError
from edgeopt.sdk.pipeline import accuracy
from edgeopt.sdk.pipeline.tasks import ModelInfo, TaskOptions, choose
from edgeopt.sdk.pipeline.tasks.detect_heads import choose_head, decode, ssd_anchors
from edgeopt.sdk.profile import AccuracyBudget

BUDGET = AccuracyBudget()


def _judge(task, ref, opt, budget=BUDGET, labels=None, info=None, **kw):
    ev = choose(task, budget, info or ModelInfo(), TaskOptions(**kw), ref)
    return accuracy.compare(ref, opt, budget, labels, ev)


def _concat_cosine(ref, opt):
    a = np.concatenate([np.ravel(v) for r in ref for v in r.values()])
    b = np.concatenate([np.ravel(v) for o in opt for v in o.values()])
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------ generic: each output on its own


def test_generic_judges_each_output_alone_not_the_concatenation():
    rng = np.random.default_rng(0)
    ref = [{"coords": rng.uniform(0, 320, (1, 400)), "scores": rng.uniform(0, 1, (1, 20))} for _ in range(4)]
    opt = [{"coords": r["coords"], "scores": np.full((1, 20), 0.5)} for r in ref]  # scores collapsed
    assert _concat_cosine(ref, opt) > 0.99
    report = _judge("generic", ref, opt)
    assert not report.passed
    assert report.metric.name == "cosine of 'scores'"
    assert [o.name for o in report.outputs] == ["coords", "scores"]
    assert report.outputs[0].min_cosine == pytest.approx(1.0)
    assert report.outputs[0].min_snr_db == 99.0


def test_generic_budget_is_the_minimum_over_samples_not_the_mean():
    ref = [{"y": np.ones((1, 8))} for _ in range(50)]
    opt = [{"y": np.ones((1, 8))} for _ in range(49)] + [{"y": np.r_[np.ones(4), -np.ones(4)].reshape(1, 8)}]
    # The bound sits between the mean and the minimum: only the minimum rule refuses it.
    report = _judge("generic", ref, opt, AccuracyBudget(min_cosine=0.95))
    assert report.mean_cosine > 0.97
    assert report.min_cosine == pytest.approx(0.0)
    assert not report.passed


def test_generic_bound_is_inclusive():
    budget = AccuracyBudget(min_cosine=0.6)
    ref = [{"y": np.array([[1.0, 0.0]])}]
    opt = [{"y": np.array([[0.6, 0.8]])}]  # cosine exactly 0.6
    assert _judge("generic", ref, opt, budget).passed
    assert not _judge("generic", ref, opt, AccuracyBudget(min_cosine=0.6001)).passed


def test_nan_output_fails_with_its_own_line():
    ref = [{"y": np.ones((1, 4))}]
    report = _judge("generic", ref, [{"y": np.array([[1, 1, 1, np.nan]])}])
    assert not report.passed
    assert report.failures[0] == "the optimized model produced NaN or infinite values"


# ------------------------------------------------------------------ classify


def _logits(tops, classes=10):
    out = np.zeros((len(tops), classes))
    out[np.arange(len(tops)), tops] = 5.0
    return [{"logits": out[i:i + 1]} for i in range(len(tops))]


def test_classify_top1_agreement_bound():
    tops = np.arange(100) % 10
    ref = _logits(tops)
    one_off = tops.copy()
    one_off[0] = (one_off[0] + 1) % 10
    two_off = one_off.copy()
    two_off[1] = (two_off[1] + 1) % 10
    r1 = _judge("classify", ref, _logits(one_off))
    assert r1.passed and r1.top1_agreement == pytest.approx(0.99)
    r2 = _judge("classify", ref, _logits(two_off))
    assert not r2.passed and r2.failures == ["top-1 agreement 0.9800 < 0.99"]
    assert r2.figures["top5_agreement"] == pytest.approx(1.0)


def test_classify_with_labels_accuracy_drop_decides():
    tops = np.arange(100) % 10
    labels = tops.copy()
    opt = tops.copy()
    opt[:2] = (opt[:2] + 1) % 10  # 2 points of accuracy lost
    report = _judge("classify", _logits(tops), _logits(opt), labels=labels)
    assert report.metric.name == "accuracy" and report.metric.drop == pytest.approx(2.0)
    assert not report.passed
    assert _judge("classify", _logits(tops), _logits(opt), AccuracyBudget(max_metric_drop=2.0), labels=labels).passed


# ------------------------------------------------------------------ detect


def _yolo(boxes, classes, scores, nc=3, n=200, noise=0.0, seed=0):
    """A YOLOv8-style [1, 4+nc, n] output: the given boxes (cx, cy, w, h) plus background rows."""
    rng = np.random.default_rng(seed)
    out = np.zeros((1, 4 + nc, n))
    out[0, :4] = rng.uniform(20, 300, (4, n))
    out[0, 4:] = rng.uniform(0, 0.05, (nc, n))
    for i, (b, c, s) in enumerate(zip(boxes, classes, scores)):
        out[0, :4, i] = b
        out[0, 4 + c, i] = s
    return out


SCENES = [([(100, 100, 40, 60), (220, 150, 50, 50)], [0, 1], [0.9, 0.8]),
          ([(60, 200, 30, 30)], [2], [0.7]),
          ([(160, 160, 100, 120), (40, 40, 20, 20), (280, 60, 30, 40)], [0, 2, 1], [0.95, 0.6, 0.5])]
INFO = ModelInfo(input_shapes={"images": (1, 3, 320, 320)}, metadata={"task": "detect"}, class_names=["a", "b", "c"])


def _detect_ref():
    return [{"output0": _yolo(b, c, s, seed=i)} for i, (b, c, s) in enumerate(SCENES)]


def test_detect_identical_outputs_score_one():
    ref = _detect_ref()
    report = _judge("auto", ref, ref, info=INFO)
    assert report.task == "detect" and report.passed
    assert report.metric.name == "mAP@0.5 vs fp32" and report.metric.optimized == pytest.approx(1.0)
    assert report.figures["fp32_detections"] == 6 and report.figures["f1"] == pytest.approx(1.0)
    assert "Ultralytics" in report.task_reason and "YOLOv8" in report.task_reason


def test_detect_collapsed_class_scores_refused_although_cosine_is_high():
    ref = _detect_ref()
    opt = []
    for r in ref:
        o = r["output0"].copy()
        o[0, 4:] *= 0.25  # the class-score block collapses; coordinates (0..320) dominate the cosine
        opt.append({"output0": o})
    report = _judge("auto", ref, opt, info=INFO)
    assert report.min_cosine > 0.99
    assert not report.passed
    assert any(f.startswith("F1 vs fp32 at conf 0.25") for f in report.failures)


def test_detect_lost_box_lowers_map_and_f1_exactly():
    ref = _detect_ref()
    opt = [dict(r) for r in ref]
    o = ref[2]["output0"].copy()
    o[0, 4:, 2] = 0.0  # the third scene's 0.5-score box disappears
    opt[2] = {"output0": o}
    report = _judge("auto", ref, opt, info=INFO)
    assert report.figures["recall"] == pytest.approx(5 / 6)
    assert report.figures["f1"] == pytest.approx(2 * 5 / (2 * 5 + 1))
    assert report.metric.optimized < 1.0


def test_detect_shifted_boxes_hurt_map50_95_more_than_map50():
    ref = _detect_ref()
    opt = []
    for r in ref:
        o = r["output0"].copy()
        o[0, 0] += 4  # every box moves 4 px right
        opt.append({"output0": o})
    report = _judge("auto", ref, opt, info=INFO)
    assert report.metric.optimized == pytest.approx(1.0)
    assert report.figures["map50_95"] < 0.9


def test_detect_formats_decode_the_same_boxes():
    boxes_cxcywh = np.array([[100, 100, 40, 60], [220, 150, 50, 50]], float)
    xyxy = np.c_[boxes_cxcywh[:, :2] - boxes_cxcywh[:, 2:] / 2, boxes_cxcywh[:, :2] + boxes_cxcywh[:, 2:] / 2]
    v8 = {"output0": _yolo(boxes_cxcywh, [0, 1], [0.9, 0.8])}
    v5 = np.zeros((1, 200, 8))
    v5[0, :2, :4] = boxes_cxcywh
    v5[0, :2, 4] = 1.0
    v5[0, 0, 5], v5[0, 1, 6] = 0.9, 0.8
    nms = np.zeros((1, 100, 6))
    nms[0, :2] = np.c_[xyxy, [0.9, 0.8], [0, 1]]
    tup = {"boxes": xyxy[None], "scores": np.array([[0.9, 0.8]]), "classes": np.array([[0, 1]])}
    for fmt, out in (("yolov8", v8), ("yolov5", {"o": v5}), ("nms", {"o": nms}), ("tuple", tup)):
        head = choose_head(out, "auto", 3 if fmt == "yolov8" else None, (320, 320))
        assert head.format == fmt
        dets = decode(head, out, 0.25, 0.45)[0]
        order = np.argsort(-dets.scores)
        np.testing.assert_allclose(dets.boxes[order], xyxy, atol=1e-9)
        assert list(dets.classes[order]) == [0, 1]


def test_ssd_blazeface_anchors_decode():
    anchors = ssd_anchors(128, [(8, 2), (16, 6)])
    assert anchors.shape == (896, 4)
    raw = np.zeros((1, 896, 16))
    logits = np.full((1, 896, 1), -10.0)
    logits[0, 300, 0] = 4.0
    raw[0, 300, 2:4] = 32.0  # 32 px wide and tall at 128: a quarter of the image
    out = {"regressors": raw, "classificators": logits}
    head = choose_head(out, "auto", None, (128, 128))
    assert head.format == "ssd" and head.sigmoid and head.anchors is not None
    dets = decode(head, out, 0.5, 0.3)[0]
    assert len(dets) == 1
    cx, cy = anchors[300, :2]
    np.testing.assert_allclose(dets.boxes[0], [cx - 0.125, cy - 0.125, cx + 0.125, cy + 0.125], atol=1e-9)


def test_detect_no_objects_in_fp32():
    ref = [{"output0": _yolo([], [], [], seed=1)}]
    assert _judge("detect", ref, ref, info=INFO).passed
    opt = [{"output0": _yolo([(50, 50, 20, 20)], [0], [0.9], seed=1)}]
    report = _judge("detect", ref, opt, info=INFO)
    assert not report.passed and any("detected nothing" in n for n in report.notes)


def test_unknown_detection_layout_is_one_clear_error():
    with pytest.raises(InputError, match="cannot tell how to read detections"):
        _judge("detect", [{"a": np.zeros((1, 4)), "b": np.zeros((1, 5))}], [{"a": np.zeros((1, 4))}])


# ------------------------------------------------------------------ segment


def test_segment_probability_map_iou_bound():
    ref_mask = np.zeros((1, 1, 20, 20))
    ref_mask[0, 0, :10, :10] = 0.9  # 100 pixels
    opt_mask = ref_mask.copy()
    opt_mask[0, 0, 9, 5:] = 0.1  # 5 pixels lost: IoU 95 / 100
    assert _judge("auto", [{"p": ref_mask}], [{"p": opt_mask}]).passed
    opt_mask[0, 0, 8, 9] = 0.1  # 6 lost: 0.94
    report = _judge("auto", [{"p": ref_mask}], [{"p": opt_mask}])
    assert report.task == "segment" and not report.passed
    assert report.metric.optimized == pytest.approx(0.94)


def test_segment_class_map_miou():
    ref = np.zeros((1, 10, 10), np.int64)
    ref[0, :5] = 1
    opt = ref.copy()
    opt[0, 4] = 0  # class 1: 40/50, class 0: 50/60
    report = _judge("auto", [{"cls": ref}], [{"cls": opt}])
    assert report.task == "segment"
    assert report.metric.optimized == pytest.approx((40 / 50 + 50 / 60) / 2)


# ------------------------------------------------------------------ embed


def test_embed_recall_at_1_sees_a_swap():
    rng = np.random.default_rng(3)
    ref = [{"embedding": rng.standard_normal((1, 64))} for _ in range(20)]
    opt = [dict(r) for r in ref]
    assert _judge("auto", ref, opt).task == "embed"
    opt[0], opt[1] = ref[1], ref[0]
    report = _judge("auto", ref, opt)
    assert report.metric.name == "recall@1 in fp32 space" and report.metric.optimized == pytest.approx(0.9)
    assert not report.passed


# ------------------------------------------------------------------ custom metric and the score


def test_custom_metric_decides_and_task_figures_are_reported():
    ref = _logits(np.arange(10))

    def agree(fp32, optimized, labels):
        return float(np.mean([np.argmax(a["logits"]) == np.argmax(b["logits"]) for a, b in zip(fp32, optimized)]))

    ev = choose("auto", BUDGET, ModelInfo(), TaskOptions(), ref, metric=agree, max_metric_drop=0.1)
    opt = _logits(np.r_[1, np.arange(1, 10)])
    report = accuracy.compare(ref, opt, BUDGET, None, ev)
    assert report.task == "custom" and report.metric.drop == pytest.approx(0.1) and report.passed
    assert any(c.name == "top-1 agreement" and not c.rule for c in report.checks)


def test_score_is_least_slack_over_budgeted_checks():
    ref = _detect_ref()
    report = _judge("auto", ref, ref, info=INFO)
    assert accuracy.score(report) == pytest.approx(min(1 - 0.95, 1 - 0.9))


def test_auto_task_reasons():
    assert _judge("auto", _logits([1]), _logits([1])).task_reason.startswith("task classify")
    two = [{"x": np.zeros((1, 3)), "y": np.zeros((2,))}]
    assert _judge("auto", two, two).task == "generic"


def test_detect_against_coco_labels_maps_letterbox_and_holds_the_drop(tmp_path):
    """COCO labels are in source-image pixels; held-out images were letterboxed (scale 0.5, pad 0/40): the boxes
    are mapped into the model's frame, fp32 scores 100 on them, a lost box costs points of mAP@0.5."""
    import json

    transforms = [(0.5, 0.0, 40.0)] * 3
    images, anns = [], []
    for i, (boxes, classes, _) in enumerate(SCENES):
        images.append({"id": 10 + i, "file_name": f"photos/img{i}.jpg"})
        for (cx, cy, w, h), c in zip(boxes, classes):
            x, y = (cx - w / 2) / 0.5, (cy - h / 2 - 40.0) / 0.5
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": c, "bbox": [x, y, w / 0.5, h / 0.5]})
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"images": images, "annotations": anns,
                                  "categories": [{"id": k, "name": n} for k, n in enumerate("abc")]}))
    opts = {"labels_file": str(labels), "sample_names": [f"img{i}.jpg" for i in range(3)], "transforms": transforms}
    ref = _detect_ref()
    report = _judge("auto", ref, ref, info=INFO, **opts)
    assert report.metric.name == "mAP@0.5 on labels (points)"
    assert report.metric.fp32 == pytest.approx(100.0) and report.passed
    opt = [dict(r) for r in ref]
    o = ref[0]["output0"].copy()
    o[0, 4:, 0] = 0.0  # the first scene's class-0 box disappears: class 0 loses 1 of its 2 boxes
    opt[0] = {"output0": o}
    lost = _judge("auto", ref, opt, info=INFO, **opts)
    assert lost.metric.drop > 1.0 and not lost.passed
    assert lost.failures[0].startswith("mAP@0.5 on labels (points) dropped")


def test_labels_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    opts = {"labels_file": str(bad), "sample_names": ["a.jpg"], "transforms": [(1.0, 0.0, 0.0)]}
    ref = _detect_ref()[:1]
    with pytest.raises(InputError, match=r"labels file bad.json is not COCO-format JSON \(JSONDecodeError"):
        _judge("auto", ref, ref, info=INFO, **opts)
    other = tmp_path / "other.json"
    other.write_text('{"images": [{"id": 1, "file_name": "z.jpg"}], "annotations": '
                     '[{"image_id": 1, "category_id": 0, "bbox": [1, 2, 3, 4]}]}')
    with pytest.raises(InputError, match="names none of the held-out images"):
        _judge("auto", ref, ref, info=INFO, **dict(opts, labels_file=str(other)))
    with pytest.raises(InputError, match="needs --heldout to be a folder of images"):
        _judge("auto", ref, ref, info=INFO, labels_file=str(other))
