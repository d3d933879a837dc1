"""Every budget rule on its own, with a budget placed where only the right rule decides correctly.

A test of "the minimum decides, not the mean" must put the bound BETWEEN the two (a bound below both, or
above both, passes or fails either way and catches nothing). The figures are built by hand so each expected
value is exact.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgeopt.sdk.pipeline import accuracy
from edgeopt.sdk.pipeline.tasks import ModelInfo, TaskOptions, choose, failure_line
from edgeopt.sdk.pipeline.tasks.base import at_least, max_drop
from edgeopt.sdk.profile import AccuracyBudget


def _judge(task, ref, opt, budget, labels=None):
    ev = choose(task, budget, ModelInfo(), TaskOptions(), ref)
    return accuracy.compare(ref, opt, budget, labels, ev)


def _unit_pair(cos: float, dim: int = 4):
    """Two vectors of ``dim`` values whose cosine is exactly ``cos`` (up to float rounding)."""
    a = np.zeros(dim)
    a[0] = 1.0
    b = np.zeros(dim)
    b[0], b[1] = cos, math.sqrt(1 - cos * cos)
    return a, b


# ------------------------------------------------------------------ generic: the minimum over samples


def test_generic_cosine_budget_between_min_and_mean_fails_on_the_minimum():
    a, b = _unit_pair(0.5)
    ref = [{"y": a[None]} for _ in range(10)]
    opt = [{"y": a[None]} for _ in range(9)] + [{"y": b[None]}]  # one sample at 0.5, nine exact: mean 0.95
    report = _judge("generic", ref, opt, AccuracyBudget(min_cosine=0.9))
    assert report.outputs[0].mean_cosine == pytest.approx(0.95)
    assert report.outputs[0].min_cosine == pytest.approx(0.5)
    assert not report.passed
    assert report.metric.optimized == pytest.approx(0.5) and report.metric.bound == 0.9
    assert report.failures == ["cosine of 'y' 0.5000 < 0.9"]
    # and below the minimum it passes: the rule is "every sample", nothing stricter
    assert _judge("generic", ref, opt, AccuracyBudget(min_cosine=0.49)).passed


def test_report_cosines_are_min_and_mean_over_outputs_and_samples():
    a, b = _unit_pair(0.8)
    c, d = _unit_pair(0.6)
    ref = [{"p": a[None], "q": c[None]}, {"p": a[None], "q": c[None]}]
    opt = [{"p": b[None], "q": c[None]}, {"p": a[None], "q": d[None]}]
    report = _judge("generic", ref, opt, AccuracyBudget(min_cosine=0.5))
    p, q = report.outputs
    assert (p.name, p.min_cosine, p.mean_cosine) == ("p", pytest.approx(0.8), pytest.approx(0.9))
    assert (q.name, q.min_cosine, q.mean_cosine) == ("q", pytest.approx(0.6), pytest.approx(0.8))
    assert report.min_cosine == pytest.approx(0.6)  # worst output, worst sample
    assert report.mean_cosine == pytest.approx((0.9 + 0.8) / 2)  # mean of the outputs' means
    assert report.passed and report.samples == 2
    # checks: one per output, the worst first (it decides)
    assert [ch.name for ch in report.checks] == ["cosine of 'q'", "cosine of 'p'"]


def test_per_output_max_abs_error_and_snr():
    ref = [{"big": np.array([[100.0, 0.0]]), "small": np.array([[1.0, 1.0]])}]
    opt = [{"big": np.array([[99.0, 0.0]]), "small": np.array([[1.0, 0.5]])}]
    report = _judge("generic", ref, opt, AccuracyBudget(min_cosine=0.0))
    big, small = report.outputs
    assert big.max_abs_error == pytest.approx(1.0) and small.max_abs_error == pytest.approx(0.5)
    assert report.max_abs_error == pytest.approx(1.0)
    assert big.min_snr_db == pytest.approx(10 * math.log10(100.0 ** 2 / 1.0))  # 40 dB
    assert small.min_snr_db == pytest.approx(10 * math.log10(2.0 / 0.25))
    assert report.figures["snr_db[small]"] == pytest.approx(small.min_snr_db)


def test_missing_or_reshaped_output_counts_as_cosine_zero():
    ref = [{"y": np.ones((1, 4)), "z": np.ones((1, 4))}]
    report = _judge("generic", ref, [{"y": np.ones((1, 4)), "z": np.ones((1, 5))}], AccuracyBudget(min_cosine=0.1))
    assert report.outputs[1].min_cosine == 0.0 and not report.passed
    report = _judge("generic", ref, [{"y": np.ones((1, 4))}], AccuracyBudget(min_cosine=0.1))
    assert [o.min_cosine for o in report.outputs] == [pytest.approx(1.0), 0.0] and not report.passed


# ------------------------------------------------------------------ classify


def _logits(tops, classes=10):
    return [{"logits": np.eye(classes)[t][None] * 5.0} for t in tops]


def test_classify_top1_agreement_bound_is_inclusive_and_exact():
    ref = _logits(list(range(10)))
    opt = _logits([1] + list(range(1, 10)))  # 9 of 10 agree
    assert _judge("classify", ref, opt, AccuracyBudget(min_top1_agreement=0.9)).passed
    report = _judge("classify", ref, opt, AccuracyBudget(min_top1_agreement=0.91))
    assert not report.passed and report.top1_agreement == pytest.approx(0.9)
    assert report.failures == ["top-1 agreement 0.9000 < 0.91"]


def test_classify_with_labels_the_accuracy_drop_decides_not_the_agreement():
    ref = _logits(list(range(10)))
    opt = _logits([1] + list(range(1, 10)))
    labels = np.arange(10)
    # agreement 0.9 is far below its bound, but with labels accuracy decides: 100 -> 90 is a 10 point drop
    report = _judge("classify", ref, opt, AccuracyBudget(min_top1_agreement=0.99, max_metric_drop=10.0), labels)
    assert report.passed and report.metric.name == "accuracy" and report.metric.drop == pytest.approx(10.0)
    report = _judge("classify", ref, opt, AccuracyBudget(max_metric_drop=9.99), labels)
    assert not report.passed
    assert report.failures == ["accuracy dropped 10 (100 -> 90), budget 9.99"]


# ------------------------------------------------------------------ segment: the worst channel


def test_segment_worst_channel_decides_not_the_mean():
    ref = np.zeros((1, 2, 10, 10))
    ref[0, :, :5] = 0.9  # 50 pixels per channel
    opt = ref.copy()
    opt[0, 1, :5, :5] = 0.1  # channel 1 keeps 25 of 50: IoU 0.5; channel 0 exact: mean 0.75
    report = _judge("segment", [{"m": ref}], [{"m": opt}], AccuracyBudget(min_mask_iou=0.7))
    assert not report.passed
    assert report.metric.name == "mask IoU of 'm' channel 1" and report.metric.optimized == pytest.approx(0.5)
    assert report.figures["mask_iou_mean[m]"] == pytest.approx(0.75)
    assert _judge("segment", [{"m": ref}], [{"m": opt}], AccuracyBudget(min_mask_iou=0.5)).passed


def test_segment_mask_threshold_is_the_cut():
    ref = np.full((1, 1, 4, 4), 0.9)
    opt = np.full((1, 1, 4, 4), 0.6)
    assert _judge("segment", [{"m": ref}], [{"m": opt}], AccuracyBudget(mask_threshold=0.5, min_mask_iou=1.0)).passed
    report = _judge("segment", [{"m": ref}], [{"m": opt}], AccuracyBudget(mask_threshold=0.7, min_mask_iou=0.5))
    assert not report.passed and report.metric.optimized == 0.0


# ------------------------------------------------------------------ embed: the worst embedding


def test_embed_cosine_budget_is_the_minimum_over_embeddings():
    rng = np.random.default_rng(0)
    ref = [{"embedding": rng.standard_normal((1, 32))} for _ in range(10)]
    opt = [dict(r) for r in ref]
    # one embedding moved to cosine 0.6 with its fp32 self, still nearest to it: recall@1 stays 1.0
    v = ref[0]["embedding"][0]
    ortho = rng.standard_normal(32)
    ortho -= (ortho @ v) / (v @ v) * v
    ortho *= np.linalg.norm(v) / np.linalg.norm(ortho)
    opt[0] = {"embedding": (0.6 * v + 0.8 * ortho)[None]}
    budget = AccuracyBudget(min_recall_at_1=1.0, min_embedding_cosine=0.9)  # mean cosine is 0.96
    report = _judge("embed", ref, opt, budget)
    assert report.task == "embed"
    recall, cos = report.checks
    assert recall.passed and recall.optimized == 1.0
    assert cos.name == "embedding cosine (min)" and cos.optimized == pytest.approx(0.6) and not cos.passed
    assert report.figures["embedding_cosine_mean"] == pytest.approx(0.96)
    assert not report.passed


# ------------------------------------------------------------------ the rule helpers and the score


def test_rule_helpers_edges():
    assert at_least("m", 0.9, 0.9).passed and not at_least("m", 0.8999999, 0.9).passed
    assert not at_least("m", float("nan"), 0.0).passed  # NaN never passes a bound
    assert at_least("m", 0.1, None).passed and at_least("m", 0.1, None).rule == ""
    assert max_drop("acc", 90.0, 89.0, 1.0).passed and not max_drop("acc", 90.0, 88.9, 1.0).passed
    assert not max_drop("acc", 90.0, float("nan"), 1.0).passed
    # rounding would print 0.9000 for a miss just under 0.9: the digits that matter are shown
    assert failure_line(at_least("m", 0.89999, 0.9)) == "m 0.89999000 < 0.9"


def test_score_is_the_least_slack():
    a, b = _unit_pair(0.5)
    ref = [{"y": a[None], "z": a[None]}]
    report = _judge("generic", ref, [{"y": b[None], "z": a[None]}], AccuracyBudget(min_cosine=0.4))
    assert accuracy.score(report) == pytest.approx(0.5 - 0.4)
    report = _judge("classify", _logits([1, 2]), _logits([1, 3]), AccuracyBudget(max_metric_drop=60.0),
                    labels=np.array([1, 2]))
    assert accuracy.score(report) == pytest.approx(60.0 - 50.0)


# ------------------------------------------------------------------ per-layer error (the sensitivity ranking)


class _Layer:
    def __init__(self, name, upstream=()):
        self.name, self.upstream = name, list(upstream)


def test_layer_errors_are_the_error_each_layer_adds_over_its_worst_upstream():
    ref = {"a": np.array([1.0, 0.0]), "b": np.array([1.0, 0.0]), "c": np.array([1.0, 0.0]),
           "zero": np.zeros(2), "dead": np.zeros(2), "reshaped": np.ones(3), "gone": np.ones(2)}
    opt = {"a": np.array([1.0, 0.0]), "b": np.array([0.6, 0.8]), "c": np.array([0.0, 1.0]),
           "zero": np.zeros(2), "dead": np.array([0.0, 1.0]), "reshaped": np.ones(4)}
    layers = [_Layer("gone"), _Layer("a"), _Layer("b", ["a"]), _Layer("c", ["b", "a"]), _Layer("zero"),
              _Layer("dead", ["zero"]), _Layer("reshaped")]
    errors = accuracy.layer_errors(layers, lambda f: ref, lambda f: opt, [{}])
    got = {e.layer: e.error for e in errors}
    assert got["a"] == pytest.approx(0.0) and got["b"] == pytest.approx(0.4)
    assert got["c"] == pytest.approx(1.0 - 0.4)  # raw error 1.0, of which 0.4 came from upstream b
    assert got["zero"] == 0.0 and got["dead"] == 1.0  # zero vs zero: no error; zero vs something: all error
    # most harmful first; layers that could not be compared last, in graph order, with no error
    assert [e.layer for e in errors] == ["dead", "c", "b", "a", "zero", "gone", "reshaped"]
    assert got["gone"] == 0.0 and got["reshaped"] == 0.0


def test_layer_errors_accumulate_over_feeds_and_ignore_nan():
    feeds = [{"i": 0}, {"i": 1}]
    refs = [{"x": np.array([1.0, 0.0])}, {"x": np.array([0.0, 3.0])}]
    opts = [{"x": np.array([1.0, 0.0])}, {"x": np.array([np.nan, 3.0])}]
    (e,) = accuracy.layer_errors([_Layer("x")], lambda f: refs[f["i"]], lambda f: opts[f["i"]], feeds)
    assert e.error == pytest.approx(0.0)  # one cosine over both feeds' dot products; NaN read as 0
    opts[1] = {"x": np.array([0.0, -3.0])}
    (e,) = accuracy.layer_errors([_Layer("x")], lambda f: refs[f["i"]], lambda f: opts[f["i"]], feeds)
    assert e.error == pytest.approx(1.0 - (1.0 - 9.0) / 10.0)  # dot 1-9, norms 10 and 10


# ------------------------------------------------------------------ what the report carries


def test_report_budget_lists_the_task_keys_only():
    budget = AccuracyBudget(min_cosine=0.5, min_top1_agreement=0.7, max_metric_drop=2.0)
    a, _ = _unit_pair(0.9)
    assert _judge("generic", [{"y": a[None]}], [{"y": a[None]}], budget).budget == {"min_cosine": 0.5,
                                                                                   "task": "generic"}
    report = _judge("classify", _logits([1]), _logits([1]), budget)
    assert report.budget == {"min_top1_agreement": 0.7, "max_metric_drop": 2.0, "task": "classify"}
    seg = np.zeros((1, 1, 8, 8))
    assert set(_judge("segment", [{"m": seg}], [{"m": seg}], budget).budget) == {"min_mask_iou", "mask_threshold",
                                                                                  "task"}
    emb = [{"embedding": np.eye(4)[i][None]} for i in range(4)]
    assert set(_judge("embed", emb, emb, budget).budget) == {"min_recall_at_1", "min_embedding_cosine", "task"}


def test_samples_count_batch_rows_and_metric_is_the_first_budgeted_check():
    ref = [{"y": np.ones((3, 4))}, {"y": np.ones((2, 4))}, {"y": np.float64(1.0)}]
    report = _judge("generic", ref, ref, AccuracyBudget(min_cosine=0.5))
    assert report.samples == 3 + 2 + 1  # rows of axis 0; a scalar output is one sample
    labels = np.arange(2)
    report = _judge("classify", _logits([0, 1]), _logits([0, 1]), AccuracyBudget(), labels)
    assert [c.name for c in report.checks] == ["accuracy", "top-1 agreement"]
    assert report.metric.name == "accuracy" and report.checks[1].rule == ""  # reported, not budgeted
    assert report.top1_agreement == 1.0


def test_score_without_budgeted_checks_is_the_min_cosine_and_nan_scores_lowest():
    from edgeopt.sdk.package import MetricResult, ValidationReport

    report = ValidationReport(samples=1, max_abs_error=0.0, min_cosine=0.75, mean_cosine=0.8, passed=True,
                              checks=[MetricResult(name="m", fp32=1.0, optimized=0.5, drop=0.5, bound=None,
                                                   rule="", passed=True)])
    assert accuracy.score(report) == 0.75
    nan = report.model_copy(update={"checks": [at_least("m", float("nan"), 0.5)]})
    assert accuracy.score(nan) == -1e9
    drop = report.model_copy(update={"checks": [max_drop("acc", 90.0, 88.0, 3.0), at_least("m", 0.9, 0.5)]})
    assert accuracy.score(drop) == pytest.approx(min(3.0 - 2.0, 0.9 - 0.5))
