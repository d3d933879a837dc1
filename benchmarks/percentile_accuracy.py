"""Percentile accuracy: latencies through the whole path (agent metrics -> telemetry payload -> ingest ->
1-minute / 1-hour rollups -> device and fleet series) against the exact percentiles of the same latencies.

Three distributions:
* ``recorded``: per-call latencies of the real digits CNN (tests/assets) under ONNX Runtime, measured at
  the start of this run on this (shared, noisy) machine, scaled per device;
* ``bimodal``: 70% cache hits near 3 ms, 30% misses near 40 ms;
* ``heavy-tailed``: lognormal body (median 5 ms) with a Pareto tail (alpha 1.3), 10 us .. 60 s.

Every device records its latencies with the agent's own ``ModelMetrics`` (the DDSketch-layout histogram of
telemetry schema 1.1), one telemetry payload a minute for an hour; the payloads go through the ingest's
``BatchWriter`` into a fresh database (SQLite by default, ``--db-url`` for PostgreSQL), the rollup runs, and
the dashboard's ``stats`` functions answer. "Exact" is the lower quantile of all the latencies
(``numpy.quantile(method="lower")``, DDSketch's rank q * (n - 1)). The baseline, computed in the same run
from the same latencies, is schema 1.0's 29 fixed buckets read the way the 1.0 dashboard read them.

    .venv/bin/python benchmarks/percentile_accuracy.py            # 40 devices x 60 min x 50 requests
    .venv/bin/python benchmarks/percentile_accuracy.py --json

Exits 1 when the worst relative error of p50/p95/p99 at any level is above 1%.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIGITS_ONNX = ROOT / "tests" / "assets" / "digits" / "digits_cnn.onnx"
QS = (0.5, 0.95, 0.99)
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)


def record_onnxruntime(n: int) -> np.ndarray:
    """Per-call latencies (ms) of the digits CNN under ONNX Runtime, one sample at a time."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(DIGITS_ONNX), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(50):
        sess.run(None, {inp.name: x})
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        out[i] = (time.perf_counter() - t) * 1000
    return out


