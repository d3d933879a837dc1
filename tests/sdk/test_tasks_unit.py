"""The accuracy gate's pieces one at a time: exact values, texts and edges (issue 15, mutation testing).

Each test pins what a user sees (a failure line, a figure, a check's name) or a boundary (``>=`` vs ``>``) on
arrays of a few values built by hand, so that a changed operator or constant in ``sdk/pipeline/accuracy.py`` or
``sdk/pipeline/tasks/*`` makes one of them fail. No model runs here; the whole file takes about a second.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgeopt.sdk.errors import InputError
from edgeopt.sdk.package import MetricResult
from edgeopt.sdk.pipeline import accuracy
from edgeopt.sdk.pipeline.tasks import ModelInfo, TaskOptions, choose
from edgeopt.sdk.pipeline.tasks import base
from edgeopt.sdk.pipeline.tasks.base import (SNR_EXACT_DB, TaskEvaluator, TaskResult, at_least, batch_items, cosine,
                                              failure_line, max_drop, output_figures, per_sample_rows, snr_db)
from edgeopt.sdk.profile import AccuracyBudget

BUDGET = AccuracyBudget()


# ------------------------------------------------------------------ base: rules, lines, figures


def test_describe_with_and_without_a_reason():
    class T(TaskEvaluator):
        task = "t"

    assert T(BUDGET, ModelInfo(), TaskOptions()).describe() == "task t"
    assert T(BUDGET, ModelInfo(), TaskOptions(), "because").describe() == "task t: because"
    with pytest.raises(NotImplementedError):
        T(BUDGET, ModelInfo(), TaskOptions()).evaluate([], [])


def test_at_least_fields():
    c = at_least("m", 0.75, 0.5)
    assert (c.name, c.fp32, c.optimized, c.drop, c.bound, c.rule, c.passed) == ("m", 1.0, 0.75, 0.25, 0.5, "min", True)
    c = at_least("m", 3, 1.0, reference=4.0)
    assert (c.fp32, c.optimized, c.drop) == (4.0, 3.0, 1.0) and isinstance(c.optimized, float)
    c = at_least("m", 0.2, None)
    assert (c.bound, c.rule, c.passed) == (None, "", True)
    assert not at_least("m", math.inf, 0.5).passed and not at_least("m", -math.inf, 0.5).passed
    assert at_least("m", 0.5, 0.5).passed and not at_least("m", 0.5, 0.5000001).passed


def test_max_drop_fields_and_tolerance():
    c = max_drop("acc", 90, 85.5, 5.0)
    assert (c.name, c.fp32, c.optimized, c.drop, c.bound, c.rule, c.passed) == ("acc", 90.0, 85.5, 4.5, 5.0,
                                                                                "max_drop", True)
    assert isinstance(c.fp32, float) and isinstance(c.optimized, float)
    c = max_drop("acc", 90.0, 10.0, None)
    assert (c.rule, c.passed, c.drop) == ("", True, 80.0)
    # a drop equal to the bound up to float rounding passes; a drop one step beyond the tolerance does not
    assert max_drop("acc", 0.3, 0.0, 0.3 - 5e-13).passed
    assert not max_drop("acc", 0.3, 0.0, 0.3 - 2e-12).passed
    assert not max_drop("acc", 2.0, 0.0, 1.0).passed and max_drop("acc", 2.0, 1.0, 1.0).passed
    assert not max_drop("acc", math.inf, 0.0, 1e9).passed
    assert max_drop("acc", 1.0, 5.0, 0.0).passed  # a gain is a negative drop
    assert max_drop("acc", 1e-12, 0.0, 0.0).passed  # at exactly the bound plus the tolerance
    assert not max_drop("acc", 1.5e-12, 0.0, 0.0).passed


def test_failure_lines_exact():
    assert failure_line(at_least("top-1 agreement", 0.5, 0.99)) == "top-1 agreement 0.5000 < 0.99"
    # rounding up to the bound shows 8 digits; at exactly the rounded bound too
    assert failure_line(at_least("m", 0.89996, 0.9)) == "m 0.89996000 < 0.9"
    assert failure_line(at_least("m", 0.89994, 0.9)) == "m 0.8999 < 0.9"
    assert failure_line(max_drop("accuracy", 100.0, 87.5, 2.0)) == \
        "accuracy dropped 12.5 (100 -> 87.5), budget 2"
    assert failure_line(max_drop("map", 0.123456, 0.0, 0.05)) == "map dropped 0.1235 (0.1235 -> 0), budget 0.05"


def test_cosine_zero_vectors():
    z, one = np.zeros(3), np.ones(3)
    assert cosine(z, z) == 1.0
    assert cosine(z, one) == 0.0 and cosine(one, z) == 0.0
    assert cosine(np.array([1.0, 0.0]), np.array([0.6, 0.8])) == pytest.approx(0.6)
    assert cosine(np.array([2.0, 0.0]), np.array([-3.0, 0.0])) == pytest.approx(-1.0)
    assert isinstance(cosine(one, one), float)


def test_snr_db_limits():
    assert SNR_EXACT_DB == 99.0
    assert snr_db(np.ones(3), np.ones(3)) == 99.0
    assert snr_db(np.zeros(3), np.ones(3)) == -99.0
    assert snr_db(np.zeros(3), np.zeros(3)) == 99.0  # nothing to compare is exact
    assert snr_db(np.array([1e6]), np.array([1e6 + 1e-3])) == 99.0  # 180 dB capped at the "exact" figure
    assert snr_db(np.array([10.0, 0.0]), np.array([9.0, 0.0])) == pytest.approx(20.0)
    assert snr_db(np.array([1.0]), np.array([3.0])) == pytest.approx(10 * math.log10(1 / 4))  # negative SNR


def test_per_sample_rows_shapes():
    assert per_sample_rows(np.float32(2.0)).shape == (1, 1)
    assert per_sample_rows(np.arange(3)).shape == (1, 3)
    assert per_sample_rows(np.zeros((2, 3))).shape == (2, 3)
    rows = per_sample_rows(np.arange(24, dtype=np.int32).reshape(2, 3, 4))
    assert rows.shape == (2, 12) and rows.dtype == np.float64 and rows[1, 0] == 12.0


def test_output_figures_per_output_and_sample():
    ref = [{"a": np.array([[1.0, 0.0], [0.0, 2.0]]), "b": np.array([[3.0]])},
           {"a": np.array([[1.0, 1.0]]), "b": np.array([[3.0]])}]
    opt = [{"a": np.array([[0.6, 0.8], [0.0, 2.0]]), "b": np.array([[2.5]])},
           {"a": np.array([[1.0, 1.0]]), "b": np.array([[4.0]])}]
    figures, finite = output_figures(ref, opt)
    assert finite
    a, b = figures
    assert a.name == "a" and a.min_cosine == pytest.approx(0.6) and a.mean_cosine == pytest.approx(2.6 / 3)
    assert a.max_abs_error == pytest.approx(0.8)  # the largest over samples, not the last one
    assert a.min_snr_db == pytest.approx(10 * math.log10(1.0 / (0.16 + 0.64)))
    assert b.name == "b" and b.max_abs_error == pytest.approx(1.0) and b.min_cosine == pytest.approx(1.0)
    assert b.min_snr_db == pytest.approx(10 * math.log10(9.0 / 1.0))


def test_output_figures_missing_reshaped_and_non_finite():
    ref = [{"gone": np.ones((1, 2)), "shape": np.ones((1, 2)), "bad": np.array([[1.0, 2.0, 3.0]])}]
    opt = [{"shape": np.ones((1, 3)), "bad": np.array([[np.nan, np.inf, -np.inf]])}]
    figures, finite = output_figures(ref, opt)
    assert not finite
    gone, shape, bad = figures
    assert (gone.min_cosine, gone.mean_cosine, gone.min_snr_db, gone.max_abs_error) == (0.0, 0.0, -99.0, 0.0)
    assert (shape.min_cosine, shape.min_snr_db, shape.max_abs_error) == (0.0, -99.0, 0.0)
    # NaN and infinities read as 0 for the figures
    assert bad.max_abs_error == 3.0 and bad.min_cosine == 0.0 and bad.min_snr_db == pytest.approx(0.0)
    _, finite = output_figures([{"y": np.ones((1, 2))}], [{"y": np.array([[1.0, np.inf]])}])
    assert finite is False


def test_output_figures_empty_outputs():
    # an output of empty rows compares as exact (and has no error to take the max of)
    figures, finite = output_figures([{"empty": np.zeros((1, 0))}], [{"empty": np.zeros((1, 0))}])
    assert finite and [f.name for f in figures] == ["empty"]
    assert (figures[0].min_cosine, figures[0].max_abs_error, figures[0].min_snr_db) == (1.0, 0.0, 99.0)
    assert output_figures([], []) == ([], True)


def test_batch_items_rows_and_scalars():
    items = batch_items([{"y": np.arange(6).reshape(2, 3)}, {"y": np.array(7.0)}, {"y": np.arange(3).reshape(1, 3)},
                         {"y": np.array([8.0, 9.0])}], "y")
    assert len(items) == 6
    assert [list(np.atleast_1d(i)) for i in items] == [[0, 1, 2], [3, 4, 5], [7.0], [0, 1, 2], [8.0], [9.0]]


# ------------------------------------------------------------------ accuracy.compare with a stub evaluator


class _Stub(TaskEvaluator):
    task = "stub"

    def __init__(self, checks, **kw):
        super().__init__(BUDGET, ModelInfo(), TaskOptions(), "stubbed")
        self.result = TaskResult(checks=checks, **kw)

    def evaluate(self, reference, optimized, labels=None):
        return self.result


def _check(name, rule="", passed=True):
    return MetricResult(name=name, fp32=1.0, optimized=0.5, drop=0.5, bound=0.9 if rule else None, rule=rule,
                        passed=passed)


def test_compare_metric_is_the_first_budgeted_check_else_the_first_check():
    ref = [{"y": np.ones((1, 2))}]
    report = accuracy.compare(ref, ref, BUDGET, None, _Stub([_check("seen"), _check("decides", "min")]))
    assert report.metric.name == "decides" and report.passed
    report = accuracy.compare(ref, ref, BUDGET, None, _Stub([_check("first"), _check("second")]))
    assert report.metric.name == "first"
    assert accuracy.compare(ref, ref, BUDGET, None, _Stub([])).metric is None
    report = accuracy.compare(ref, ref, BUDGET, None, _Stub([_check("ok", "min"), _check("miss", "min", False),
                                                             _check("unbudgeted", "", False)]))
    assert not report.passed and report.failures == ["miss 0.5000 < 0.9"]
    assert (report.task, report.task_reason) == ("stub", "task stub: stubbed")
    assert report.budget == {"task": "stub"}


def test_compare_without_outputs_and_without_evaluator():
    report = accuracy.compare([], [], BUDGET, None, _Stub([], figures={"f": 2.0}, notes=["n"], top1_agreement=0.5))
    assert (report.samples, report.max_abs_error, report.min_cosine, report.mean_cosine) == (0, 0.0, 1.0, 1.0)
    assert report.outputs == [] and report.figures == {"f": 2.0} and report.notes == ["n"]
    assert report.top1_agreement == 0.5
    # no evaluator: the task is chosen from the outputs, as --task auto would
    logits = [{"logits": np.eye(4)[i][None]} for i in range(4)]
    report = accuracy.compare(logits, logits, BUDGET)
    assert report.task == "classify" and report.task_reason.startswith("task classify: one score vector")
    assert report.passed and report.metric.name == "top-1 agreement"


def test_compare_nan_line_comes_first():
    ref = [{"y": np.array([[1.0, 0.0]])}]
    budget = AccuracyBudget(min_cosine=0.5)
    ev = choose("generic", budget, ModelInfo(), TaskOptions(), ref)
    report = accuracy.compare(ref, [{"y": np.array([[np.nan, 0.0]])}], budget, None, ev)
    assert report.failures == ["the optimized model produced NaN or infinite values", "cosine of 'y' 0.0000 < 0.5"]


def test_budget_doc_of_each_task():
    b = AccuracyBudget()
    assert accuracy._budget_doc("detect", b) == {"min_map50": 0.95, "min_f1": 0.9, "detect_conf": 0.25,
                                                 "detect_nms_iou": 0.45, "max_metric_drop": b.max_metric_drop,
                                                 "task": "detect"}
    assert accuracy._budget_doc("vad", b) == {"min_frame_agreement": b.min_frame_agreement,
                                              "min_segment_f1": b.min_segment_f1, "vad_threshold": b.vad_threshold,
                                              "task": "vad"}
    assert accuracy._budget_doc("custom", b) == {"max_metric_drop": b.max_metric_drop, "task": "custom"}
    assert accuracy._budget_doc("segment", b) == {"min_mask_iou": 0.95, "mask_threshold": 0.5, "task": "segment"}
    assert accuracy._budget_doc("embed", b) == {"min_recall_at_1": 0.99, "min_embedding_cosine": 0.98,
                                                "task": "embed"}
    assert accuracy._budget_doc("classify", b) == {"min_top1_agreement": 0.99, "max_metric_drop": b.max_metric_drop,
                                                   "task": "classify"}
    assert accuracy._budget_doc("generic", b) == {"min_cosine": 0.99, "task": "generic"}
    assert accuracy._budget_doc("other", b) == {"task": "other"}


def test_dataclass_defaults():
    assert ModelInfo() == ModelInfo(input_shapes={}, output_names=[], metadata={}, class_names=None, state_outputs=[])
    assert ModelInfo().output_names is not ModelInfo().output_names  # a fresh list each time
    assert TaskOptions() == TaskOptions(task="auto", detect_format="auto", labels_file=None, sample_names=None,
                                        transforms=None, starts=None)
    r = TaskResult(checks=[])
    assert (r.figures, r.notes, r.top1_agreement) == ({}, [], None)
    assert TaskEvaluator(BUDGET, ModelInfo(), TaskOptions()).reason == ""


# ------------------------------------------------------------------ classify


from edgeopt.sdk.pipeline.tasks.classify import ClassifyEvaluator  # noqa: E402
from edgeopt.sdk.pipeline.tasks.custom import CustomEvaluator, call_metric, load_metric  # noqa: E402
from edgeopt.sdk.pipeline.tasks.embed import EmbedEvaluator  # noqa: E402
from edgeopt.sdk.pipeline.tasks.segment import SegmentEvaluator  # noqa: E402


def _classify(ref, opt, labels=None, budget=BUDGET, **kw):
    return ClassifyEvaluator(budget, ModelInfo(), TaskOptions(), **kw).evaluate(ref, opt, labels)


def _ranked(order, classes=10):
    """One sample's scores: ``order[0]`` highest, then ``order[1]``, ..."""
    row = np.zeros(classes)
    for rank, c in enumerate(order):
        row[c] = 100.0 - rank
    return row


