"""Queries behind the dashboard's pages and JSON API. Every function takes an ORM ``Session`` and returns
plain JSON-ready dicts/lists (datetimes as ISO 8601 UTC strings, latencies in ms).

Latency percentiles are always computed from MERGED histograms (counts of the contract's DDSketch layout
summed over devices and time, :class:`edgeopt.sdk.telemetry.Histogram`), never by averaging percentiles;
they are within 1% (relative) of the exact percentiles of the latencies the devices measured.

API (all keyword arguments optional unless shown):

``fleet_summary(session, now=None, slowest=10) -> dict``
    ``{"devices", "online", "offline", "profiles": [{"profile", "devices"}],
    "package_versions": [{"name", "version", "devices"}], "slowest": [device row, ...],
    "models": [str], "text_models": [str], "open_alerts": int}``
``slowest_devices(session, limit=10) -> list[dict]``
    devices ordered by their latest reported p95 (``last_p95_ms``), largest first.
``fleet_latency_series(session, start, end, model=None, group=None, profile=None, resolution=None,
max_points=300) -> dict``
    fleet p50/p95/p99 over time: ``{"resolution", "step_s", "model", "points": [{"t", "p50", "p95",
    "p99", "requests", "errors", "throughput_ips", "devices", <text fields>}], "text_models": [str]}``;
    without group/profile it reads the fleet-wide rollups, otherwise the per-device rollups of the matching
    devices. The text fields (language models, issue 14: ``ttft_p50``, ``ttft_p95``, ``tpot_p50``,
    ``tpot_p95``, ``tokens_per_s``, ``prompt_tokens``, ``generated_tokens``, ``kv_cache_usage``,
    ``kv_cache_peak``, ``cancelled``, ``preemptions``) merge the text models' sketches and counts over every
    device (:mod:`.text_series`); they are None at points where no text model reported.
``device_series(session, device_id, start, end, model=None, resolution=None, max_points=500) -> dict``
    ``{"device_id", "resolution", "step_s", "models": [str], "points": [{"t", "p50", "p95", "p99",
    "requests", "errors", "throughput_ips", "cpu_percent", "rss_bytes", "queue_depth",
    "batch_sizes", "live_sequences", <text fields>, "running", "waiting"}], "text_models": [str]}``;
    ``live_sequences`` (stateful models: streams with state on the device, the most each model reported in
    the bucket, summed over models) is None where no model reported it; the text fields are the fleet
    series' over this device's text models, plus requests running and waiting (:mod:`.text_series`);
    raises :class:`LookupError` for an unknown device.
``choose_resolution(start, end, kind="device", now=None) -> "raw" | "1m" | "1h"``
    raw only for a device range within the last hour, 1 min up to 7 days (fleet: 2 days), else 1 h.
``list_devices(session, search=None, status=None, profile=None, group=None, package=None,
sort="device_id", order="asc", page=1, per_page=50) -> dict``
    ``{"total", "page", "per_page", "pages", "items": [device row]}``; ``package`` is ``name`` or
    ``name@version``; sort keys: :data:`SORT_KEYS`.
``device_detail(session, device_id) -> dict | None``
    device row plus ``capabilities``, ``packages``, ``session_id``, ``telemetry_interval_s``,
    ``text_models`` (models that sent text-generation figures: :func:`device_text_models`).
``device_events(session, device_id, limit=100, before_id=None) -> list[dict]``
    newest first (device time); the next page is ``before_id=<last id of this page>``.
``ingest_counters(session) -> dict[str, int]``
``models_seen(session) -> list[str]``
``quantiles(counts, qs=(0.5, 0.95, 0.99)) -> numpy array``
    vectorized ``Histogram.quantiles`` over a (points, SKETCH_BINS) array of counts (NaN for empty rows).

A "device row" is ``{"device_id", "fleet", "status", "offline_reason", "last_seen", "profile",
"agent_version", "p95_ms", "cpu_percent", "rss_bytes", "groups", "tags", "packages": [{"name",
"version"}]}``.
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from sqlalchemy import Text, cast, func, or_, select
from sqlalchemy.orm import Session, selectinload

from edgeopt.sdk.telemetry import SKETCH_BINS, SKETCH_KEY_MIN, sketch_value

from . import histograms
from . import models as m
from . import text_series

log = logging.getLogger(__name__)

RES_SECONDS = {"raw": 0, "1m": 60, "1h": 3600}
SORT_KEYS = {"device_id": m.Device.device_id, "status": m.Device.status, "profile": m.Device.profile,
             "last_seen": m.Device.last_seen, "p95": m.Device.last_p95_ms,
             "agent_version": m.Device.agent_version}
MAX_PER_PAGE = 500


def _iso(dt: datetime | None) -> str | None:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if dt else None


def _aware(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise ValueError(f"naive datetime {dt!r}: pass a timezone-aware (UTC) datetime")
    return dt.astimezone(timezone.utc)


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


RAW_WINDOW = timedelta(hours=1)  # raw rows are read only for ranges inside the last hour


def choose_resolution(start: datetime, end: datetime, kind: str = "device", now: datetime | None = None) -> str:
    """The stored resolution to read for a range: raw rows only for a device range that lies within the
    last hour (the newest minute is not rolled up yet), 1-minute rollups up to 7 days (fleet: 2 days),
    else 1-hour rollups. Fleet charts never read raw rows."""
    span = (end - start).total_seconds()
    now = now or datetime.now(timezone.utc)
    if kind == "device" and start >= now - RAW_WINDOW - timedelta(seconds=1) and span <= RAW_WINDOW.total_seconds():
        return "raw"
    if span <= (7 if kind == "device" else 2) * 86400:
        return "1m"
    return "1h"


def _step(start: datetime, end: datetime, resolution: str, max_points: int) -> int:
    span = max(1.0, (end - start).total_seconds())
    base = max(RES_SECONDS[resolution], 1)
    want = span / max(1, max_points)
    # Round the step up to a whole multiple of the stored resolution so buckets never split a row.
    return int(max(base, math.ceil(want / base) * base))


def _bucket(ts: datetime, start: datetime, step: int) -> int:
    return int((ts - start).total_seconds() // step)


# -------------------------------------------------------------------------------------------- fleet
def fleet_latency_series(session: Session, start: datetime, end: datetime, *, model: str | None = None,
                         group: str | None = None, profile: str | None = None,
                         resolution: str | None = None, max_points: int = 300) -> dict[str, Any]:
    """Fleet (or one group's / profile's) latency percentiles over time from merged histograms."""
    start, end = _aware(start), _aware(end)
    res = resolution or choose_resolution(start, end, kind="fleet")
    if res == "raw":
        res = "1m"  # fleet charts never scan raw rows
    step = _step(start, end, res, max_points)
    fleetwide = group is None and profile is None
    if fleetwide:
        f = m.FleetRollup
        q = select(f.bucket_start, f.hist_counts, f.requests, f.errors, f.devices, f.model,
                   *text_series.columns(f)).where(
            f.resolution == res, f.bucket_start >= start, f.bucket_start < end)
        q = q.where(f.model == model) if model is not None else q.where(f.model != "")
    else:
        r = m.Rollup1m if res == "1m" else m.Rollup1h
        q = (select(r.bucket_start, r.hist_counts, r.requests, r.errors, r.device_pk, r.model,
                    *text_series.columns(r))
             .where(r.bucket_start >= start, r.bucket_start < end))
        q = q.where(r.model == model) if model is not None else q.where(r.model != "")
        if profile is not None:
            q = q.join(m.Device, m.Device.id == r.device_pk).where(m.Device.profile == profile)
        if group is not None:
            q = (q.join(m.DeviceGroupMember, m.DeviceGroupMember.device_pk == r.device_pk)
                 .join(m.DeviceGroup, m.DeviceGroup.id == m.DeviceGroupMember.group_id)
                 .where(m.DeviceGroup.name == group))
    rows = fetch_all(session, q)
    n_pts = max(1, int(math.ceil((end - start).total_seconds() / step)))
    idx = np.array([_bucket(row[0], start, step) for row in rows], dtype=np.int64)
    H = _sum_hists(idx, [row[1] for row in rows], n_pts)
    req = np.bincount(idx, weights=[row[2] for row in rows], minlength=n_pts)
    err = np.bincount(idx, weights=[row[3] for row in rows], minlength=n_pts)
    devs: dict[int, set[int]] = defaultdict(set)
    for i, row in zip(idx.tolist(), rows):
        devs[i].add(row[4])  # fleet-wide rows carry a device count, the others a device key
    qv = _plain(_sig(quantiles(H)), 12)
    req_l, err_l, tput = req.astype(np.int64).tolist(), err.astype(np.int64).tolist(), _plain(req / step)
    text, text_models = text_series.points(idx.tolist(), [row[5] if fleetwide else (row[4], row[5]) for row in rows],
                                           [row[6:] for row in rows], n_pts, step, fleet=True)
    no_text = text_series.empty_point(fleet=True)
    points = []
    for i in sorted(devs):
        p50, p95, p99 = qv[i]
        points.append(dict(t=_iso(start + timedelta(seconds=i * step)), p50=p50, p95=p95, p99=p99,
                           requests=req_l[i], errors=err_l[i], throughput_ips=tput[i],
                           devices=max(devs[i]) if fleetwide else len(devs[i]), **text.get(i, no_text)))
    return {"resolution": res, "step_s": step, "model": model, "group": group, "profile": profile,
            "start": _iso(start), "end": _iso(end), "points": points, "text_models": text_models,
            "markers": _fleet_markers(session, start, end, model)}


def fetch_all(session: Session, q) -> list:
    """All rows of a chart query. On PostgreSQL through a binary-format psycopg cursor: histogram bytes
    arrive as they are stored instead of hex text to decode (3x faster to fetch 1,440 rollup rows)."""
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        return conn.execute(q).all()
    compiled = q.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    with conn.connection.driver_connection.cursor(binary=True) as cur:
        return cur.execute(str(compiled), compiled.params).fetchall()


def _sum_hists(idx: np.ndarray, blobs: list[bytes | None], n_pts: int) -> np.ndarray:
    """Packed histograms summed into ``n_pts`` dense rows of SKETCH_BINS counts by row index ``idx``
    (:func:`histograms.sum_into`: one numpy call for all rows); malformed rows are left out and logged."""
    H, bad = histograms.sum_into(idx, blobs, n_pts)
    if bad:
        log.warning("stats: %d malformed stored histograms left out of a chart", bad)
    return H


def _device_row(d: m.Device, rel: dict[str, list] | None = None) -> dict[str, Any]:
    """A device's list row; ``rel`` ({"packages", "groups", "tags"}) from :func:`_related`, else the ORM
    relationships are used."""
    if rel is None:
        rel = {"packages": [(p.name, p.version) for p in d.packages], "groups": d.groups, "tags": d.tags}
    return {"device_id": d.device_id, "fleet": d.fleet, "status": d.status,
            "offline_reason": d.offline_reason, "last_seen": _iso(d.last_seen), "profile": d.profile,
            "agent_version": d.agent_version, "p95_ms": _sig_round(d.last_p95_ms),
            "cpu_percent": _round(d.last_cpu_percent, 1), "rss_bytes": d.last_rss_bytes,
            "groups": sorted(rel["groups"]), "tags": sorted(rel["tags"]),
            "packages": [{"name": n, "version": v} for n, v in sorted(rel["packages"])]}


def _related(session: Session, pks: list[int]) -> dict[int, dict[str, list]]:
    """Packages, groups and tags of a page of devices in ONE round trip (UNION ALL), not one per relation."""
    from sqlalchemy import literal, null, union_all

    out: dict[int, dict[str, list]] = {pk: {"packages": [], "groups": [], "tags": []} for pk in pks}
    if not pks:
        return out
    p, mb, g, t = m.InstalledPackage, m.DeviceGroupMember, m.DeviceGroup, m.DeviceTag
    q = union_all(
        select(p.device_pk, literal("p"), p.name, p.version).where(p.device_pk.in_(pks)),
        select(mb.device_pk, literal("g"), g.name, null()).join(g, g.id == mb.group_id).where(mb.device_pk.in_(pks)),
        select(t.device_pk, literal("t"), t.tag, null()).where(t.device_pk.in_(pks)))
    for pk, kind, a, b in session.execute(q):
        if kind == "p":
            out[pk]["packages"].append((a, b))
        else:
            out[pk]["groups" if kind == "g" else "tags"].append(a)
    return out


def _rows(session: Session, devices: list[m.Device]) -> list[dict[str, Any]]:
    rel = _related(session, [d.id for d in devices])
    return [_device_row(d, rel[d.id]) for d in devices]


def _with_related(q):
    return q.options(selectinload(m.Device.packages),
                     selectinload(m.Device.memberships).selectinload(m.DeviceGroupMember.group),
                     selectinload(m.Device.tag_rows))


def slowest_devices(session: Session, limit: int = 10) -> list[dict[str, Any]]:
    """Devices with the largest latest-reported p95, largest first."""
    q = (select(m.Device).where(m.Device.last_p95_ms.is_not(None))
         .order_by(m.Device.last_p95_ms.desc(), m.Device.device_id).limit(limit))
    return _rows(session, list(session.scalars(q)))


def fleet_summary(session: Session, now: datetime | None = None, slowest: int = 10) -> dict[str, Any]:
    """Counts for the fleet overview: status, profiles, package versions, slowest devices, alerts."""
    status = dict(session.execute(select(m.Device.status, func.count()).group_by(m.Device.status)).all())
    profiles = session.execute(select(m.Device.profile, func.count()).group_by(m.Device.profile)
                               .order_by(func.count().desc())).all()
    pkgs = session.execute(select(m.InstalledPackage.name, m.InstalledPackage.version, func.count())
                           .group_by(m.InstalledPackage.name, m.InstalledPackage.version)
                           .order_by(m.InstalledPackage.name, func.count().desc())).all()
    open_alerts = session.scalar(select(func.count()).select_from(m.Alert).where(m.Alert.state == "open"))
    return {"devices": sum(status.values()), "online": status.get("online", 0),
            "offline": status.get("offline", 0),
            "profiles": [{"profile": p, "devices": n} for p, n in profiles],
            "package_versions": [{"name": a, "version": v, "devices": n} for a, v, n in pkgs],
            "slowest": slowest_devices(session, slowest), "models": models_seen(session),
            "text_models": text_models_seen(session), "open_alerts": open_alerts or 0, "generated_at": _iso(now or datetime.now(timezone.utc))}


def models_seen(session: Session) -> list[str]:
    """Model names with fleet rollups (falls back to installed package names)."""
    names = set(session.scalars(select(m.FleetRollup.model).where(m.FleetRollup.model != "").distinct()))
    if not names:
        names = set(session.scalars(select(m.InstalledPackage.name).distinct()))
    return sorted(names)


def text_models_seen(session: Session) -> list[str]:
    """Model names whose fleet rollups hold text-generation figures (language models)."""
    f = m.FleetRollup
    return sorted(session.scalars(select(f.model).where(f.model != "", f.generated_tokens.is_not(None)).distinct()))


TEXT_RAW_WINDOW = timedelta(hours=2)  # raw rows newer than the 1-hour rollups can be (rollups run every 30 s)


def device_text_models(session: Session, pk: int, now: datetime | None = None) -> list[str]:
    """The device's models that sent text-generation figures: in its 1-hour rollups, or in its raw rows of
    the last two hours (not rolled up yet). Both reads use the (device, time) indexes."""
    from sqlalchemy import union

    now = now or datetime.now(timezone.utc)
    r, h = m.TelemetryRaw, m.Rollup1h
    q = union(select(h.model).where(h.device_pk == pk, h.generated_tokens.is_not(None)),
              select(r.model).where(r.device_pk == pk, r.ts >= now - TEXT_RAW_WINDOW, r.generated_tokens.is_not(None)))
    return sorted(session.scalars(q))


# ------------------------------------------------------------------------------------------ devices
def list_devices(session: Session, *, search: str | None = None, status: str | None = None,
                 profile: str | None = None, group: str | None = None, package: str | None = None,
                 sort: str = "device_id", order: str = "asc", page: int = 1,
                 per_page: int = 50) -> dict[str, Any]:
    """One page of the device list. Raises ValueError for an unknown sort key, order or page."""
    if sort not in SORT_KEYS:
        raise ValueError(f"unknown sort key {sort!r}; expected one of {', '.join(SORT_KEYS)}")
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', found {order!r}")
    if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
        raise ValueError(f"page must be >= 1 and per_page 1..{MAX_PER_PAGE}, found {page} and {per_page}")
    q = select(m.Device)
    if search:
        like = "%" + search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        q = q.where(func.lower(m.Device.device_id).like(like, escape="\\"))
    if status:
        q = q.where(m.Device.status == status)
    if profile:
        q = q.where(m.Device.profile == profile)
    if group:
        q = q.where(m.Device.id.in_(select(m.DeviceGroupMember.device_pk)
                                    .join(m.DeviceGroup, m.DeviceGroup.id == m.DeviceGroupMember.group_id)
                                    .where(m.DeviceGroup.name == group)))
    if package:
        name, _, version = package.partition("@")
        sub = select(m.InstalledPackage.device_pk).where(m.InstalledPackage.name == name)
        if version:
            sub = sub.where(m.InstalledPackage.version == version)
        q = q.where(m.Device.id.in_(sub))
    total = session.scalar(select(func.count()).select_from(q.order_by(None).subquery())) or 0
    col = SORT_KEYS[sort]
    key = col.asc() if order == "asc" else col.desc()
    if sort == "device_id":
        q = q.order_by(key)  # the unique index gives this order directly, even at deep offsets
    else:
        # NULLs last either way, then device_id so paging is stable. Plain ASC already puts NULLs last on
        # PostgreSQL, which keeps the (status|profile, device_id) indexes usable for that order.
        q = q.order_by(key.nulls_last(), m.Device.device_id)
    q = q.offset((page - 1) * per_page).limit(per_page)
    items = _rows(session, list(session.scalars(q)))
    return {"total": total, "page": page, "per_page": per_page,
            "pages": max(1, math.ceil(total / per_page)), "items": items}


def _device(session: Session, device_id: str) -> m.Device | None:
    return session.scalars(_with_related(select(m.Device).where(m.Device.device_id == device_id))).first()


def device_detail(session: Session, device_id: str) -> dict[str, Any] | None:
    """Everything the device page shows besides charts and events; None for an unknown device."""
    d = _device(session, device_id)
    if d is None:
        return None
    row = _device_row(d)
    row.update(capabilities=d.capabilities, session_id=d.session_id,
               telemetry_interval_s=d.telemetry_interval_s, first_seen=_iso(d.first_seen),
               text_models=device_text_models(session, d.id),
               status_changed_at=_iso(d.status_changed_at),
               packages=[{"name": p.name, "version": p.version, "profile": p.profile, "runtime": p.runtime,
                          "precision": p.precision, "sha256": p.sha256,
                          "previous_version": p.previous_version, "updated_at": _iso(p.updated_at)}
                         for p in d.packages])
    return row


def device_events(session: Session, device_id: str, limit: int = 100,
                  before_id: int | None = None) -> list[dict[str, Any]]:
    """The device's events (and status changes), newest first; page with ``before_id``."""
    q = (select(m.Event).join(m.Device, m.Device.id == m.Event.device_pk)
         .where(m.Device.device_id == device_id).order_by(m.Event.ts.desc(), m.Event.id.desc())
         .limit(min(limit, 1000)))
    if before_id is not None:
        # Keyset paging in (ts, id) order: the events after the one with id ``before_id``.
        bts = session.scalar(select(m.Event.ts).where(m.Event.id == before_id))
        if bts is None:
            return []
        q = q.where(or_(m.Event.ts < bts, (m.Event.ts == bts) & (m.Event.id < before_id)))
    return [{"id": e.id, "ts": _iso(e.ts), "kind": e.kind, "ok": e.ok, "model": e.model,
             "version": e.version, "from_version": e.from_version, "message": e.message,
             "command_id": e.command_id, "deployment_id": e.deployment_id, "details": e.details,
             "session_id": e.session_id, "seq": e.seq} for e in session.scalars(q)]


