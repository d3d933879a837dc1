"""On-device profiles: the latest ones of a device, and the ``profile`` command (the device page's twins)."""
from __future__ import annotations

from flask import request

from edgeopt.sdk.errors import InputError

from .. import device_profiles as dp
from ..security import requires_role
from ..views import get_db
from ..views.profiles import device_or_404, runs_arg, send
from . import bp, ok


@bp.get("/devices/<device_id>/profiles")
def device_profiles(device_id: str):
    dev = device_or_404(device_id)
    events = dp.profile_events(get_db(), dev)
    return ok({"device_id": dev.device_id, "profiles": [dp.event_json(e) for e in events]})


@bp.post("/devices/<device_id>/profiles")
@requires_role("operator")
def request_device_profile(device_id: str):
    """JSON: {"model": name, "runs": 1..200 (30)}. Answers 202 with the command id."""
    dev = device_or_404(device_id)
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise InputError('send a JSON object: {"model": "digits", "runs": 30}')
    command_id = send(dev, body["model"], runs_arg(body.get("runs")))
    return ok({"device_id": dev.device_id, "model": body["model"], "command_id": command_id}, 202)
