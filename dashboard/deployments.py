"""Deployment engine: create a rollout, send it in stages, follow it, stop it, roll it back.

A deployment targets devices (a list of ids), a group or a tag. Stage 1 goes to ``stage_percent`` of
the targets (at least one device), stage 2 to the rest once every stage-1 device has finished and the
failure share stayed within ``failure_threshold``. The failure share is ``failed / devices sent so far``;
when it goes over the threshold the deployment stops by itself (state ``failed``) and sends nothing
more. Devices that give no answer within the timeout count as failed.

Who does what:

- the web process calls :func:`create_deployment`, :func:`abort` and :func:`rollback`, which publish
  commands right away with :func:`edgeopt.dashboard.mqtt_publish.mqtt_publisher` (a short-lived MQTT 5 client; an unreachable broker is
  recorded on the deployment and shown on its page);
- the ingest process calls :func:`tick` every few seconds with its own connected client's publish: it
  reads the events and command results the ingest stored, updates each device's progress, marks
  timeouts, stops over the failure share and sends the next stage.

Commands are :class:`~edgeopt.sdk.telemetry.CommandPayload` on ``edgeopt/v1/<fleet>/<device>/cmd``
with ``deploy`` (:class:`DeployArgs`) or ``rollback`` (:class:`RollbackArgs`) arguments, each signed
for its one device by the dashboard's command key (:class:`~edgeopt.dashboard.command_signing.
CommandSigner`, passed as ``signer``) and valid for the signer's ``ttl_s``.
"""
from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timedelta
from typing import Callable, Iterable

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from edgeopt.sdk.errors import InputError, UnavailableError
from edgeopt.sdk.telemetry import DeployArgs, RollbackArgs

from .command_signing import CommandSigner
from .models import (CommandResult, Deployment, DeploymentState, DeploymentTarget, Device, DeviceGroup,
                     DeviceGroupMember, DeviceTag, Event, Package, TargetState, new_id, utcnow)

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]
TARGET_KINDS = ("devices", "group", "tag")
DEFAULT_TIMEOUT_S = 900.0
IN_FLIGHT = (TargetState.sent.value, TargetState.accepted.value, TargetState.installing.value)
FINISHED = (TargetState.succeeded.value, TargetState.failed.value, TargetState.rolled_back.value)
# Deployments whose in-flight targets are still followed (a stopped rollout's sent commands still land).
FOLLOWED = (DeploymentState.running.value, DeploymentState.failed.value, DeploymentState.aborted.value,
            DeploymentState.rolled_back.value)


# ----------------------------------------------------------------------------------------- creating
def resolve_targets(db: Session, kind: str, value: str | Iterable[str]) -> list[Device]:
    """The devices a target names, sorted by device id. Raises :class:`InputError` when it names none."""
    if kind == "devices":
        ids = sorted({v.strip() for v in ([value] if isinstance(value, str) else value) if v and v.strip()})
        if not ids:
            raise InputError("no device given: pick at least one device")
        found = db.scalars(select(Device).where(Device.device_id.in_(ids)).order_by(Device.device_id)).all()
        missing = sorted(set(ids) - {d.device_id for d in found})
        if missing:
            raise InputError(f"unknown device(s): {', '.join(missing[:10])}", hint="check the device ids")
        return list(found)
    if kind == "group":
        group = db.scalar(select(DeviceGroup).where(DeviceGroup.name == value))
        if group is None:
            raise InputError(f"unknown group {value!r}")
        devices = db.scalars(select(Device).join(DeviceGroupMember, DeviceGroupMember.device_pk == Device.id)
                             .where(DeviceGroupMember.group_id == group.id).order_by(Device.device_id)).all()
    elif kind == "tag":
        devices = db.scalars(select(Device).join(DeviceTag, DeviceTag.device_pk == Device.id)
                             .where(DeviceTag.tag == value).order_by(Device.device_id)).all()
    else:
        raise InputError(f"unknown target kind {kind!r}; expected one of {', '.join(TARGET_KINDS)}")
    if not devices:
        raise InputError(f"{kind} {value!r} has no devices")
    return list(devices)


