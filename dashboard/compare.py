"""Version against version: a deployment's latency before and after each device switched, per device group.

For every target device, the switch time is its first successful ``switch`` event to the deployment's
version (model = package name) after the deployment was created. Its one-minute rollups of that model in
``[switch - window, switch)`` count as *before*, those in ``[switch + 1 min, switch + window)`` as *after*
(the minute holding the switch mixes the two versions and is left out). Histograms are merged by adding
counts, per device group and over all switched devices, and p50/p95/p99 come from the merged histograms,
exactly as on the charts (:func:`edgeopt.dashboard.stats.quantiles`, 1% relative accuracy).
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import histograms
from . import models as m
from .stats import _iso, _plain, _sig, fetch_all, quantiles

WINDOWS = {"15m": timedelta(minutes=15), "1h": timedelta(hours=1), "6h": timedelta(hours=6),
           "24h": timedelta(hours=24)}
ALL = "(all switched devices)"


def _switch_times(session: Session, dep: m.Deployment, device_pks: list[int]) -> dict[int, tuple[datetime, str | None]]:
    e = m.Event
    q = (select(e.device_pk, e.ts, e.from_version).where(
        e.device_pk.in_(device_pks), e.kind == "switch", e.ok.is_(True), e.model == dep.package.name,
        e.version == dep.package.version, e.ts >= dep.created_at).order_by(e.ts))
    out: dict[int, tuple[datetime, str | None]] = {}
    for pk, ts, from_version in session.execute(q):
        out.setdefault(pk, (ts, from_version))
    return out


def deployment_latency(session: Session, dep: m.Deployment, window: timedelta = WINDOWS["1h"],
                       now: datetime | None = None) -> dict[str, Any]:
    """Before/after latency of a deployment, overall and per device group (see the module docstring)."""
    now = now or datetime.now(timezone.utc)
    model = dep.package.name
    pks = list(session.scalars(select(m.DeploymentTarget.device_pk).where(
        m.DeploymentTarget.deployment_id == dep.id)))
    switched = _switch_times(session, dep, pks) if pks else {}
    groups: dict[int, list[str]] = defaultdict(list)
    if switched:
        for pk, name in session.execute(
                select(m.DeviceGroupMember.device_pk, m.DeviceGroup.name)
                .join(m.DeviceGroup, m.DeviceGroup.id == m.DeviceGroupMember.group_id)
                .where(m.DeviceGroupMember.device_pk.in_(list(switched)))):
            groups[pk].append(name)
    labels = [ALL] + sorted({g for names in groups.values() for g in names})
    col = {g: i for i, g in enumerate(labels)}
    blobs: list[bytes] = []
    idx: list[int] = []  # 2 * label + (0 before | 1 after)
    requests = np.zeros(2 * len(labels), dtype=np.int64)
    devices: dict[int, set[int]] = defaultdict(set)
    if switched:
        r = m.Rollup1m
        lo = min(ts for ts, _ in switched.values()) - window
        hi = max(ts for ts, _ in switched.values()) + window
        q = select(r.device_pk, r.bucket_start, r.hist_counts, r.requests).where(
            r.device_pk.in_(list(switched)), r.model == model, r.bucket_start >= lo, r.bucket_start < hi)
        for pk, bucket, blob, req in fetch_all(session, q):
            ts = switched[pk][0]
            if ts - window <= bucket and bucket + timedelta(minutes=1) <= ts:
                side = 0
            elif ts + timedelta(minutes=1) <= bucket < ts + window and bucket < now:
                side = 1
            else:
                continue
            for g in [ALL] + groups.get(pk, []):
                k = 2 * col[g] + side
                blobs.append(blob)
                idx.append(k)
                requests[k] += req or 0
                devices[k].add(pk)
    H, _bad = histograms.sum_into(np.array(idx, dtype=np.int64), blobs, 2 * len(labels))
    qv = _plain(_sig(quantiles(H)), 12)
    rows = []
    for g in labels:
        side = {}
        for s, name in ((0, "before"), (1, "after")):
            k = 2 * col[g] + s
            p50, p95, p99 = qv[k]
            side[name] = {"devices": len(devices[k]), "requests": int(requests[k]), "p50": p50, "p95": p95, "p99": p99}
        b, a = side["before"]["p95"], side["after"]["p95"]
        rows.append({"group": g, **side, "p95_change": None if not (a and b) else round(a / b - 1, 4)})
    from_versions = sorted({fv for _, fv in switched.values() if fv})
    return {"deployment_id": dep.id, "model": model, "version": dep.package.version, "from_versions": from_versions,
            "window_s": int(window.total_seconds()), "targets": len(pks), "switched": len(switched),
            "switches": {"first": _iso(min((t for t, _ in switched.values()), default=None)),
                         "last": _iso(max((t for t, _ in switched.values()), default=None))},
            "groups": rows}


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparison flattened for CSV: one row per group."""
    out = []
    for r in result["groups"]:
        row = {"group": r["group"], "p95_change": r["p95_change"]}
        for side in ("before", "after"):
            for k, v in r[side].items():
                row[f"{side}_{k}"] = v
        out.append(row)
    return out


CSV_COLUMNS = ("group", "before_devices", "before_requests", "before_p50", "before_p95", "before_p99",
               "after_devices", "after_requests", "after_p50", "after_p95", "after_p99", "p95_change")
