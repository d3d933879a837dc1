"""JSON shapes shared by the pages and the API (one definition, so a page and its twin agree)."""
from __future__ import annotations

import csv
import io
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from flask import Response

from edgeopt.sdk.errors import InputError

from ..deployments import IN_FLIGHT, counts
from ..models import Alert, AlertRule, Deployment, Package

RANGES = {"1h": timedelta(hours=1), "6h": timedelta(hours=6), "24h": timedelta(hours=24),
          "7d": timedelta(days=7), "30d": timedelta(days=30)}


def iso(dt: datetime | None) -> str | None:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if dt else None


def parse_range(value: str | None, now: datetime | None = None) -> tuple[str, datetime, datetime]:
    """``1h``/``6h``/``24h``/``7d``/``30d`` -> (name, start, end). Raises InputError for others."""
    name = value or "24h"
    if name not in RANGES:
        raise InputError(f"unknown range {name!r}; expected one of {', '.join(RANGES)}")
    end = now or datetime.now(timezone.utc)
    return name, end - RANGES[name], end


def package_json(p: Package, download_url: str | None = None, full: bool = False) -> dict[str, Any]:
    out = {"id": p.id, "name": p.name, "version": p.version, "profile": p.profile, "runtime": p.runtime,
           "precision": p.precision, "sha256": p.sha256, "size": p.size, "signer_key_id": p.signer_key_id,
           "uploaded_at": iso(p.uploaded_at), "uploaded_by": p.uploaded_by.username if p.uploaded_by else None}
    if download_url:
        out["download_url"] = download_url
    if full:
        out["manifest"] = p.manifest
    return out


def deployment_json(d: Deployment, targets: bool = True) -> dict[str, Any]:
    c = counts(d)
    stage_sizes = {1: sum(1 for t in d.targets if t.stage == 1), 2: sum(1 for t in d.targets if t.stage == 2)}
    value = {k: v for k, v in (d.target_value or {}).items() if k != "package_url"}
    out = {
        "id": d.id, "state": d.state, "message": d.message,
        "package": {"id": d.package.id, "name": d.package.name, "version": d.package.version,
                    "profile": d.package.profile},
        "target": {"kind": d.target_kind, **value},
        "stage_percent": d.stage_percent, "current_stage": d.current_stage,
        "stage_label": (f"stage {d.current_stage} of {2 if stage_sizes[2] else 1} "
                        f"({stage_sizes[d.current_stage]} devices)"),
        "failure_threshold": d.failure_threshold,
        "total": len(d.targets), "counts": c,
        # "active": the page keeps polling while something can still change.
        "active": d.state in ("pending", "running") or c["in_flight"] > 0,
        "created_at": iso(d.created_at), "updated_at": iso(d.updated_at), "finished_at": iso(d.finished_at),
        "created_by": d.created_by.username if d.created_by else None,
    }
    if targets:
        out["targets"] = [{"device_id": t.device.device_id, "stage": t.stage, "state": t.state,
                           "message": t.message, "command_id": t.command_id, "sent_at": iso(t.sent_at),
                           "updated_at": iso(t.updated_at), "in_flight": t.state in IN_FLIGHT}
                          for t in d.targets]
    return out


def rule_json(r: AlertRule) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "kind": r.kind, "model": r.model, "threshold_minutes": r.threshold_minutes,
            "threshold_ms": r.threshold_ms, "enabled": r.enabled, "created_at": iso(r.created_at)}


def alert_json(a: Alert) -> dict[str, Any]:
    return {"id": a.id, "rule": a.rule.name, "kind": a.rule.kind, "state": a.state,
            "device_id": a.device.device_id if a.device else None, "model": a.model, "value": a.value,
            "message": a.message, "opened_at": iso(a.opened_at), "resolved_at": iso(a.resolved_at)}


FORMATS = ("json", "csv")


def parse_format(value: str | None) -> str:
    """``format`` query argument of a chart's data: ``json`` (default) or ``csv``."""
    name = value or "json"
    if name not in FORMATS:
        raise InputError(f"unknown format {name!r}; expected one of {', '.join(FORMATS)}")
    return name


def csv_response(rows: list[dict[str, Any]], columns: tuple[str, ...], filename: str) -> Response:
    """A chart's points as CSV (one row per point, ``columns`` in order; a missing value is empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r[c] for c in columns])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", filename)[:120]
    return Response(buf.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{safe}"'})