def create_deployment(db: Session, package: Package, target_kind: str, target_value, *, package_url: str,
                      stage_percent: int = 100, failure_threshold: float = 0.2, created_by_id: int | None = None,
                      publish: Publish | None = None, signer: CommandSigner | None = None,
                      now: datetime | None = None) -> Deployment:
    """Create the deployment and its targets, commit, then send stage 1 with ``publish``.

    ``package_url`` is the signed download URL the agents fetch (see package_store). A publish failure
    does not raise: the deployment is marked failed with the broker's error as its message.
    """
    if not 1 <= int(stage_percent) <= 100:
        raise InputError(f"stage percentage must be between 1 and 100, got {stage_percent}")
    if not 0.0 <= float(failure_threshold) <= 1.0:
        raise InputError(f"failure threshold must be a share between 0 and 1, got {failure_threshold}")
    devices = resolve_targets(db, target_kind, target_value)
    busy = db.scalars(select(Device.device_id).join(DeploymentTarget, DeploymentTarget.device_pk == Device.id)
                      .join(Deployment, Deployment.id == DeploymentTarget.deployment_id)
                      .where(Device.id.in_([d.id for d in devices]),
                             Deployment.state.in_([DeploymentState.pending.value, DeploymentState.running.value]),
                             DeploymentTarget.state.in_(IN_FLIGHT + (TargetState.pending.value,)))).all()
    if busy:
        raise InputError(f"device(s) already in a running deployment: {', '.join(sorted(set(busy))[:10])}",
                         hint="wait for it to finish or abort it first")
    first = max(1, math.ceil(len(devices) * int(stage_percent) / 100))
    value = {"devices": [d.device_id for d in devices]} if target_kind == "devices" else {target_kind: target_value}
    value["package_url"] = package_url
    dep = Deployment(id=new_id(), package_id=package.id, target_kind=target_kind, target_value=value,
                     stage_percent=int(stage_percent), failure_threshold=float(failure_threshold),
                     state=DeploymentState.running.value, current_stage=1, created_by_id=created_by_id,
                     message="")
    dep.targets = [DeploymentTarget(device_pk=d.id, stage=1 if i < first else 2, state=TargetState.pending.value)
                   for i, d in enumerate(devices)]
    db.add(dep)
    db.commit()
    log.info("deployment %s: %s %s to %d devices (%d in stage 1)", dep.id, package.name, package.version,
             len(devices), first)
    if publish is not None:
        if signer is None:
            raise ValueError("publishing commands needs the dashboard's command signer")
        try:
            _send_stage(db, dep, 1, publish, signer, now or utcnow())
        except UnavailableError as exc:
            dep.state = DeploymentState.failed.value
            dep.message = f"deploy commands not sent: {exc.one_line()}"
            dep.finished_at = now or utcnow()
            log.warning("deployment %s: %s", dep.id, dep.message)
        db.commit()
    return dep


def _deploy_command(dep: Deployment, target: DeploymentTarget, signer: CommandSigner) -> tuple[str, bytes]:
    pkg = dep.package
    args = DeployArgs(package_url=dep.target_value["package_url"], sha256=pkg.sha256, size=pkg.size,
                      name=pkg.name, version=pkg.version)
    return signer.message(target.device.fleet, target.device.device_id, "deploy",
                          args.model_dump(exclude_none=True), command_id=target.command_id, deployment_id=dep.id)


def _publish(publish: Publish, topic_: str, payload: bytes) -> None:
    """Any publish failure becomes UnavailableError: callers record it instead of crashing halfway."""
    try:
        publish(topic_, payload)
    except UnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. the ingest's client not connected (RuntimeError)
        raise UnavailableError(f"publish to {topic_} failed: {exc}") from None


def _send_stage(db: Session, dep: Deployment, stage: int, publish: Publish, signer: CommandSigner,
                now: datetime) -> int:
    """Send deploy commands to the stage's pending targets; each gets a fresh command id."""
    sent = 0
    for target in dep.targets:
        if target.stage != stage or target.state != TargetState.pending.value:
            continue
        target.command_id = target.command_id or new_id()
        _publish(publish, *_deploy_command(dep, target, signer))
        target.state = TargetState.sent.value
        target.sent_at = now
        target.message = "deploy command sent"
        sent += 1
    dep.current_stage = stage
    return sent