def test_classify_top5_is_five_classes_deep():
    ref = [{"s": _ranked([0])[None]}, {"s": _ranked([0])[None]}]
    # the fp32 top class is 5th in the first optimized row, 6th in the second
    opt = [{"s": _ranked([1, 2, 3, 4, 0])[None]}, {"s": _ranked([1, 2, 3, 4, 5, 0])[None]}]
    result = _classify(ref, opt)
    assert result.figures == {"top5_agreement": 0.5} and result.top1_agreement == 0.0
    (check,) = result.checks
    assert (check.name, check.optimized, check.bound, check.rule, check.passed) == ("top-1 agreement", 0.0, 0.99,
                                                                                    "min", False)
    # fewer than five classes: every class is in the top k
    assert _classify([{"s": np.array([[3.0, 2.0, 1.0]])}], [{"s": np.array([[1.0, 2.0, 3.0]])}]).figures == \
        {"top5_agreement": 1.0}


def test_classify_nan_scores_never_win_and_output_is_chosen_by_name():
    ref = [{"aux": np.array([[9.0, 0.0, 0.0]]), "s": np.array([[0.0, 5.0, 1.0]])}]
    opt = [{"aux": np.array([[0.0, 0.0, 9.0]]), "s": np.array([[np.nan, 5.0, 1.0]])}]
    assert _classify(ref, opt, output="s").top1_agreement == 1.0
    assert _classify(ref, opt).top1_agreement == 0.0  # no name given: the first output
    assert _classify(ref, [{"aux": np.array([[0.0, 9.0, 0.0]]), "s": ref[0]["s"]}]).top1_agreement == 0.0  # first
    # a 1-D score vector is one sample; a [B, C, 1, 1] map is B samples
    assert _classify([{"s": np.array([0.0, 1.0])}], [{"s": np.array([1.0, 0.0])}]).top1_agreement == 0.0
    assert _classify([{"s": np.eye(3)}], [{"s": np.eye(3)[[0, 2, 1]]}]).top1_agreement == pytest.approx(1 / 3)
    four = np.eye(4).reshape(4, 4, 1, 1)
    assert _classify([{"s": four}], [{"s": four[[0, 1, 3, 2]]}]).top1_agreement == 0.5


