"""Deployments: list, new (package + target + staged rollout), live progress, abort, rollback."""
from __future__ import annotations

import logging

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from edgeopt.sdk.errors import EdgeoptError, InputError, UnavailableError

from .. import deployments as engine
from ..models import Deployment, DeploymentTarget, DeviceGroup, DeviceTag, Package
from ..mqtt_publish import mqtt_publisher
from ..security import requires_role
from . import get_db
from .auth import ActionForm

log = logging.getLogger(__name__)
bp = Blueprint("deployments", __name__)


def load(deployment_id: str) -> Deployment:
    dep = get_db().scalar(select(Deployment).where(Deployment.id == deployment_id).options(
        selectinload(Deployment.targets).selectinload(DeploymentTarget.device), selectinload(Deployment.package)))
    if dep is None:
        abort(404, description=f"no deployment {deployment_id!r}")
    return dep


def command_signer():
    """The dashboard's command signer, loaded once per app (see edgeopt.dashboard.command_signing)."""
    from pathlib import Path

    from ..command_signing import load_signer

    signer = current_app.extensions.get("edgeopt_command_signer")
    if signer is None:
        signer = load_signer(Path(current_app.instance_path), current_app.config.get("COMMAND_TTL_S"))
        current_app.extensions["edgeopt_command_signer"] = signer
    return signer


def start(package_id: int, target_kind: str, target_value, stage_percent: int, failure_threshold: float) -> Deployment:
    """Create a deployment and publish stage 1 (pages and API). Raises InputError for bad input."""
    from .packages import signed_download_url

    db = get_db()
    pkg = db.get(Package, package_id)
    if pkg is None:
        raise InputError(f"no package with id {package_id}")
    signer = command_signer()
    with _publisher() as publish:
        return engine.create_deployment(db, pkg, target_kind, target_value, package_url=signed_download_url(pkg),
                                        stage_percent=stage_percent, failure_threshold=failure_threshold,
                                        created_by_id=current_user.id, publish=publish, signer=signer)


def _publisher():
    return mqtt_publisher(current_app.config["BROKER_URL"], ca_file=current_app.config.get("BROKER_CA_FILE"))


def refresh(dep: Deployment) -> None:
    """Fold in results the ingest stored since the last tick, so a page never shows stale progress."""
    db = get_db()
    if engine.update_progress(db, dep, timeout_s=current_app.config["DEPLOY_TIMEOUT_S"]):
        db.commit()


def do_rollback(dep: Deployment) -> int:
    signer = command_signer()
    with _publisher() as publish:
        return engine.rollback(get_db(), dep, publish, signer)


@bp.get("/deployments")
def index():
    db = get_db()
    rows = db.scalars(select(Deployment).order_by(Deployment.created_at.desc()).limit(100)
                      .options(selectinload(Deployment.targets), selectinload(Deployment.package))).all()
    return render_template("deployments.html", deployments=rows, counts=engine.counts)


@bp.get("/deployments/new")
@requires_role("operator")
def new():
    db = get_db()
    packages = db.scalars(select(Package).order_by(Package.name, Package.uploaded_at.desc())).all()
    groups = db.scalars(select(DeviceGroup.name).order_by(DeviceGroup.name)).all()
    tags = db.scalars(select(DeviceTag.tag).distinct().order_by(DeviceTag.tag)).all()
    return render_template("deployment_new.html", packages=packages, groups=groups, tags=tags,
                           form=ActionForm(), pre_package=request.args.get("package_id", type=int),
                           pre_devices=request.args.get("devices", ""))


def parse_form(form) -> dict:
    """The new-deployment form's fields; raises InputError naming the bad one."""
    kind = form.get("target_kind", "devices")
    if kind == "devices":
        value = [v for v in form.get("devices", "").replace(",", " ").split() if v]
    elif kind in ("group", "tag"):
        value = form.get(kind, "").strip()
        if not value:
            raise InputError(f"choose a {kind}")
    else:
        raise InputError(f"unknown target kind {kind!r}; expected devices, group or tag")
    try:
        package_id = int(form.get("package_id", ""))
        stage_percent = int(form.get("stage_percent", "100"))
        threshold = float(form.get("failure_threshold_percent", "20")) / 100.0
    except ValueError:
        raise InputError("package, stage percentage and failure threshold must be numbers") from None
    return {"package_id": package_id, "target_kind": kind, "target_value": value,
            "stage_percent": stage_percent, "failure_threshold": threshold}


@bp.post("/deployments")
@requires_role("operator")
def create():
    try:
        dep = start(**parse_form(request.form))
    except EdgeoptError as exc:
        get_db().rollback()
        flash(f"deployment not started: {exc.one_line()}", "error")
        return redirect(url_for("deployments.new", package_id=request.form.get("package_id"),
                                devices=request.form.get("devices", "")))
    if dep.state == "failed":
        flash(dep.message, "error")
    else:
        flash(f"deployment started: stage 1 sent to {sum(1 for t in dep.targets if t.stage == 1)} devices", "success")
    return redirect(url_for("deployments.detail", deployment_id=dep.id))


@bp.get("/deployments/<deployment_id>")
def detail(deployment_id: str):
    dep = load(deployment_id)
    refresh(dep)
    from ..api.serialize import deployment_json

    from .. import compare

    latency = compare.deployment_latency(get_db(), dep)
    return render_template("deployment.html", dep=dep, d=deployment_json(dep), form=ActionForm(), latency=latency)


@bp.post("/deployments/<deployment_id>/abort")
@requires_role("operator")
def abort_(deployment_id: str):
    dep = load(deployment_id)
    try:
        engine.abort(get_db(), dep)
        flash("deployment aborted: nothing more will be sent", "success")
    except InputError as exc:
        flash(exc.one_line(), "error")
    return redirect(url_for("deployments.detail", deployment_id=dep.id))


@bp.post("/deployments/<deployment_id>/rollback")
@requires_role("operator")
def rollback(deployment_id: str):
    dep = load(deployment_id)
    try:
        n = do_rollback(dep)
        flash(f"rollback sent to {n} devices", "success")
    except (InputError, UnavailableError) as exc:
        flash(f"rollback failed: {exc.one_line()}", "error")
    return redirect(url_for("deployments.detail", deployment_id=dep.id))
