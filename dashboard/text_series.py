"""Text-generation figures of language models per chart point (issue 14), for :mod:`.stats`' series.

A chart point merges the stored rows that fall into it (raw rows, 1-minute, 1-hour or fleet rollups) and
that carried text figures (``generated_tokens`` not NULL; other models' rows are left out):

- ``ttft_p50`` / ``ttft_p95`` / ``tpot_p50`` / ``tpot_p95`` (ms): percentiles of the time-to-first-token and
  time-per-output-token sketches MERGED over rows (and devices), never averaged percentiles; within the
  sketch's 1% relative accuracy of the exact ones;
- ``prompt_tokens``, ``generated_tokens``, ``cancelled``: sums; ``tokens_per_s`` = generated tokens / the
  time the point covers: its step, or a raw row's telemetry interval where that is longer (a 60 s interval
  drawn at a 4 s step is 60 s of tokens, not 4); ``preemptions``: the sum over the rows that reported it, None when none did;
- ``kv_cache_usage``: the mean of the rows' values (end-of-interval shares, or a rollup's mean of them),
  ``kv_cache_peak``: the highest peak (0..1);
- device series only: ``running`` / ``waiting`` requests, the most each model reported, summed over models.

A point without any text row has every one of these None; ``text_models`` names the models with text rows.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
from sqlalchemy import Float, Integer, null

from . import histograms
from . import models as m
from . import stats as _stats

log = logging.getLogger(__name__)

DEVICE_FIELDS = ("ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95", "tokens_per_s", "prompt_tokens",
                 "generated_tokens", "kv_cache_usage", "kv_cache_peak", "running", "waiting", "cancelled",
                 "preemptions")
FLEET_FIELDS = tuple(f for f in DEVICE_FIELDS if f not in ("running", "waiting"))
NCOLS = 11  # len(columns(...))


def columns(t) -> tuple:
    """The columns to select from a telemetry table (raw, rollup or fleet rollup), in :func:`points`' order."""
    interval = null().cast(Float)  # a rollup row covers its bucket, never more than a step
    if t is m.TelemetryRaw:
        kv, peak, running, waiting = t.kv_cache_usage, t.kv_cache_peak, t.running_requests, t.waiting_requests
        interval = t.interval_s
    elif t is m.FleetRollup:
        kv, peak = t.kv_cache_usage_avg, t.kv_cache_peak_max
        running = waiting = null().cast(Integer)  # not kept fleet-wide
    else:
        kv, peak, running, waiting = t.kv_cache_usage_avg, t.kv_cache_peak_max, t.running_max, t.waiting_max
    return (t.ttft_counts, t.tpot_counts, t.prompt_tokens, t.generated_tokens, kv, peak, running, waiting,
            t.cancelled, t.preemptions, interval)


def empty_point(fleet: bool = False) -> dict[str, Any]:
    return dict.fromkeys(FLEET_FIELDS if fleet else DEVICE_FIELDS)


def points(idx: list[int], keys: list[Any], texts: list[tuple], n_pts: int, step: float,
           fleet: bool = False) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """The text figures of every point that has text rows, and the models they came from.

    ``idx[r]`` is row r's point, ``keys[r]`` its (model) or (device, model) key for the running/waiting
    maxima, ``texts[r]`` its :func:`columns` values.
    """
    rows = [(i, k, t) for i, k, t in zip(idx, keys, texts) if t[3] is not None]
    if not rows:
        return {}, []
    ti = np.array([i for i, _, _ in rows], dtype=np.int64)
    qs = (0.5, 0.95)
    merged = []
    for col in (0, 1):
        H, bad = histograms.sum_into(ti, [t[col] for _, _, t in rows], n_pts)
        if bad:
            log.warning("stats: %d malformed stored text sketches left out of a chart", bad)
        merged.append(_stats._plain(_stats._sig(_stats.quantiles(H, qs)), 12))
    sums: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    kv: dict[int, list[float]] = defaultdict(list)
    peak: dict[int, float] = {}
    most: dict[int, dict[str, dict[Any, int]]] = defaultdict(lambda: {"running": {}, "waiting": {}})
    preempt: dict[int, int] = {}
    span: dict[int, float] = {}
    for i, key, (_, _, prompt, generated, use, pk, running, waiting, cancelled, pre, interval) in rows:
        span[i] = max(span.get(i, step), float(interval or 0.0))
        s = sums[i]
        s["prompt_tokens"] += int(prompt or 0)
        s["generated_tokens"] += int(generated)
        s["cancelled"] += int(cancelled or 0)
        if use is not None:
            kv[i].append(float(use))
        if pk is not None:
            peak[i] = max(peak.get(i, 0.0), float(pk))
        for name, v in (("running", running), ("waiting", waiting)):
            if v is not None:
                got = most[i][name]
                got[key] = max(got.get(key, 0), int(v))
        if pre is not None:
            preempt[i] = preempt.get(i, 0) + int(pre)
    out: dict[int, dict[str, Any]] = {}
    for i, s in sums.items():
        (t50, t95), (o50, o95) = merged[0][i], merged[1][i]
        p = dict(ttft_p50=t50, ttft_p95=t95, tpot_p50=o50, tpot_p95=o95,
                 tokens_per_s=round(s["generated_tokens"] / span[i], 3), prompt_tokens=s["prompt_tokens"],
                 generated_tokens=s["generated_tokens"],
                 kv_cache_usage=round(sum(kv[i]) / len(kv[i]), 4) if kv.get(i) else None,
                 kv_cache_peak=round(peak[i], 4) if i in peak else None, cancelled=s["cancelled"],
                 preemptions=preempt.get(i))
        if not fleet:
            p.update(running=sum(most[i]["running"].values()) if most[i]["running"] else None,
                     waiting=sum(most[i]["waiting"].values()) if most[i]["waiting"] else None)
        out[i] = p
    models = sorted({k[-1] if isinstance(k, tuple) else k for _, k, _ in rows})
    return out, models