def test_classify_labels_shorter_or_longer_than_the_samples():
    ref = [{"s": np.eye(4)[i][None]} for i in range(4)]
    opt = [{"s": np.eye(4)[i][None]} for i in (0, 1, 3, 3)]
    result = _classify(ref, opt, labels=np.array([0, 1, 2, 3, 0, 0]))  # extra labels are ignored
    acc, agree = result.checks
    assert (acc.name, acc.fp32, acc.optimized, acc.drop, acc.rule) == ("accuracy", 100.0, 75.0, 25.0, "max_drop")
    assert not acc.passed
    assert (agree.name, agree.optimized, agree.bound, agree.rule, agree.passed) == ("top-1 agreement", 0.75, None,
                                                                                    "", True)
    acc, _ = _classify(ref, opt, labels=[[0], [1]]).checks  # two labels: the first two samples only
    assert (acc.fp32, acc.optimized) == (100.0, 100.0) and acc.passed
    acc, _ = _classify(ref, opt, labels=np.array([1, 1, 2, 3])).checks
    assert (acc.fp32, acc.optimized, acc.drop) == (75.0, 50.0, 25.0)


# ------------------------------------------------------------------ embed


def _embed(ref, opt, budget=BUDGET, **kw):
    return EmbedEvaluator(budget, ModelInfo(), TaskOptions(), **kw).evaluate(ref, opt)


