"""Fleet overview: status counts, profiles, package versions, fleet latency chart, slowest devices, alerts."""
from __future__ import annotations

from flask import Blueprint, redirect, render_template, url_for
from sqlalchemy import select

from .. import stats
from ..models import Alert
from . import get_db

bp = Blueprint("fleet", __name__)


@bp.get("/")
def index():
    return redirect(url_for("fleet.overview"))


@bp.get("/fleet")
def overview():
    from sqlalchemy.orm import selectinload

    from ..api.serialize import alert_json

    db = get_db()
    summary = stats.fleet_summary(db)
    alerts = db.scalars(select(Alert).where(Alert.state == "open").order_by(Alert.opened_at.desc()).limit(10)
                        .options(selectinload(Alert.rule), selectinload(Alert.device))).all()
    return render_template("fleet.html", s=summary, alerts=[alert_json(a) for a in alerts])
