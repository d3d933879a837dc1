"""Alerts: open and recent alerts, and the rules (offline minutes, p95 SLO per model, install failures)."""
from __future__ import annotations

import time

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from edgeopt.sdk.errors import InputError

from .. import alerting
from ..models import Alert, AlertKind, AlertRule
from ..security import requires_role
from . import get_db
from .auth import ActionForm

bp = Blueprint("alerts", __name__)
KINDS = [k.value for k in AlertKind]


def evaluate_if_due(force: bool = False) -> None:
    """Evaluate the rules when the last run in this process is older than alerting.EVALUATE_EVERY_S."""
    last = current_app.extensions.get("edgeopt_alerts_at", float("-inf"))
    if force or time.monotonic() - last >= alerting.EVALUATE_EVERY_S:
        current_app.extensions["edgeopt_alerts_at"] = time.monotonic()
        alerting.evaluate(get_db())


def rule_fields(form, partial: bool = False) -> dict:
    """Validated rule fields from a form or JSON object; raises InputError naming the bad field."""
    out: dict = {}
    if "name" in form or not partial:
        name = str(form.get("name") or "").strip()
        if not name or len(name) > 128:
            raise InputError("rule name is required (at most 128 characters)")
        out["name"] = name
    if "kind" in form or not partial:
        kind = form.get("kind")
        if kind not in KINDS:
            raise InputError(f"unknown alert kind {kind!r}; expected one of {', '.join(KINDS)}")
        out["kind"] = kind
    if "model" in form:
        out["model"] = (str(form.get("model") or "").strip() or None)
    for key in ("threshold_minutes", "threshold_ms"):
        if key in form:
            raw = form.get(key)
            if raw in (None, ""):
                out[key] = None
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise InputError(f"{key} must be a number, found {raw!r}") from None
            if value <= 0:
                raise InputError(f"{key} must be above 0, found {value:g}")
            out[key] = value
    if "enabled" in form:
        out["enabled"] = form.get("enabled") in (True, "1", "true", "on", 1)
    kind = out.get("kind")
    if kind == "offline" and not partial and not out.get("threshold_minutes"):
        raise InputError("an offline rule needs threshold_minutes (how long offline before alerting)")
    if kind == "p95_slo" and not partial and not out.get("threshold_ms"):
        raise InputError("a p95_slo rule needs threshold_ms (the model's p95 SLO)")
    return out


@bp.get("/alerts")
def index():
    db = get_db()
    evaluate_if_due()
    opts = (selectinload(Alert.rule), selectinload(Alert.device))
    open_alerts = db.scalars(select(Alert).where(Alert.state == "open").order_by(Alert.opened_at.desc())
                             .limit(200).options(*opts)).all()
    resolved = db.scalars(select(Alert).where(Alert.state == "resolved").order_by(Alert.resolved_at.desc())
                          .limit(50).options(*opts)).all()
    rules = db.scalars(select(AlertRule).order_by(AlertRule.name)).all()
    return render_template("alerts.html", open_alerts=open_alerts, resolved=resolved, rules=rules, kinds=KINDS,
                           form=ActionForm())


@bp.post("/alerts/rules")
@requires_role("operator")
def create_rule():
    db = get_db()
    try:
        fields = rule_fields(request.form)
        if db.scalar(select(AlertRule).where(AlertRule.name == fields["name"])):
            raise InputError(f"a rule named {fields['name']!r} already exists")
    except InputError as exc:
        flash(f"rule not saved: {exc.one_line()}", "error")
        return redirect(url_for("alerts.index"))
    db.add(AlertRule(**fields))
    db.commit()
    evaluate_if_due(force=True)
    flash(f"rule {fields['name']!r} saved", "success")
    return redirect(url_for("alerts.index"))


@bp.post("/alerts/rules/<int:rule_id>")
@requires_role("operator")
def update_rule(rule_id: int):
    db = get_db()
    rule = db.get(AlertRule, rule_id) or abort(404, description=f"no alert rule with id {rule_id}")
    if request.form.get("delete"):
        db.delete(rule)
        db.commit()
        flash(f"rule {rule.name!r} deleted", "success")
        return redirect(url_for("alerts.index"))
    try:
        fields = rule_fields(request.form, partial=True)
    except InputError as exc:
        flash(f"rule not saved: {exc.one_line()}", "error")
        return redirect(url_for("alerts.index"))
    for k, v in fields.items():
        setattr(rule, k, v)
    db.commit()
    evaluate_if_due(force=True)
    flash(f"rule {rule.name!r} updated", "success")
    return redirect(url_for("alerts.index"))