def test_embed_checks_figures_and_note():
    ref = [{"e": np.eye(8)[i][None] * (i + 1)} for i in range(8)]
    opt = [dict(r) for r in ref]
    opt[0] = {"e": np.array([[0.6, 0.8, 0, 0, 0, 0, 0, 0]])}  # still nearest to its own (cos 0.6 vs 0.8 to #1)...
    result = _embed(ref, opt)
    recall, cos = result.checks
    assert (recall.name, recall.optimized, recall.bound) == ("recall@1 in fp32 space", 7 / 8, 0.99)
    assert not recall.passed  # ...no: 0.8 to sample 1 wins, one of eight is lost
    assert (cos.name, cos.optimized, cos.bound, cos.passed) == ("embedding cosine (min)", pytest.approx(0.6), 0.98,
                                                                False)
    assert result.figures == {"embedding_cosine_mean": pytest.approx((7 + 0.6) / 8)}
    assert result.notes == []  # eight embeddings: enough
    few = _embed(ref[:7], ref[:7])
    assert few.notes == ["recall@1 over 7 embeddings only: give more held-out samples"]
    assert [c.passed for c in few.checks] == [True, True] and few.checks[1].optimized == pytest.approx(1.0)


def test_embed_zero_and_nan_embeddings_and_output_choice():
    ref = [{"other": np.ones((1, 3)), "e": np.eye(3)[i][None]} for i in range(3)]
    opt = [{"other": np.ones((1, 3)), "e": v[None]} for v in (np.eye(3)[0], np.zeros(3), np.array([np.nan, 0.0, 1.0]))]
    result = _embed(ref, opt, output="e")
    recall, cos = result.checks
    assert cos.optimized == 0.0  # a zero embedding: cosine 0, not NaN
    assert recall.optimized == pytest.approx(2 / 3)  # the zero one is lost; NaN read as 0: sample 2 finds itself
    # a 1-D embedding output is one sample
    assert _embed([{"e": np.array([1.0, 0.0])}], [{"e": np.array([2.0, 0.0])}]).checks[1].optimized == \
        pytest.approx(1.0)


# ------------------------------------------------------------------ segment


def _segment(ref, opt, budget=BUDGET, **kw):
    return SegmentEvaluator(budget, ModelInfo(), TaskOptions(), **kw).evaluate(ref, opt)


def test_segment_kinds():
    ev = SegmentEvaluator(BUDGET, ModelInfo(), TaskOptions())
    assert ev._kind(np.zeros((1, 4, 4), np.int32)) == "classes"
    assert ev._kind(np.zeros((1, 4, 4), np.uint8)) == "classes"
    assert ev._kind(np.zeros((1, 4, 4), bool)) == "classes"
    assert ev._kind(np.full((1, 1, 4, 4), -1e-3)) == "probability"
    assert ev._kind(np.full((1, 1, 4, 4), 1 + 1e-3)) == "probability"
    assert ev._kind(np.full((1, 1, 4, 4), -2e-3)) == "logit"
    assert ev._kind(np.full((1, 4, 4), 1 + 2e-3)) == "logit"  # [B, H, W]: one channel
    assert ev._kind(np.r_[np.zeros(8), [1.002]].reshape(1, 1, 3, 3)) == "logit"
    assert ev._kind(np.r_[[-0.002], np.zeros(8)].reshape(1, 1, 3, 3)) == "logit"
    assert ev._kind(np.full((1, 2, 4, 4), 3.0)) == "scores"


