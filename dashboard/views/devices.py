"""Device list (server-side search, filters, sort, paging) and device detail."""
from __future__ import annotations

from flask import Blueprint, abort, render_template, request
from sqlalchemy import select

from .. import stats
from ..models import Device, DeviceGroup
from . import get_db

bp = Blueprint("devices", __name__)
MAX_PAGE = 1_000_000


def list_args(args) -> dict:
    """The list's query parameters, validated; raises ValueError with a message for bad ones."""
    try:
        page = int(args.get("page", 1))
        per_page = int(args.get("per_page", 50))
    except ValueError:
        raise ValueError("page and per_page must be whole numbers") from None
    # The offset (page - 1) * per_page must fit the database's BIGINT; no real fleet has a million pages.
    if not 1 <= page <= MAX_PAGE:
        raise ValueError(f"page must be between 1 and {MAX_PAGE}, found {page}")
    status = args.get("status") or None
    if status not in (None, "online", "offline"):
        raise ValueError(f"status must be online or offline, found {status!r}")
    return {"search": args.get("q") or None, "status": status, "profile": args.get("profile") or None,
            "group": args.get("group") or None, "package": args.get("package") or None,
            "sort": args.get("sort", "device_id"), "order": args.get("order", "asc"),
            "page": page, "per_page": per_page}


@bp.get("/devices")
def index():
    db = get_db()
    try:
        params = list_args(request.args)
        result = stats.list_devices(db, **params)
    except ValueError as exc:
        abort(400, description=str(exc))
    summary_profiles = db.scalars(select(Device.profile).where(Device.profile.is_not(None)).distinct()
                                  .order_by(Device.profile)).all()
    groups = db.scalars(select(DeviceGroup.name).order_by(DeviceGroup.name)).all()
    return render_template("devices.html", r=result, p=params, profiles=summary_profiles, groups=groups,
                           sort_keys=list(stats.SORT_KEYS))


@bp.get("/devices/<device_id>")
def detail(device_id: str):
    db = get_db()
    d = stats.device_detail(db, device_id)
    if d is None:
        abort(404, description=f"no device {device_id!r}")
    events = stats.device_events(db, device_id, limit=50)
    return render_template("device.html", d=d, events=events)
