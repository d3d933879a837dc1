"""Deployment endpoints: list, create, progress, abort, rollback."""
from __future__ import annotations

from flask import request
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from edgeopt.sdk.errors import InputError

from .. import deployments as engine
from ..models import Deployment, DeploymentTarget
from ..security import requires_role
from ..views import get_db
from ..views.deployments import do_rollback, load, refresh, start
from . import bp, ok
from .serialize import csv_response, deployment_json, parse_format


@bp.get("/deployments")
def deployments():
    rows = get_db().scalars(select(Deployment).order_by(Deployment.created_at.desc()).limit(100).options(
        selectinload(Deployment.targets).selectinload(DeploymentTarget.device),
        selectinload(Deployment.package))).all()
    return ok({"deployments": [deployment_json(d, targets=False) for d in rows]})


@bp.post("/deployments")
@requires_role("operator")
def create_deployment():
    """JSON: package_id, target {"devices": [...]} | {"group": name} | {"tag": name}, stage_percent,
    failure_threshold (share 0..1). Answers 201; a broker failure gives state "failed" and its message."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InputError("send a JSON object: {\"package_id\": 1, \"target\": {\"devices\": [\"edge-1\"]}}")
    target = body.get("target")
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in engine.TARGET_KINDS:
        raise InputError("target must be one of {\"devices\": [...]}, {\"group\": name} or {\"tag\": name}")
    kind, value = next(iter(target.items()))
    if kind == "devices" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise InputError("target.devices must be a list of device ids")
    if kind != "devices" and not isinstance(value, str):
        raise InputError(f"target.{kind} must be a name (string)")
    try:
        package_id = int(body["package_id"])
        stage_percent = int(body.get("stage_percent", 100))
        threshold = float(body.get("failure_threshold", 0.2))
    except (KeyError, TypeError, ValueError):
        raise InputError("package_id (integer) is required; stage_percent and failure_threshold are numbers") from None
    dep = start(package_id, kind, value, stage_percent, threshold)
    return ok(deployment_json(load(dep.id)), 201)


@bp.get("/deployments/<deployment_id>")
def deployment(deployment_id: str):
    dep = load(deployment_id)
    refresh(dep)
    return ok(deployment_json(dep))


@bp.get("/deployments/<deployment_id>/latency")
def deployment_latency(deployment_id: str):
    """Latency before and after each target switched to the deployment's version, per device group
    (``window`` 15m, 1h (default), 6h or 24h on each side; ``format=csv``)."""
    from .. import compare

    dep = load(deployment_id)
    window = request.args.get("window") or "1h"
    if window not in compare.WINDOWS:
        raise InputError(f"unknown window {window!r}; expected one of {', '.join(compare.WINDOWS)}")
    out = compare.deployment_latency(get_db(), dep, compare.WINDOWS[window])
    out["window"] = window
    if parse_format(request.args.get("format")) == "csv":
        return csv_response(compare.csv_rows(out), compare.CSV_COLUMNS, f"deployment-{dep.id}-latency-{window}.csv")
    return ok(out)


@bp.post("/deployments/<deployment_id>/abort")
@requires_role("operator")
def abort_deployment(deployment_id: str):
    dep = load(deployment_id)
    engine.abort(get_db(), dep)
    return ok(deployment_json(dep))


@bp.post("/deployments/<deployment_id>/rollback")
@requires_role("operator")
def rollback_deployment(deployment_id: str):
    dep = load(deployment_id)
    do_rollback(dep)
    return ok(deployment_json(dep))