def test_segment_logit_map_cut_at_the_threshold_probability():
    budget = AccuracyBudget(mask_threshold=0.7, min_mask_iou=0.5)  # logit cut: log(0.7 / 0.3) = 0.847
    ref = np.full((1, 1, 2, 2), 5.0)
    opt = np.array([[[[5.0, 0.9], [0.8, -5.0]]]])  # 0.9 is above the cut, 0.8 below
    result = _segment([{"m": ref}], [{"m": opt}], budget)
    (check,) = result.checks
    assert (check.name, check.optimized, check.bound, check.passed) == ("mask IoU of 'm'", 0.5, 0.5, True)
    assert result.figures == {"mask_iou_mean[m]": 0.5}


def test_segment_probability_iou_summed_over_images_and_empty_channels():
    ref = [{"m": np.zeros((1, 2, 2, 2))}, {"m": np.zeros((1, 2, 2, 2))}]
    opt = [{"m": np.zeros((1, 2, 2, 2))}, {"m": np.zeros((1, 2, 2, 2))}]
    ref[0]["m"][0, 0] = 1.0  # 4 pixels in image 0
    opt[0]["m"][0, 0, 0] = 1.0  # 2 of them
    ref[1]["m"][0, 0, 0] = 1.0  # 2 pixels in image 1
    opt[1]["m"][0, 0, 0, 0] = np.nan  # NaN is not above the cut
    opt[1]["m"][0, 0, 0, 1] = 1.0  # found
    opt[1]["m"][0, 0, 1, 1] = 0.5  # exactly the threshold is not above it
    result = _segment(ref, opt, AccuracyBudget(min_mask_iou=0.5))
    (check,) = result.checks
    # channel 0: inter 2 + 1, union 4 + 2; channel 1 empty in both: IoU 1
    assert (check.name, check.optimized, check.passed) == ("mask IoU of 'm' channel 0", 0.5, True)
    assert result.figures == {"mask_iou_mean[m]": pytest.approx((0.5 + 1.0) / 2)}


def test_segment_one_pixel_masks():
    one = np.zeros((1, 1, 2, 2))
    one[0, 0, 0, 0] = 1.0
    empty = np.zeros((1, 1, 2, 2))
    assert _segment([{"m": one}], [{"m": one}]).checks[0].optimized == 1.0
    assert _segment([{"m": one}], [{"m": empty}]).checks[0].optimized == 0.0
    assert _segment([{"m": empty}], [{"m": empty}]).checks[0].optimized == 1.0


def test_segment_outputs_chosen_kinds_cached_and_worst_first():
    probs = np.zeros((1, 1, 4, 4))
    probs[0, 0, :2] = 0.9
    cls = np.zeros((1, 4, 4), np.int64)
    cls[0, :2] = 2
    ref = [{"vec": np.ones((1, 3)), "p": probs, "c": cls}]
    lost = cls.copy()
    lost[0, 0] = 0  # class 2: 4 of 8; class 0: 8 of 12
    result = _segment(ref, [{"vec": np.zeros((1, 3)), "p": probs, "c": lost}], AccuracyBudget(min_mask_iou=0.6))
    assert [(c.name, c.passed) for c in result.checks] == [("mIoU of 'c'", False), ("mask IoU of 'p'", True)]
    assert result.checks[0].optimized == pytest.approx((4 / 8 + 8 / 12) / 2)
    assert result.figures == {"mask_iou_mean[p]": 1.0}
    only = _segment(ref, [{"p": probs, "c": lost}], outputs=["p"])
    assert [c.name for c in only.checks] == ["mask IoU of 'p'"]
    # the kind is decided once per output, on the first reference seen
    ev = SegmentEvaluator(BUDGET, ModelInfo(), TaskOptions())
    ev.evaluate([{"p": probs}], [{"p": probs}])
    assert ev.kinds == {"p": "probability"}
    r = ev.evaluate([{"p": probs * 10}], [{"p": probs * 10}])
    assert ev.kinds == {"p": "probability"} and r.checks[0].optimized == 1.0


def test_segment_score_maps_argmax_and_empty_class_maps():
    scores = np.zeros((1, 3, 2, 2))
    scores[0, 2] = 5.0  # class 2 everywhere
    moved = scores.copy()
    moved[0, 1, 0, 0] = 9.0  # one pixel becomes class 1
    result = _segment([{"s": scores}], [{"s": moved}])
    (check,) = result.checks
    assert check.name == "mIoU of 's'" and check.optimized == pytest.approx((3 / 4 + 0 / 1) / 2)
    assert result.figures == {}
    # union over the samples: class 1 only in the second image
    a = np.zeros((1, 3, 3), np.int64)
    b = a.copy()
    b[0, 0, 0] = 1
    assert _segment([{"c": a}, {"c": b}], [{"c": a}, {"c": a}]).checks[0].optimized == \
        pytest.approx((17 / 18 + 0.0) / 2)
    from edgeopt.sdk.pipeline.tasks.segment import _miou

    assert _miou([], [], "c", "classes") == 1.0