_VALUES = np.array([sketch_value(SKETCH_KEY_MIN + i) for i in range(SKETCH_BINS)], dtype=np.float64)


def quantiles(counts: np.ndarray, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> np.ndarray:
    """Vectorized :meth:`Histogram.quantiles` for a (points, SKETCH_BINS) array of dense counts: the value
    of the lowest key whose running count exceeds q * (count - 1), NaN for empty rows. Returns
    (points, len(qs))."""
    counts = np.asarray(counts)
    out = np.full((counts.shape[0], len(qs)), np.nan)
    used = np.flatnonzero(counts.any(axis=0))
    if not len(used):
        return out
    lo = int(used[0])
    counts = counts[:, lo:int(used[-1]) + 1].astype(np.float64)  # only the keys present: a narrow band
    total = counts.sum(axis=1)
    cum = np.cumsum(counts, axis=1)
    for j, q in enumerate(qs):
        rank = q * (total - 1)
        idx = (cum > rank[:, None]).argmax(axis=1)
        out[:, j] = np.where(total > 0, _VALUES[lo + idx], np.nan)
    return out


LATENCY_DIGITS = 5  # significant digits of a latency in answers: 0.002% rounding, far inside the sketch's 1%


def _sig(a: np.ndarray, digits: int = LATENCY_DIGITS) -> np.ndarray:
    """Rounded to ``digits`` significant digits (a fixed number of decimals would cost a 25 us p50 2%)."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(np.isfinite(a) & (a != 0), np.floor(np.log10(np.abs(a))), 0.0)
        scale = 10.0 ** (digits - 1 - mag)
        return np.where(np.isfinite(a), np.round(a * scale) / scale, a)


def _sig_round(x: float | None) -> float | None:
    return None if x is None else float(_sig(np.array([x]))[0])


def _plain(a: np.ndarray, nd: int = 3) -> list:
    """A numpy array rounded to ``nd`` places as nested Python lists, NaN as None."""
    a = np.round(np.asarray(a, dtype=np.float64), nd)
    out = a.tolist()
    if np.isnan(a).any():
        nan = np.isnan(a)
        if a.ndim == 1:
            out = [None if n else x for x, n in zip(out, nan.tolist())]
        else:
            out = [[None if n else x for x, n in zip(row, nrow)] for row, nrow in zip(out, nan.tolist())]
    return out


def _bulk_json(texts: list[str | None], empty: str) -> list:
    """Decode many small JSON documents with ONE json.loads call (per-row decoding dominated the charts)."""
    return json.loads("[" + ",".join(t if t else empty for t in texts) + "]") if texts else []


def device_series(session: Session, device_id: str, start: datetime, end: datetime, *,
                  model: str | None = None, resolution: str | None = None,
                  max_points: int = 500) -> dict[str, Any]:
    """One device's charts over [start, end): merged percentiles, throughput, errors, batch sizes, CPU, RSS."""
    start, end = _aware(start), _aware(end)
    pk = session.scalar(select(m.Device.id).where(m.Device.device_id == device_id))
    if pk is None:
        raise LookupError(f"unknown device {device_id!r}")
    res = resolution or choose_resolution(start, end)
    step = _step(start, end, res, max_points)
    if res == "raw":
        t = m.TelemetryRaw
        tcol, cols = t.ts, (t.cpu_percent, t.rss_bytes, t.queue_depth, t.live_sequences)
    else:
        t = m.Rollup1m if res == "1m" else m.Rollup1h
        tcol, cols = t.bucket_start, (t.cpu_avg, t.rss_avg, t.queue_depth_max, t.live_sequences_max)
    # JSON columns come back as text and are decoded in bulk below.
    q = (select(tcol, t.model, t.hist_counts, t.hist_sum_ms, t.requests, t.errors, *cols,
                cast(t.batch_sizes, Text), *text_series.columns(t))
         .where(t.device_pk == pk, tcol >= start, tcol < end).order_by(tcol))
    if model is not None:
        q = q.where(t.model == model)
    rows = fetch_all(session, q)
    n_pts = max(1, int(math.ceil((end - start).total_seconds() / step)))
    idx = np.array([_bucket(r[0], start, step) for r in rows], dtype=np.int64)
    has_model = np.array([bool(r[1]) for r in rows], dtype=bool)
    H = _sum_hists(idx, [r[2] if r[1] else None for r in rows], n_pts)
    req = np.bincount(idx, weights=[r[4] if r[1] else 0 for r in rows], minlength=n_pts)
    err = np.bincount(idx, weights=[r[5] if r[1] else 0 for r in rows], minlength=n_pts)
    seen = np.bincount(idx, minlength=n_pts) > 0
    cpu_v = [(i, r[6]) for i, r in zip(idx, rows) if r[6] is not None]
    rss_v = [(i, r[7]) for i, r in zip(idx, rows) if r[7] is not None]
    cpu_s = np.bincount([i for i, _ in cpu_v], weights=[v for _, v in cpu_v], minlength=n_pts)
    cpu_n = np.bincount([i for i, _ in cpu_v], minlength=n_pts)
    rss_s = np.bincount([i for i, _ in rss_v], weights=[v for _, v in rss_v], minlength=n_pts)
    rss_n = np.bincount([i for i, _ in rss_v], minlength=n_pts)
    queue = np.zeros(n_pts, dtype=np.int64)
    batch: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    # live sequences: the most each model reported in the bucket, summed over the device's models
    live: dict[int, dict[str, int]] = defaultdict(dict)
    for i, r, b in zip(idx, rows, _bulk_json([r[10] if r[1] else None for r in rows], "{}")):
        if r[1]:
            queue[i] = max(queue[i], r[8] or 0)
            for k, v in b.items():
                batch[i][k] += int(v)
            if r[9] is not None:
                live[i][r[1]] = max(live[i].get(r[1], 0), int(r[9]))
    # Whole columns to plain Python once: per-point numpy scalar access cost more than the maths.
    qv = _plain(_sig(quantiles(H)), 12)
    req_l, err_l, tput = req.astype(np.int64).tolist(), err.astype(np.int64).tolist(), _plain(req / step)
    with np.errstate(invalid="ignore", divide="ignore"):
        cpu_l = _plain(cpu_s / cpu_n, 1)
        rss_l = [None if x is None else int(x) for x in _plain(rss_s / rss_n, 0)]
    queue_l = queue.tolist()
    text, text_models = text_series.points(idx.tolist(), [r[1] for r in rows], [r[11:] for r in rows], n_pts, step)
    no_text = text_series.empty_point()
    points = []
    for i in np.nonzero(seen)[0].tolist():
        p50, p95, p99 = qv[i]
        points.append(dict(t=_iso(start + timedelta(seconds=i * step)), p50=p50, p95=p95, p99=p99,
                           requests=req_l[i], errors=err_l[i], throughput_ips=tput[i], cpu_percent=cpu_l[i],
                           rss_bytes=rss_l[i], queue_depth=queue_l[i], batch_sizes=dict(batch.get(i, {})),
                           live_sequences=sum(live[i].values()) if i in live else None,
                           **text.get(i, no_text)))
    models = sorted({r[1] for r, hm in zip(rows, has_model) if hm})
    return {"device_id": device_id, "resolution": res, "step_s": step, "model": model,
            "models": models, "text_models": text_models, "start": _iso(start), "end": _iso(end),
            "points": points, "markers": _device_markers(session, pk, start, end, model)}


MARKER_KINDS = ("switch", "rollback")
MAX_MARKERS = 200


def _device_markers(session: Session, pk: int, start: datetime, end: datetime, model: str | None) -> list[dict]:
    """Version changes of a device in [start, end) for the charts: successful switches and rollbacks."""
    e = m.Event
    q = (select(e.ts, e.kind, e.model, e.version, e.from_version)
         .where(e.device_pk == pk, e.kind.in_(MARKER_KINDS), e.ok.is_(True), e.ts >= start, e.ts < end)
         .order_by(e.ts).limit(MAX_MARKERS))
    if model is not None:
        q = q.where(e.model == model)
    return [{"t": _iso(ts), "kind": kind, "model": mo, "version": v, "from_version": fv,
             "label": f"{mo or ''} {fv + ' -> ' if fv else ''}{v or ''}".strip()}
            for ts, kind, mo, v, fv in session.execute(q)]


def _fleet_markers(session: Session, start: datetime, end: datetime, model: str | None) -> list[dict]:
    """Deployments created in [start, end) for the fleet chart: package and version."""
    d, p = m.Deployment, m.Package
    q = (select(d.created_at, d.id, p.name, p.version).join(p, p.id == d.package_id)
         .where(d.created_at >= start, d.created_at < end).order_by(d.created_at).limit(MAX_MARKERS))
    if model is not None:
        q = q.where(p.name == model)
    return [{"t": _iso(ts), "kind": "deployment", "deployment_id": did, "model": name, "version": version,
             "label": f"deploy {name} {version}"} for ts, did, name, version in session.execute(q)]


def ingest_counters(session: Session) -> dict[str, int]:
    """Ingest outcome counters by reason (accepted kinds and rejection reasons)."""
    return dict(session.execute(select(m.IngestCounter.reason, m.IngestCounter.count)
                                .order_by(m.IngestCounter.reason)).all())
