"""Device page's "Profile on device": send the ``profile`` command, show the latest on-device per-layer
profile (top layers, comparison with the package's host profile) and serve its trace."""
from __future__ import annotations

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, url_for
from sqlalchemy import select

from edgeopt.sdk.errors import EdgeoptError, InputError

from .. import device_profiles as dp
from ..models import Device, Event
from ..security import requires_role
from . import get_db
from .auth import ActionForm

bp = Blueprint("profiles", __name__)


def device_or_404(device_id: str) -> Device:
    dev = get_db().scalar(select(Device).where(Device.device_id == device_id))
    if dev is None:
        abort(404, description=f"no device {device_id!r}")
    return dev


def send(device: Device, model: str, runs: int) -> str:
    from .deployments import _publisher, command_signer

    signer = command_signer()
    with _publisher() as publish:
        return dp.request_profile(device, model, runs, publish, signer)


def runs_arg(value) -> int:
    try:
        runs = int(value if value not in (None, "") else 30)
    except (TypeError, ValueError):
        raise InputError(f"runs must be a whole number, found {value!r}") from None
    if not 1 <= runs <= 200:
        raise InputError(f"runs must be between 1 and 200, found {runs}")
    return runs


@bp.get("/devices/<device_id>/profile")
def page(device_id: str):
    dev = device_or_404(device_id)
    events = dp.profile_events(get_db(), dev)
    latest = dp.event_json(events[0]) if events else None
    return render_template("device_profile.html", d=dev, latest=latest, form=ActionForm(),
                           history=[dp.event_json(e, full=False) for e in events],
                           models=sorted(p.name for p in dev.packages))


@bp.post("/devices/<device_id>/profile")
@requires_role("operator")
def start(device_id: str):
    dev = device_or_404(device_id)
    form = ActionForm()
    if not form.validate_on_submit():
        abort(400, description="the form expired; reload the page and try again")
    try:
        command_id = send(dev, request.form.get("model", ""), runs_arg(request.form.get("runs")))
    except EdgeoptError as exc:
        flash(exc.one_line(), "error")
    else:
        flash(f"profile requested (command {command_id}); the result appears here when the device answers", "ok")
    return redirect(url_for("profiles.page", device_id=dev.device_id))


@bp.get("/devices/<device_id>/profile/<int:event_id>/trace.json")
def trace(device_id: str, event_id: int):
    dev = device_or_404(device_id)
    ev = get_db().get(Event, event_id)
    if ev is None or ev.device_pk != dev.id or ev.kind != "profile":
        abort(404, description=f"no profile {event_id} of {device_id}")
    try:
        data = dp.trace_bytes(ev)
    except InputError as exc:
        abort(404, description=exc.one_line())
    name = f"{dev.device_id}-{ev.model or 'model'}-{ev.version or ''}-trace.json".replace("/", "_")
    return Response(data, mimetype="application/json",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