# ------------------------------------------------------------------ custom metric


def test_load_metric_callables_and_spec_errors():
    def mine(a, b, c):
        return 1.0

    assert load_metric(mine) == (mine, "test_load_metric_callables_and_spec_errors.<locals>.mine")

    class NoName:
        def __call__(self, *a):
            return 1.0

        def __repr__(self):
            return "<no name>"

    obj = NoName()
    assert load_metric(obj) == (obj, "<no name>")
    for spec in ("mod", "mod:", ":fn"):
        with pytest.raises(InputError) as e:
            load_metric(spec)
        assert e.value.message == f"--metric {spec!r} must be MODULE:FUNCTION, e.g. my_metrics:map50"
    fn, name = load_metric("math:sqrt")
    assert fn is math.sqrt and name == "math:sqrt"
    fn, _ = load_metric("os:path.join")
    import os

    assert fn is os.path.join
    with pytest.raises(InputError) as e:
        load_metric("math:pi")
    assert e.value.message == "--metric math:pi: module 'math' has no callable 'pi'"
    with pytest.raises(InputError) as e:
        load_metric("math:nothing.here")
    assert e.value.message == "--metric math:nothing.here: module 'math' has no callable 'nothing.here'"


def test_load_metric_import_errors_and_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "m15_ok.py").write_text("def f(a, b, c):\n    return 2.0\n")
    (tmp_path / "m15_bad.py").write_text("raise ValueError('bad   module\\n' + 'x' * 300)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    import sys

    fn, name = load_metric("m15_ok:f")
    assert fn(None, None, None) == 2.0 and name == "m15_ok:f" and sys.path[0] == str(tmp_path)
    with pytest.raises(InputError) as e:
        load_metric("m15_bad:f")
    assert e.value.message == "--metric m15_bad:f: cannot import module 'm15_bad' (ValueError: bad module " + \
        "x" * (160 - len("bad module ")) + ")"
    assert e.value.hint == "run from the folder that holds the module, or put it on PYTHONPATH"
    with pytest.raises(InputError) as e:
        load_metric("m15_missing:f")
    assert e.value.message == ("--metric m15_missing:f: cannot import module 'm15_missing' (ModuleNotFoundError: "
                               "No module named 'm15_missing')")
    # the current folder is put on the path only when neither it nor '' is there
    monkeypatch.setattr("sys.path", ["", *[p for p in sys.path if p != str(tmp_path)]])
    load_metric("m15_ok:f")
    assert sys.path[0] == "" and str(tmp_path) not in sys.path
    monkeypatch.setattr("sys.path", [p for p in sys.path if p != ""] + [str(tmp_path)])
    load_metric("m15_ok:f")
    assert sys.path.count(str(tmp_path)) == 1 and sys.path[-1] == str(tmp_path)


def test_call_metric_refusals_exact():
    def boom(*a):
        raise ValueError("no   such\nkey " + "y" * 300)

    with pytest.raises(InputError) as e:
        call_metric(boom, "mine", [], [], None)
    assert e.value.message == "metric mine raised ValueError: " + ("no such key " + "y" * 300)[:200]
    assert e.value.hint == ("fix the metric: it gets (fp32_outputs, optimized_outputs, labels) and returns a number, "
                            "higher is better")
    for value, shown in ((True, "bool 'True'"), ("0.5", "str '0.5'"), (float("nan"), "float 'nan'"),
                         (float("inf"), "float 'inf'"), (None, "NoneType 'None'"), ("z" * 100, "str '" + "z" * 60 + "'")):
        with pytest.raises(InputError) as e:
            call_metric(lambda *a, v=value: v, "mine", [], [], None)
        assert e.value.message == f"metric mine returned {shown}, not a finite number"
        assert e.value.hint == "return a float, higher is better"
    got = call_metric(lambda *a: np.float32(0.5), "mine", [], [], None)
    assert got == 0.5 and type(got) is float
    assert call_metric(lambda *a: 3, "mine", [], [], None) == 3.0
    seen = []
    call_metric(lambda r, o, l: seen.append((r, o, l)) or 1.0, "mine", "R", "O", "L")
    assert seen == [("R", "O", "L")]


def test_custom_evaluator_fp32_value_cached_per_reference_list():
    calls = []

    def metric(ref, opt, labels):
        calls.append((id(ref), id(opt), labels))
        return float(sum(opt))

    ev = CustomEvaluator(BUDGET, ModelInfo(), TaskOptions(), metric=metric, metric_name="sum", max_metric_drop=1.0)
    ref, opt = [3.0], [2.5]
    result = ev.evaluate(ref, opt, "L")
    (check,) = result.checks
    assert (check.name, check.fp32, check.optimized, check.drop, check.bound, check.passed) == ("sum", 3.0, 2.5, 0.5,
                                                                                               1.0, True)
    assert calls == [(id(ref), id(ref), "L"), (id(ref), id(opt), "L")]
    calls.clear()
    assert not ev.evaluate(ref, [1.9]).checks[0].passed
    assert len(calls) == 1  # fp32's value is kept for the same list
    equal = [3.0]
    ev.fp32_value(equal, None)
    assert len(calls) == 2  # an equal but other list is measured again
    # four lists are kept: a fifth pushes the oldest out
    ev = CustomEvaluator(BUDGET, ModelInfo(), TaskOptions(), metric=metric, metric_name="sum", max_metric_drop=1.0)
    lists = [[float(i)] for i in range(5)]
    for lst in lists[:4]:
        ev.fp32_value(lst, None)
    calls.clear()
    assert [ev.fp32_value(lst, None) for lst in lists[:4]] == [0.0, 1.0, 2.0, 3.0] and calls == []
    ev.fp32_value(lists[4], None)
    assert len(calls) == 1
    ev.fp32_value(lists[1], None)
    assert len(calls) == 1  # still kept
    ev.fp32_value(lists[0], None)
    assert len(calls) == 2  # pushed out



# ------------------------------------------------------------------ vad


from edgeopt.sdk.pipeline.tasks import vad  # noqa: E402
from edgeopt.sdk.pipeline.tasks.vad import VadEvaluator, segment_f1, segments, speech_output  # noqa: E402


def test_vad_constants():
    assert (vad.NEG_MARGIN, vad.MIN_SILENCE_FRAMES, vad.MIN_SPEECH_FRAMES) == (0.15, 3, 4)


def test_speech_output_rules():
    p = [{"prob": np.array([[0.2]]), "state": np.zeros((2, 1, 64))}]
    assert speech_output(p, ["state"]) == "prob"
    assert speech_output(p, []) is None  # two candidates
    assert speech_output([{"state": np.zeros(3)}], ["state"]) is None  # none
    assert speech_output([{"p": np.array([0.1, 0.9])}], []) == "p"  # one per batch row
    assert speech_output([{"p": np.array(0.5)}], []) == "p"  # a scalar
    assert speech_output([{"p": np.array([[0.1, 0.9]])}], []) is None  # two values for one row
    assert speech_output([{"p": np.zeros((0,))}], []) is None  # empty
    assert speech_output([{"p": np.array([[-1e-6]])}, {"p": np.array([[1 + 1e-6]])}], []) == "p"
    assert speech_output([{"p": np.array([[0.5]])}, {"p": np.array([[-2e-6]])}], []) is None
    assert speech_output([{"p": np.array([[0.5]])}, {"p": np.array([[1 + 2e-6]])}], []) is None
    # only the first 64 samples are looked at
    assert speech_output([{"p": np.array([[0.5]])}] * 64 + [{"p": np.array([[7.0]])}], []) == "p"
    assert speech_output([{"p": np.array([[0.5]])}] * 63 + [{"p": np.array([[7.0]])}], []) is None


def test_segments_hysteresis_and_minimum_lengths():
    # starts at >= 0.5; ends after three frames below 0.35 (0.35 itself is not below)
    assert segments(np.array([0.5, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1]), 0.5) == [(0, 4)]
    assert segments(np.array([0.49, 0.9, 0.9, 0.9, 0.9]), 0.5) == [(1, 5)]  # open to the end
    assert segments(np.array([0.9, 0.4, 0.35, 0.36, 0.9, 0.1, 0.1]), 0.5) == [(0, 7)]  # never 3 quiet frames
    assert segments(np.array([0.9, 0.9, 0.9, 0.9, 0.34, 0.34, 0.6, 0.34, 0.34, 0.34, 0.9]), 0.5) == [(0, 7)]
    # shorter than four frames: dropped, whether closed or open
    assert segments(np.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1]), 0.5) == []
    assert segments(np.array([0.1, 0.9, 0.9, 0.9]), 0.5) == []
    assert segments(np.array([0.1, 0.9, 0.9, 0.9, 0.9]), 0.5) == [(1, 5)]
    assert segments(np.array([0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1]), 0.5) == \
        [(0, 4), (7, 11)]
    assert segments(np.array([]), 0.5) == []


