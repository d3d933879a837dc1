"""Fleet and device endpoints: summary, fleet latency series, device list, detail, series, events."""
from __future__ import annotations

from flask import abort, request

from edgeopt.sdk.errors import InputError

from .. import stats
from ..text_series import DEVICE_FIELDS, FLEET_FIELDS
from ..views import get_db, int_arg
from ..views.devices import list_args
from . import bp, ok
from .serialize import csv_response, parse_format, parse_range

# The text-generation columns (language models, issue 14) come last and are empty where no text model reported.
FLEET_CSV = ("t", "p50", "p95", "p99", "requests", "errors", "throughput_ips", "devices") + FLEET_FIELDS
DEVICE_CSV = ("t", "p50", "p95", "p99", "requests", "errors", "throughput_ips", "cpu_percent", "rss_bytes",
              "queue_depth", "live_sequences") + DEVICE_FIELDS


@bp.get("/fleet")
def fleet():
    """Fleet overview: counts, profiles, package versions, slowest devices, open alerts."""
    return ok(stats.fleet_summary(get_db(), slowest=int_arg("slowest", 10, 0, 100)))


@bp.get("/fleet/series")
def fleet_series():
    """Fleet p50/p95/p99 (merged histograms), requests, errors and throughput over a range, and for language
    models TTFT / time-per-output-token percentiles (merged sketches), tokens and KV cache use
    (``format=csv``: the points as CSV)."""
    name, start, end = parse_range(request.args.get("range"))
    fmt = parse_format(request.args.get("format"))
    out = stats.fleet_latency_series(get_db(), start, end, model=request.args.get("model") or None,
                                     group=request.args.get("group") or None,
                                     profile=request.args.get("profile") or None)
    out["range"] = name
    if fmt == "csv":
        return csv_response(out["points"], FLEET_CSV, f"fleet-{out['model'] or 'all'}-{name}.csv")
    return ok(out)


@bp.get("/devices")
def devices():
    """One page of devices: q, status, profile, group, package, sort, order, page, per_page."""
    try:
        return ok(stats.list_devices(get_db(), **list_args(request.args)))
    except ValueError as exc:
        raise InputError(str(exc)) from None


@bp.get("/devices/<device_id>")
def device(device_id: str):
    d = stats.device_detail(get_db(), device_id)
    if d is None:
        abort(404, description=f"no device {device_id!r}")
    return ok(d)


@bp.get("/devices/<device_id>/series")
def device_series(device_id: str):
    """A device's latency percentiles, throughput, errors, CPU, memory and batch sizes over a range, and for
    its language models TTFT / time-per-output-token percentiles, tokens, KV cache use, running and waiting
    requests (``format=csv``: the points as CSV)."""
    name, start, end = parse_range(request.args.get("range"))
    fmt = parse_format(request.args.get("format"))
    try:
        out = stats.device_series(get_db(), device_id, start, end, model=request.args.get("model") or None)
    except LookupError:
        abort(404, description=f"no device {device_id!r}")
    totals: dict[str, int] = {}
    for p in out["points"]:
        for k, v in (p.get("batch_sizes") or {}).items():
            totals[k] = totals.get(k, 0) + int(v)
    out["range"] = name
    out["batch_sizes"] = totals
    if fmt == "csv":
        return csv_response(out["points"], DEVICE_CSV, f"{device_id}-{name}.csv")
    return ok(out)


@bp.get("/devices/<device_id>/events")
def device_events(device_id: str):
    db = get_db()
    if stats.device_detail(db, device_id) is None:
        abort(404, description=f"no device {device_id!r}")
    limit = int_arg("limit", 100, 1, 1000)
    return ok({"device_id": device_id,
               "events": stats.device_events(db, device_id, limit=limit, before_id=int_arg("before_id"))})


@bp.get("/ingest/counters")
def ingest_counters():
    """Ingest outcomes by reason, rejections included."""
    return ok(stats.ingest_counters(get_db()))


@bp.get("/groups")
def groups():
    """Device groups (with member counts) and tags: the deployment form's targets."""
    from sqlalchemy import func, select

    from ..models import DeviceGroup, DeviceGroupMember, DeviceTag

    db = get_db()
    rows = db.execute(select(DeviceGroup.name, func.count(DeviceGroupMember.device_pk))
                      .outerjoin(DeviceGroupMember, DeviceGroupMember.group_id == DeviceGroup.id)
                      .group_by(DeviceGroup.name).order_by(DeviceGroup.name)).all()
    tags = db.execute(select(DeviceTag.tag, func.count()).group_by(DeviceTag.tag).order_by(DeviceTag.tag)).all()
    return ok({"groups": [{"name": n, "devices": c} for n, c in rows],
               "tags": [{"tag": t, "devices": c} for t, c in tags]})
