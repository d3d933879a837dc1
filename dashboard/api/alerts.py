"""Alert endpoints: alerts (open/resolved) and rules (operators and admins edit)."""
from __future__ import annotations

from flask import abort, request
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from edgeopt.sdk.errors import InputError

from ..models import Alert, AlertRule
from ..security import requires_role
from ..views import get_db
from ..views.alerts import evaluate_if_due, rule_fields
from . import bp, ok
from .serialize import alert_json, rule_json


@bp.get("/alerts")
def alerts():
    """Alerts, newest first; ``state`` = open (default), resolved or all."""
    state = request.args.get("state", "open")
    if state not in ("open", "resolved", "all"):
        raise InputError(f"state must be open, resolved or all, found {state!r}")
    evaluate_if_due()
    q = select(Alert).options(selectinload(Alert.rule), selectinload(Alert.device)).order_by(
        Alert.opened_at.desc()).limit(500)
    if state != "all":
        q = q.where(Alert.state == state)
    return ok({"alerts": [alert_json(a) for a in get_db().scalars(q)]})


@bp.get("/alert-rules")
def alert_rules():
    return ok({"rules": [rule_json(r) for r in get_db().scalars(select(AlertRule).order_by(AlertRule.name))]})


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InputError("send a JSON object with the rule's fields")
    return body


@bp.post("/alert-rules")
@requires_role("operator")
def create_alert_rule():
    db = get_db()
    fields = rule_fields(_body())
    if db.scalar(select(AlertRule).where(AlertRule.name == fields["name"])):
        raise InputError(f"a rule named {fields['name']!r} already exists")
    rule = AlertRule(**fields)
    db.add(rule)
    db.commit()
    evaluate_if_due(force=True)
    return ok(rule_json(rule), 201)


@bp.patch("/alert-rules/<int:rule_id>")
@requires_role("operator")
def update_alert_rule(rule_id: int):
    db = get_db()
    rule = db.get(AlertRule, rule_id) or abort(404, description=f"no alert rule with id {rule_id}")
    for k, v in rule_fields(_body(), partial=True).items():
        setattr(rule, k, v)
    db.commit()
    evaluate_if_due(force=True)
    return ok(rule_json(rule))


@bp.delete("/alert-rules/<int:rule_id>")
@requires_role("operator")
def delete_alert_rule(rule_id: int):
    db = get_db()
    rule = db.get(AlertRule, rule_id) or abort(404, description=f"no alert rule with id {rule_id}")
    db.delete(rule)
    db.commit()
    return ok({"deleted": rule_id})