# --------------------------------------------------------------------------------------- following
def update_progress(db: Session, dep: Deployment, now: datetime | None = None,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Fold new command results and events into the targets' states; mark timeouts. True if changed."""
    now = now or utcnow()
    rolling_back = dep.state == DeploymentState.rolled_back.value
    waiting = {t.command_id: t for t in dep.targets if t.state in IN_FLIGHT and t.command_id}
    if not waiting:
        return False
    changed = False
    ids = list(waiting)
    events: list[Event] = []
    results: list[CommandResult] = []
    for i in range(0, len(ids), 500):  # bounded IN lists, whatever the fleet size
        chunk = ids[i:i + 500]
        events += db.scalars(select(Event).where(Event.command_id.in_(chunk)))
        results += db.scalars(select(CommandResult).where(CommandResult.command_id.in_(chunk)))
    events.sort(key=lambda e: (e.ts, e.id))
    results.sort(key=lambda r: (r.ts, r.id))
    for ev in events:
        t = waiting[ev.command_id]
        if t.state in IN_FLIGHT and ev.kind in ("download", "install", "switch", "self_test", "rollback", "error",
                                                "refused"):
            new_state = TargetState.installing.value
            msg = f"{ev.kind}: {ev.message}" if ev.message else f"{ev.kind} {'ok' if ev.ok else 'failed'}"
            if (t.state, t.message) != (new_state, msg):
                t.state, t.message, changed = new_state, msg, True
    for res in results:
        t = waiting[res.command_id]
        if res.status == "accepted":
            if t.state == TargetState.sent.value:
                t.state, t.message, changed = TargetState.accepted.value, res.message or "accepted", True
            continue
        if res.status == "succeeded" and res.ok:
            t.state = TargetState.rolled_back.value if rolling_back else TargetState.succeeded.value
        else:
            t.state = TargetState.failed.value
        t.message = res.message or res.status
        changed = True
    deadline = now - timedelta(seconds=timeout_s)
    for t in waiting.values():
        if t.state in IN_FLIGHT and t.sent_at is not None and t.sent_at < deadline:
            t.state = TargetState.failed.value
            t.message = f"timed out: no result within {timeout_s:.0f} s of sending"
            changed = True
    return changed


def counts(dep: Deployment) -> dict[str, int]:
    """Targets by state, plus ``in_flight`` (sent, accepted or installing)."""
    out = {s.value: 0 for s in TargetState}
    for t in dep.targets:
        out[t.state] = out.get(t.state, 0) + 1
    out["in_flight"] = sum(out[s] for s in IN_FLIGHT)
    return out


def _advance(db: Session, dep: Deployment, publish: Publish | None, signer: CommandSigner | None,
             now: datetime) -> None:
    """Stop over the failure share, else send the next stage or finish."""
    if dep.state != DeploymentState.running.value:
        return
    c = counts(dep)
    dispatched = sum(1 for t in dep.targets if t.state != TargetState.pending.value)
    if dispatched and c["failed"] / dispatched > dep.failure_threshold:
        dep.state = DeploymentState.failed.value
        dep.finished_at = now
        dep.message = (f"stopped automatically: {c['failed']} of {dispatched} devices failed "
                       f"({c['failed'] / dispatched:.0%} > {dep.failure_threshold:.0%} allowed); "
                       f"{c['pending']} not sent")
        log.warning("deployment %s: %s", dep.id, dep.message)
        return
    stage_open = any(t.stage == dep.current_stage and t.state not in FINISHED for t in dep.targets)
    if stage_open:
        return
    if dep.current_stage == 1 and any(t.stage == 2 for t in dep.targets):
        if publish is None:
            return
        if signer is None:
            dep.message = "stage 2 not sent yet: this process has no command-signing key (see EDGEOPT_COMMAND_KEY)"
            return
        try:
            n = _send_stage(db, dep, 2, publish, signer, now)
            dep.message = f"stage 1 succeeded; stage 2 sent to {n} devices"
        except UnavailableError as exc:
            # Stay running: the next tick tries again.
            dep.message = f"stage 2 not sent yet: {exc.one_line()}"
        return
    dep.state = DeploymentState.completed.value
    dep.finished_at = now
    dep.message = (f"completed: {c['succeeded']} succeeded" + (f", {c['failed']} failed" if c["failed"] else ""))


_last_alert_run = [float("-inf")]


def tick(session: Session, publish: Publish | None, now: datetime | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S, alerts: bool = True, signer: CommandSigner | None = None) -> int:
    """Advance every followed deployment once; returns how many changed. Called by the ingest process.

    Later stages are sent only with both ``publish`` and ``signer``.

    With ``alerts`` it also evaluates the alert rules, at most every ``alerting.EVALUATE_EVERY_S``.
    """
    from . import alerting

    now = now or utcnow()
    if alerts and time.monotonic() - _last_alert_run[0] >= alerting.EVALUATE_EVERY_S:
        _last_alert_run[0] = time.monotonic()
        try:
            alerting.evaluate(session, now)
        except Exception:  # noqa: BLE001 - alerts must never stop deployments from advancing
            session.rollback()
            log.exception("alert evaluation failed")
    changed = 0
    # Running ones, and stopped ones whose sent commands may still answer; finished history is skipped.
    in_flight = select(DeploymentTarget.id).where(DeploymentTarget.deployment_id == Deployment.id,
                                                  DeploymentTarget.state.in_(IN_FLIGHT)).exists()
    deps = session.scalars(select(Deployment).where(
        or_(Deployment.state == DeploymentState.running.value,
            Deployment.state.in_(FOLLOWED) & in_flight))).all()
    for dep in deps:
        before = (dep.state, dep.current_stage, dep.message)
        moved = update_progress(session, dep, now, timeout_s)
        _advance(session, dep, publish, signer, now)
        if moved or before != (dep.state, dep.current_stage, dep.message):
            changed += 1
    session.commit()
    return changed


# ---------------------------------------------------------------------------------- stop and undo
def abort(db: Session, dep: Deployment, now: datetime | None = None) -> None:
    """Send nothing more. Commands already sent cannot be recalled; their results are still followed."""
    if dep.state not in (DeploymentState.running.value, DeploymentState.pending.value):
        raise InputError(f"deployment is {dep.state}; only a running deployment can be aborted")
    pending = sum(1 for t in dep.targets if t.state == TargetState.pending.value)
    for t in dep.targets:
        if t.state == TargetState.pending.value:
            t.message = "not sent: deployment aborted"
    dep.state = DeploymentState.aborted.value
    dep.finished_at = now or utcnow()
    dep.message = f"aborted; {pending} devices not sent"
    db.commit()


def rollback(db: Session, dep: Deployment, publish: Publish, signer: CommandSigner,
             now: datetime | None = None) -> int:
    """Roll every device that got (or may be getting) the package back to its previous version.

    Allowed again on a rolled-back deployment while some device still reports success (a broker
    failure in the middle of the first attempt).
    """
    now = now or utcnow()
    todo = [t for t in dep.targets if t.state in (TargetState.succeeded.value,)
            or (t.state in IN_FLIGHT and dep.state != DeploymentState.rolled_back.value)]
    if dep.state == DeploymentState.rolled_back.value and not todo:
        raise InputError("deployment is already rolled back")
    args = RollbackArgs(model=dep.package.name).model_dump(exclude_none=True)
    # State first: results of the rollback commands are then read as "rolled_back", not "succeeded".
    dep.state = DeploymentState.rolled_back.value
    dep.finished_at = now
    for t in dep.targets:
        if t.state == TargetState.pending.value:
            t.message = "not sent: deployment rolled back"
    sent = 0
    try:
        for t in todo:
            cmd_id = new_id()
            # Signed at the real time, not ``now`` (a test clock): the agent checks the validity window.
            _publish(publish, *signer.message(t.device.fleet, t.device.device_id, "rollback", args,
                                              command_id=cmd_id, deployment_id=dep.id))
            t.command_id, t.state, t.sent_at, t.message = cmd_id, TargetState.sent.value, now, "rollback command sent"
            sent += 1
    except UnavailableError as exc:
        dep.message = f"rollback sent to {sent} of {len(todo)} devices; the rest not sent: {exc.one_line()}"
        db.commit()
        raise
    dep.message = f"rollback sent to {sent} devices"
    db.commit()
    return sent