def synthetic(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if name == "bimodal":
        hit = rng.random(n) < 0.7
        return np.where(hit, rng.normal(3.0, 0.3, n), rng.normal(40.0, 5.0, n)).clip(0.05)
    body = rng.lognormal(np.log(5.0), 0.6, n)
    tail = (rng.pareto(1.3, n) + 1) * 20.0
    return np.where(rng.random(n) < 0.9, body, tail).clip(0.01, 60_000)


def legacy_quantile(samples: np.ndarray, q: float) -> float:
    """Schema 1.0: 29 fixed buckets, linear interpolation inside the bucket (the 1.0 reader)."""
    from edgeopt.sdk.telemetry import LEGACY_BUCKETS_MS

    bounds = np.array(LEGACY_BUCKETS_MS)
    counts = np.bincount(np.searchsorted(bounds, samples, side="left"), minlength=len(bounds) + 1)
    rank, seen = q * counts.sum(), 0
    for i, c in enumerate(counts.tolist()):
        if c and seen + c >= rank:
            lo = bounds[i - 1] if i > 0 else 0.0
            hi = bounds[i] if i < len(bounds) else bounds[-1] * 2
            return float(lo + (hi - lo) * max(0.0, min(1.0, (rank - seen) / c)))
        seen += c
    return float(bounds[-1] * 2)


def run_distribution(name: str, base: np.ndarray | None, args, db_url: str) -> list[dict]:
    from edgeopt.agent.metrics import ModelMetrics
    from edgeopt.dashboard import stats
    from edgeopt.dashboard.db import init_db, make_engine
    from edgeopt.dashboard.ingest_writer import BatchWriter, Incoming, prepare
    from edgeopt.dashboard.rollup import RetentionSettings, run_rollup
    from edgeopt.sdk.telemetry import StatusPayload, TelemetryPayload
    from sqlalchemy.orm import Session

    init_db(db_url)
    engine = make_engine(db_url)
    rng = np.random.default_rng(7)
    per_device: dict[str, np.ndarray] = {}
    items = []
    for d in range(args.devices):
        dev = f"{name}-{d:03d}"
        factor = 1.0 + 0.04 * d  # devices differ (slower hardware), so fleet != any device
        n = args.minutes * args.requests
        lat = (rng.choice(base, n) if base is not None else synthetic(name, n, rng)) * factor
        per_device[dev] = lat
        topic = f"edgeopt/v1/bench/{dev}/"
        st = StatusPayload(device_id=dev, session_id="s", seq=0, ts=T0, state="online")
        items.append(Incoming(topic + "status", st.to_json(), T0))
        mm = ModelMetrics("m", "1.0.0")
        for k in range(args.minutes):
            for v in lat[k * args.requests:(k + 1) * args.requests].tolist():
                mm.observe(v)
            ts = T0 + timedelta(minutes=k, seconds=30)
            p = TelemetryPayload(device_id=dev, session_id="s", seq=k + 1, ts=ts, interval_s=60,
                                 models=[mm.snapshot()])
            items.append(Incoming(topic + "telemetry", p.to_json(), ts))
    now = T0 + timedelta(minutes=args.minutes + 1)
    writer = BatchWriter(engine)
    for i in range(0, len(items), 500):
        writer.write(prepare(items[i:i + 500]), now)
    run_rollup(engine, now=now, retention=RetentionSettings(raw_hours=24))
    end = T0 + timedelta(hours=1)
    everything = np.concatenate(list(per_device.values()))
    rows = []
    with Session(engine) as s:
        levels = [("fleet, 1 h rollup", everything,
                   stats.fleet_latency_series(s, T0, end, model="m", resolution="1h", max_points=1)),
                  ("fleet, 60 x 1 min rollups", everything,
                   stats.fleet_latency_series(s, T0, end, model="m", resolution="1m", max_points=1))]
        for dev in list(per_device)[:: max(1, args.devices // 4)]:
            levels.append((f"device {dev[-3:]}, 60 raw rows", per_device[dev],
                           stats.device_series(s, dev, T0, end, model="m", resolution="raw", max_points=1)))
            levels.append((f"device {dev[-3:]}, 1 h rollup", per_device[dev],
                           stats.device_series(s, dev, T0, end, model="m", resolution="1h", max_points=1)))
    engine.dispose()
    for level, samples, series in levels:
        (pt,) = series["points"]
        assert pt["requests"] == len(samples), (level, pt["requests"], len(samples))
        for q, key in zip(QS, ("p50", "p95", "p99")):
            exact = float(np.quantile(samples, q, method="lower"))
            legacy = legacy_quantile(samples, q)
            rows.append(dict(distribution=name, level=level, q=key, exact_ms=exact, got_ms=pt[key],
                             rel_err=abs(pt[key] - exact) / exact, legacy_ms=legacy,
                             legacy_rel_err=abs(legacy - exact) / exact, samples=len(samples)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=40)
    ap.add_argument("--minutes", type=int, default=60, help="telemetry payloads per device (one a minute)")
    ap.add_argument("--requests", type=int, default=50, help="latencies per payload")
    ap.add_argument("--recorded", type=int, default=20_000, help="ONNX Runtime calls to record")
    ap.add_argument("--db-url", help="database to use (default: a fresh SQLite file per distribution)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = ap.parse_args()
    if args.minutes > 60:
        ap.error("--minutes must be <= 60 (the 1-hour rollup holds one hour)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("recorded", "bimodal", "heavy-tailed"):
            base = record_onnxruntime(args.recorded) if name == "recorded" else None
            url = args.db_url or f"sqlite:///{Path(tmp) / (name + '.db')}"
            rows += run_distribution(name, base, args, url)
            if args.db_url:
                print("note: --db-url is reused: each distribution's devices have their own names",
                      file=sys.stderr)
    worst = max(r["rel_err"] for r in rows)
    worst_legacy = max(r["legacy_rel_err"] for r in rows)
    if args.json:
        print(json.dumps({"rows": rows, "worst_rel_err": worst, "worst_legacy_rel_err": worst_legacy}, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Percentile accuracy: sketch (schema 1.1) vs exact, baseline schema 1.0 buckets")
        for col in ("distribution", "level", "q", "exact ms", "1.1 ms", "1.1 err", "1.0 ms", "1.0 err",
                    "1.0/1.1 err"):
            table.add_column(col, justify="left" if col in ("distribution", "level") else "right")
        for r in rows:
            ratio = r["legacy_rel_err"] / r["rel_err"] if r["rel_err"] else float("inf")
            table.add_row(r["distribution"], r["level"], r["q"], f"{r['exact_ms']:.4f}", f"{r['got_ms']:.4f}",
                          f"{r['rel_err']:.3%}", f"{r['legacy_ms']:.4f}", f"{r['legacy_rel_err']:.2%}",
                          f"{ratio:.1f}x")
        Console(width=200).print(table)
        print(f"worst relative error: schema 1.1 sketch {worst:.3%} (target <= 1%), "
              f"schema 1.0 buckets {worst_legacy:.2%}")
    return 0 if worst <= 0.01 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