def test_segment_f1_matching():
    assert segment_f1([], []) == 1.0
    assert segment_f1([(0, 10)], []) == 0.0 and segment_f1([], [(0, 10)]) == 0.0
    assert segment_f1([(0, 10)], [(0, 10)]) == 1.0
    assert segment_f1([(0, 10)], [(5, 10)]) == 1.0  # IoU exactly 0.5 matches
    assert segment_f1([(0, 10)], [(5, 11)]) == 0.0  # 5 / 11 does not
    assert segment_f1([(0, 10)], [(20, 30)]) == 0.0  # disjoint: no negative overlap
    # each optimized segment matches once: two fp32 segments over one optimized one
    assert segment_f1([(0, 10), (0, 10)], [(0, 10)]) == pytest.approx(2 * 1 / 3)
    assert segment_f1([(0, 10), (20, 30)], [(20, 30), (0, 10)]) == 1.0
    assert segment_f1([(0, 4), (0, 4)], [(0, 4), (0, 4)]) == 1.0


def _vad_steps(probs):
    """One sample per step, batch of len(column) streams."""
    return [{"p": np.asarray(row, float).reshape(-1, 1), "state": np.zeros((1, 2))} for row in probs]


def test_vad_evaluate_figures_checks_and_sequences():
    info = ModelInfo(state_outputs=["state"])
    speech = [0.9] * 5 + [0.1] * 3
    ref = _vad_steps([[p] for p in speech + speech])
    opt_probs = speech + [0.1] * 8  # the second sequence's speech is missed
    opt = _vad_steps([[p] for p in opt_probs])
    ev = VadEvaluator(BUDGET, info, TaskOptions(starts=[0, 8, 99]))  # a start past the end is ignored
    result = ev.evaluate(ref, opt)
    agree, f1 = sorted(result.checks, key=lambda c: c.name)
    assert agree.name == "frame decision agreement (p >= 0.5)" and agree.optimized == pytest.approx(11 / 16)
    assert (f1.name, f1.optimized) == ("speech segment F1", 0.5)  # 1.0 and 0.0 over the two sequences
    assert [c.name for c in result.checks] == ["speech segment F1", "frame decision agreement (p >= 0.5)"]  # lower
    assert result.figures == {"frames": 16.0, "fp32_segments": 2.0, "max_prob_error": pytest.approx(0.8)}
    assert result.notes == ["16 frames in 2 sequence(s), 2 fp32 speech segment(s)"]
    # as one sequence the two segments are one stream: F1 2/3 (one of two found)
    whole = VadEvaluator(BUDGET, info, TaskOptions()).evaluate(ref, opt)
    assert [c.optimized for c in whole.checks if c.name == "speech segment F1"] == [pytest.approx(2 / 3)]
    assert whole.notes == ["16 frames in 1 sequence(s), 2 fp32 speech segment(s)"]
    only_late = VadEvaluator(BUDGET, info, TaskOptions(starts=[50])).evaluate(ref, opt)
    assert only_late.notes == whole.notes  # no start inside the data: one sequence from 0


