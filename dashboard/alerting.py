"""Alert rules, evaluated periodically: device offline too long, p95 over a model's SLO, failed installs.

:func:`evaluate` opens one alert per (rule, device) while the condition holds and resolves it when the
condition clears; running it twice changes nothing. The ingest process runs it through
:func:`edgeopt.dashboard.deployments.tick` (at most every :data:`EVALUATE_EVERY_S`), and the alerts
page and API run it on demand, so alerts stay current even with no ingest running.

The p95 of a rule is computed from the devices' one-minute rollup histograms of the last
:data:`P95_WINDOW`, merged per device (never an average of percentiles); it lags the raw telemetry by
the rollup period (30 s in the ingest by default).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeopt.sdk.telemetry import Histogram

from . import histograms

from .models import Alert, AlertKind, AlertRule, AlertState, Device, Event, Rollup1m, utcnow
from .rollup import floor_minute

log = logging.getLogger(__name__)

EVALUATE_EVERY_S = 30.0
P95_WINDOW = timedelta(minutes=5)
INSTALL_WINDOW = timedelta(hours=24)
INSTALL_KINDS = ("download", "install", "self_test", "switch", "refused")


def _offline(session: Session, rule: AlertRule, now: datetime) -> dict[int, tuple[float, str]]:
    minutes = rule.threshold_minutes or 5.0
    cutoff = now - timedelta(minutes=minutes)
    rows = session.execute(select(Device.id, Device.device_id, Device.status_changed_at, Device.last_seen)
                           .where(Device.status == "offline")).all()
    out = {}
    for pk, dev_id, changed, seen in rows:
        since = changed or seen
        if since is not None and since <= cutoff:
            mins = (now - since).total_seconds() / 60
            out[pk] = (round(mins, 1), f"{dev_id} offline for {mins:.0f} min (limit {minutes:g} min)")
    return out


def _p95(session: Session, rule: AlertRule, now: datetime) -> dict[int, tuple[float, str]]:
    limit = rule.threshold_ms or 0.0
    # One-minute rollups, not raw rows: a handful of rows per device even with 10,000 devices.
    r = Rollup1m
    q = select(r.device_pk, r.hist_counts, r.hist_sum_ms).where(r.bucket_start >= floor_minute(now - P95_WINDOW))
    q = q.where(r.model == rule.model) if rule.model else q.where(r.model != "")
    merged: dict[int, Histogram] = defaultdict(Histogram)
    for pk, counts, sum_ms in session.execute(q):
        try:
            merged[pk].merge(histograms.unpack(counts, sum_ms or 0.0))
        except (TypeError, ValueError):
            log.warning("alerts: malformed histogram of device %s skipped", pk)
    names = dict(session.execute(select(Device.id, Device.device_id).where(Device.id.in_(list(merged)))).all()) \
        if merged else {}
    out = {}
    for pk, hist in merged.items():
        p95 = hist.quantile(0.95)
        if p95 is not None and p95 > limit:
            what = rule.model or "any model"
            out[pk] = (round(p95, 3), f"{names.get(pk, pk)}: p95 {p95:.1f} ms for {what} over the "
                                      f"{limit:g} ms SLO (last {P95_WINDOW.seconds // 60} min)")
    return out


def _install_failures(session: Session, rule: AlertRule, now: datetime) -> dict[int, tuple[float, str]]:
    q = (select(Event.device_pk, Event.kind, Event.ok, Event.message, Event.model, Event.version, Event.ts,
                Device.device_id)
         .join(Device, Device.id == Event.device_pk)
         .where(Event.kind.in_(INSTALL_KINDS), Event.ts >= now - INSTALL_WINDOW)
         .order_by(Event.device_pk, Event.ts, Event.id))
    if rule.model:
        q = q.where(Event.model == rule.model)
    latest = {}
    for row in session.execute(q):
        latest[row.device_pk] = row  # ordered by time: the last one wins
    out = {}
    for pk, ev in latest.items():
        if not ev.ok:
            out[pk] = (0.0, f"{ev.device_id}: {ev.kind} of {ev.model or '?'} {ev.version or ''} failed: "
                            f"{ev.message or 'no message'}".replace("  ", " "))
    return out


PLACEMENT_KINDS = ("placement", "install", "rollback")


def _placement(session: Session, rule: AlertRule, now: datetime) -> dict[int, tuple[float, str]]:
    """Fires while a device's latest install, rollback or placement event of a model says the runtime did not
    run it as its manifest says (nodes off the device, compute layers in another precision)."""
    q = (select(Event.device_pk, Event.kind, Event.ok, Event.message, Event.model, Event.version, Event.details,
                Device.device_id)
         .join(Device, Device.id == Event.device_pk)
         .where(Event.kind.in_(PLACEMENT_KINDS), Event.ts >= now - INSTALL_WINDOW)
         .order_by(Event.device_pk, Event.ts, Event.id))
    if rule.model:
        q = q.where(Event.model == rule.model)
    latest = {}
    for row in session.execute(q):
        latest[(row.device_pk, row.model)] = row
    out: dict[int, tuple[float, str]] = {}
    for (pk, _model), ev in latest.items():
        details = ev.details if isinstance(ev.details, dict) else {}
        placed = details.get("placement") if isinstance(details.get("placement"), dict) else {}
        if ev.kind == "placement" and not ev.ok:
            message = ev.message
        elif ev.kind != "placement" and not ev.ok and details.get("stage") == "placement":
            message = ev.message
        elif ev.kind != "placement" and ev.ok and placed.get("ok") is False:
            message = str(placed.get("message") or "")
        else:
            continue
        out[pk] = (0.0, f"{ev.device_id}: {ev.model or '?'} {ev.version or ''} does not run as its package says: "
                        f"{message or 'no message'}"[:500])
    return out


CHECKS = {AlertKind.offline.value: _offline, AlertKind.p95_slo.value: _p95,
          AlertKind.install_failure.value: _install_failures, AlertKind.placement.value: _placement}


def evaluate(session: Session, now: datetime | None = None) -> dict[str, int]:
    """Open and resolve alerts for every enabled rule; commits. Returns {"opened", "resolved"}."""
    now = now or utcnow()
    opened = resolved = 0
    rules = session.scalars(select(AlertRule)).all()
    for rule in rules:
        check = CHECKS.get(rule.kind)
        firing = check(session, rule, now) if (check and rule.enabled) else {}
        open_alerts = {a.device_pk: a for a in session.scalars(
            select(Alert).where(Alert.rule_id == rule.id, Alert.state == AlertState.open.value))}
        for pk, alert in open_alerts.items():
            if pk not in firing:
                alert.state, alert.resolved_at = AlertState.resolved.value, now
                resolved += 1
            else:
                alert.value, alert.message = firing[pk]
        for pk, (value, message) in firing.items():
            if pk not in open_alerts:
                session.add(Alert(rule_id=rule.id, device_pk=pk, state=AlertState.open.value, model=rule.model,
                                  value=value, message=message, opened_at=now))
                opened += 1
    session.commit()
    if opened or resolved:
        log.info("alerts: %d opened, %d resolved", opened, resolved)
    return {"opened": opened, "resolved": resolved}
