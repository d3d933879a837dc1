"""The contract's latency layout is DDSketch's: keys and values agree with the ``ddsketch`` package bit for
bit, quantiles agree with DDSketch's, and the stated 1% relative accuracy holds from 10 us to 100 s."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgeopt.sdk import telemetry as t

ddsketch = pytest.importorskip("ddsketch", reason="the test extra installs ddsketch")  # pyproject [test]


def test_keys_and_values_are_ddsketch_logarithmic_mapping():
    from ddsketch.mapping import LogarithmicMapping

    mapping = LogarithmicMapping(t.RELATIVE_ACCURACY)
    assert mapping.gamma == t.GAMMA
    rng = np.random.default_rng(1)
    values = np.concatenate([10 ** rng.uniform(-2, 5, 50_000),
                             # the bucket edges themselves, and one ulp either side
                             [mapping._pow_gamma(k) for k in range(t.SKETCH_KEY_MIN + 1, t.SKETCH_KEY_MAX)]])
    for v in values.tolist():
        for x in (v, math.nextafter(v, 0), math.nextafter(v, math.inf)):
            if t.SKETCH_MIN_MS < x < t.SKETCH_MAX_MS:
                assert t.sketch_key(x) == mapping.key(x), x
    for k in range(t.SKETCH_KEY_MIN, t.SKETCH_KEY_MAX + 1):
        assert t.sketch_value(k) == mapping.value(k)
    assert t.SKETCH_BINS == t.SKETCH_KEY_MAX - t.SKETCH_KEY_MIN + 1 == 807


def test_every_value_in_range_reads_back_within_one_percent():
    rng = np.random.default_rng(2)
    for v in np.concatenate([10 ** rng.uniform(-2, 5, 100_000), [0.01, 100_000.0]]).tolist():
        assert abs(t.sketch_value(t.sketch_key(v)) - v) <= t.RELATIVE_ACCURACY * v, v


def test_out_of_range_values_are_clamped_not_lost():
    h = t.Histogram()
    for v in (0.0, -1.0, float("nan"), 0.001, 1e9, float("inf")):
        h.observe(v)
    assert h.count == 6
    assert set(h.bins) == {t.SKETCH_KEY_MIN, t.SKETCH_KEY_MAX}
    assert h.quantile(0.0) == pytest.approx(t.SKETCH_MIN_MS, rel=0.01)
    assert h.quantile(1.0) == pytest.approx(t.SKETCH_MAX_MS, rel=0.01)


@pytest.mark.parametrize("dist", ["lognormal", "bimodal", "pareto"])
def test_quantiles_match_ddsketch_and_stay_within_one_percent(dist):
    from ddsketch import DDSketch

    rng = np.random.default_rng(3)
    if dist == "lognormal":
        xs = rng.lognormal(1.0, 1.0, 20_000)
    elif dist == "bimodal":
        xs = np.concatenate([rng.normal(2.0, 0.2, 15_000), rng.normal(40.0, 4.0, 5_000)]).clip(0.02)
    else:
        xs = (rng.pareto(1.5, 20_000) + 1) * 0.5
    xs = xs.clip(0.011, 99_000)
    ours, theirs = t.Histogram(), DDSketch(t.RELATIVE_ACCURACY)
    for x in xs.tolist():
        ours.observe(x)
        theirs.add(x)
    qs = (0.0, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)
    got = ours.quantiles(qs)
    for q, v in zip(qs, got):
        assert v == theirs.get_quantile_value(q)
        exact = float(np.quantile(xs, q, method="lower"))
        assert abs(v - exact) <= t.RELATIVE_ACCURACY * exact, (q, v, exact)


def test_merge_is_adding_counts_and_pairs_round_trip():
    a, b = t.Histogram(), t.Histogram()
    for v in (1.0, 2.0, 2.0, 300.0):
        a.observe(v)
    for v in (2.0, 5000.0):
        b.observe(v)
    m = t.Histogram().merge(a).merge(b)
    assert m.count == 6 and m.bins[t.sketch_key(2.0)] == 3
    assert m.sum_ms == pytest.approx(5307.0)
    back = t.Histogram.from_pairs(m.to_pairs(), m.sum_ms)
    assert back.bins == m.bins and back.count == 6
    assert m.to_pairs()[0::2] == sorted(m.bins)
    with pytest.raises(ValueError, match="even length"):
        t.Histogram.from_pairs([1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        t.Histogram.from_pairs([t.SKETCH_KEY_MAX + 1, 1])
    with pytest.raises(ValueError, match="out of range"):
        t.Histogram.from_pairs([0, -1])


def test_legacy_conversion_keeps_the_total_and_reads_back_the_1_0_estimate():
    counts = [0] * 29
    counts[0], counts[12], counts[28] = 7, 1001, 13  # (0, 0.05], (7.5, 10], > 10 s
    bins = t.legacy_to_bins(counts)
    assert sum(bins.values()) == 1021
    h = t.Histogram(bins)
    # the 1.0 reader: 7 + 1001 * (rank - 7) / 1001 inside (7.5, 10]
    assert h.quantile(0.5) == pytest.approx(7.5 + 2.5 * (0.5 * 1021 - 7) / 1001, rel=0.02)
    assert all(t.sketch_value(k) <= 20_000 * 1.01 for k in bins)
    with pytest.raises(ValueError, match="29 counts"):
        t.legacy_to_bins([1, 2])