def test_vad_threshold_is_inclusive_and_checks_sorted_failing_first():
    info = ModelInfo(state_outputs=["state"])
    ref = _vad_steps([[0.6, 0.6]] * 6)
    opt = _vad_steps([[0.6, 0.6]] * 5 + [[0.6, 0.4]])  # one frame of twelve flips; segments unchanged
    budget = AccuracyBudget(vad_threshold=0.6, min_frame_agreement=0.95, min_segment_f1=0.9)
    result = VadEvaluator(budget, info, TaskOptions()).evaluate(ref, opt)
    assert [(c.name, c.passed) for c in result.checks] == [("frame decision agreement (p >= 0.6)", False),
                                                           ("speech segment F1", True)]
    assert result.checks[0].optimized == pytest.approx(11 / 12) and result.checks[1].optimized == 1.0
    assert result.figures["fp32_segments"] == 2.0  # one per stream (column)
    # both passing: the lower value first
    result = VadEvaluator(AccuracyBudget(vad_threshold=0.6, min_frame_agreement=0.9), info,
                          TaskOptions()).evaluate(ref, opt)
    assert [c.name for c in result.checks] == ["frame decision agreement (p >= 0.6)", "speech segment F1"]
    ok = VadEvaluator(AccuracyBudget(vad_threshold=0.6), info, TaskOptions()).evaluate(ref, ref)
    assert [c.optimized for c in ok.checks] == [1.0, 1.0] and ok.figures["max_prob_error"] == 0.0


def test_vad_without_a_probability_output_is_one_clear_error():
    ev = VadEvaluator(BUDGET, ModelInfo(state_outputs=["s"]), TaskOptions())
    with pytest.raises(InputError) as e:
        ev.evaluate([{"a": np.zeros((1, 2)), "s": np.zeros(1)}], [{"a": np.zeros((1, 2)), "s": np.zeros(1)}])
    assert e.value.message == ("--task vad needs one output (besides state outputs) with one speech probability in "
                               "[0, 1] per row; the outputs are ['a', 's']")


def test_embed_short_vectors_are_normalized_too():
    ref = [{"e": 0.5 * np.eye(8)[i][None]} for i in range(8)]
    opt = [dict(r) for r in ref]
    opt[0] = {"e": np.array([[0.3, 0.4, 0, 0, 0, 0, 0, 0]])}  # norm 0.5, cosine 0.6 to its own
    cos = _embed(ref, opt).checks[1]
    assert cos.optimized == pytest.approx(0.6)


def test_segment_reference_at_exactly_the_threshold_is_not_mask():
    ref = np.zeros((1, 1, 2, 2))
    ref[0, 0, 0] = [0.9, 0.5]  # 0.5: not above the cut
    opt = np.zeros((1, 1, 2, 2))
    opt[0, 0, 0, 0] = 0.9
    assert _segment([{"m": ref}], [{"m": opt}]).checks[0].optimized == 1.0


def test_layer_errors_skip_a_reshaped_output_and_go_on():
    class L:
        def __init__(self, name):
            self.name, self.upstream = name, []

    ref = {"a": np.ones(2), "b": np.array([1.0, 0.0])}
    opt = {"a": np.ones(3), "b": np.array([0.6, 0.8])}
    errors = accuracy.layer_errors([L("a"), L("b")], lambda f: ref, lambda f: opt, [{}])
    assert [(e.layer, round(e.error, 6)) for e in errors] == [("b", 0.4), ("a", 0.0)]
    opt = {"b": np.array([0.6, 0.8])}  # "a" missing
    errors = accuracy.layer_errors([L("a"), L("b")], lambda f: ref, lambda f: opt, [{}])
    assert [(e.layer, round(e.error, 6)) for e in errors] == [("b", 0.4), ("a", 0.0)]


def test_embed_batch_of_embeddings_in_one_sample():
    ref = [{"e": np.eye(8)}]  # one sample holding eight embeddings
    opt = [{"e": np.eye(8)[[1, 0, 2, 3, 4, 5, 6, 7]]}]
    recall, cos = _embed(ref, opt).checks
    assert recall.optimized == 0.75 and cos.optimized == 0.0
