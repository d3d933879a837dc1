"""Commands from the dashboard: ``deploy``, ``rollback``, ``set-config``, ``ping``, ``profile``.

Nothing runs unless it is signed by a key in ``[control] trust_keys``, addressed to this device, within
its validity window and never seen before (:mod:`edgeopt.agent.control`). A message that fails those
checks is refused, counted and reported as a ``refused`` event, and gets no ``cmd/result`` (its id is
unverified). A deploy whose URL is outside ``[download] allowed_urls`` is rejected before any connection.

Every verified command gets at least one result on ``cmd/result`` naming its id: an unknown command or
bad arguments get ``rejected`` (never an exception in the agent); ``deploy`` and ``rollback``
answer ``accepted`` at once and ``succeeded`` or ``failed`` when the worker thread finishes, so a long
download never blocks ``ping``. Installs run one at a time, in arrival order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..sdk.command_signing import CommandRefused
from ..sdk.errors import EdgeoptError
from ..sdk.telemetry import (CommandPayload, CommandResultPayload, DeployArgs, EventPayload, ProfileArgs,
                             RollbackArgs)
from .control import RefusalReporter
from .download import check_package_url

log = logging.getLogger(__name__)


class BatchingPatch(BaseModel):
    """The batching limits ``set-config`` may change (omitted keys keep their value)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = Field(None, description="Group concurrent requests.")
    max_batch: int | None = Field(None, ge=1, le=4096, description="Largest batch.")
    max_delay_ms: float | None = Field(None, ge=0.0, le=1000.0, description="Longest wait for a batch to fill.")
    max_queue: int | None = Field(None, ge=1, le=1_000_000, description="Queued requests before 503.")


class SetConfigArgs(BaseModel):
    """``set-config`` arguments; runtime settings only (they last until the agent restarts)."""

    model_config = ConfigDict(extra="forbid")
    telemetry_interval_s: float | None = Field(None, ge=0.1, le=3600, description="Seconds between telemetry.")
    batching: BatchingPatch | None = Field(None, description="Batching limits.")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "<args>"
    return f"{loc}: {err['msg']}"


class CommandHandler:
    """Turns raw ``cmd`` payloads into actions and results.

    ``emit(kind, payload)`` queues a payload (the MQTT link's outbox); ``verifier.verify(raw)`` returns the
    checked command or raises CommandRefused (:class:`edgeopt.agent.control.CommandVerifier`);
    ``allowed_urls`` are the package store's base URLs; ``installer`` provides ``install_url`` and
    ``rollback``; ``set_interval`` and ``set_batching`` apply ``set-config``.
    """

    def __init__(self, envelope: Any, emit: Callable[[str, Any], Any], *, verifier: Any,
                 allowed_urls: Sequence[str] = (), installer: Any = None,
                 set_interval: Callable[[float], None] | None = None,
                 set_batching: Callable[..., None] | None = None, pending_dir: Path | None = None,
                 profiler: Callable[..., Any] | None = None):
        self.envelope = envelope
        self.emit = emit
        self.verifier = verifier
        self.allowed_urls = list(allowed_urls)
        self.refusals = RefusalReporter(envelope, emit)
        self.installer = installer
        self.set_interval = set_interval
        self.set_batching = set_batching
        # profiler(model, runs=, deadline_s=, command_id=) -> result details; sends the profile event itself
        self.profiler = profiler
        # A deploy or rollback that was accepted is recorded here until its final result is queued, so a
        # command interrupted by a kill or power loss still gets a result after the restart.
        self.pending_dir = Path(pending_dir) if pending_dir is not None else None
        if self.pending_dir is not None:
            self.pending_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="commands-install", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ results
    def result(self, command_id: str, command: str | None, status: str, message: str = "",
               deployment_id: str | None = None, **details: Any) -> None:
        ok = status in ("accepted", "succeeded")
        payload = self.envelope.make(CommandResultPayload, command_id=command_id[:64] or "unknown", command=command,
                                     ok=ok, status=status, message=message, deployment_id=deployment_id,
                                     details=details)
        self.emit("cmd/result", payload)
        (log.info if ok else log.warning)("command %s %s: %s %s", command, command_id, status, message)

    def _remember(self, cmd: CommandPayload) -> None:
        if self.pending_dir is None:
            return
        path = self.pending_dir / f"{hashlib.sha256(cmd.id.encode()).hexdigest()[:24]}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": cmd.id, "command": cmd.command, "deployment_id": cmd.deployment_id,
                                   "args": cmd.args}))
        os.replace(tmp, path)

    def _forget(self, cmd: CommandPayload) -> None:
        if self.pending_dir is not None:
            (self.pending_dir / f"{hashlib.sha256(cmd.id.encode()).hexdigest()[:24]}.json").unlink(missing_ok=True)

    def fail_interrupted(self, serving: Callable[[str], str | None] = lambda name: None) -> int:
        """Answer ``failed`` for every deploy/rollback accepted before the agent stopped; returns how many."""
        if self.pending_dir is None:
            return 0
        n = 0
        for path in sorted(self.pending_dir.glob("*.json")):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            model = (doc.get("args") or {}).get("name") or (doc.get("args") or {}).get("model")
            now = serving(model) if model else None
            self.result(str(doc.get("id", "unknown")), doc.get("command"), "failed",
                        "interrupted: the agent stopped before the command finished; the state was recovered"
                        + (f" and {model} {now} is serving" if now else "") + "; send the command again",
                        doc.get("deployment_id"), interrupted=True)
            path.unlink(missing_ok=True)
            n += 1
        return n

    # ------------------------------------------------------------------ intake
    def handle(self, raw: bytes) -> None:
        """Handle one raw command payload. Never raises."""
        try:
            cmd = self.verifier.verify(raw)
        except CommandRefused as exc:
            self.refusals.refused(exc)
            return
        except Exception:  # a verifier failure (disk) refuses the command; it never crashes the agent
            log.exception("command verification failed")
            self.refusals.refused(CommandRefused("command could not be verified (internal error; see the agent "
                                                 "log)", "internal_error"))
            return
        try:
            getattr(self, "_" + cmd.command.replace("-", "_"))(cmd)
        except ValidationError as exc:
            self.result(cmd.id, cmd.command, "rejected", f"bad {cmd.command} arguments: {_first_error(exc)}",
                        cmd.deployment_id)
        except Exception as exc:  # never let a command crash the agent; say what happened instead
            log.exception("command %s failed", cmd.id)
            self.result(cmd.id, cmd.command, "failed", _describe(exc), cmd.deployment_id)

    def _ping(self, cmd: CommandPayload) -> None:
        self.result(cmd.id, cmd.command, "succeeded", "pong", cmd.deployment_id,
                    session_id=self.envelope.session_id)

    def _accept(self, cmd: CommandPayload, message: str, run: Callable[[], Any]) -> None:
        """Answer ``accepted``, record the command until its final result, and queue it for the worker."""
        if self.installer is None:
            self.result(cmd.id, cmd.command, "rejected", "this agent has no installer", cmd.deployment_id)
            return
        self._remember(cmd)
        self.result(cmd.id, cmd.command, "accepted", message, cmd.deployment_id)
        self._jobs.put((cmd, run))

    def _deploy(self, cmd: CommandPayload) -> None:
        args = DeployArgs.model_validate(cmd.args)
        try:
            check_package_url(args.package_url, self.allowed_urls)
        except EdgeoptError as exc:  # refused before any connection is made
            self.result(cmd.id, cmd.command, "rejected", exc.one_line(), cmd.deployment_id)
            return
        self._accept(cmd, f"downloading {args.package_url}", lambda: self.installer.install_url(
            args.package_url, args.sha256, size=args.size, command_id=cmd.id, deployment_id=cmd.deployment_id))

    def _rollback(self, cmd: CommandPayload) -> None:
        args = RollbackArgs.model_validate(cmd.args)
        self._accept(cmd, f"rolling back {args.model}", lambda: self.installer.rollback(
            args.model, version=args.version, command_id=cmd.id, deployment_id=cmd.deployment_id))

    def _profile(self, cmd: CommandPayload) -> None:
        args = ProfileArgs.model_validate(cmd.args)
        if self.profiler is None:
            self.result(cmd.id, cmd.command, "rejected", "this agent cannot profile", cmd.deployment_id)
            return
        # Queued behind installs (one job at a time): a profile never races a switch of the same model.
        self._accept(cmd, f"profiling {args.model} (at most {args.runs} runs, {args.deadline_s:g} s)",
                     lambda: self.profiler(args.model, runs=args.runs, deadline_s=args.deadline_s, command_id=cmd.id))

    def _set_config(self, cmd: CommandPayload) -> None:
        args = SetConfigArgs.model_validate(cmd.args)
        applied: dict[str, Any] = {}
        if args.telemetry_interval_s is not None:
            if self.set_interval is None:
                raise EdgeoptError("telemetry interval cannot be changed on this agent")
            self.set_interval(args.telemetry_interval_s)
            applied["telemetry_interval_s"] = args.telemetry_interval_s
        if args.batching is not None:
            patch = args.batching.model_dump(exclude_none=True)
            if patch:
                if self.set_batching is None:
                    raise EdgeoptError("batching cannot be changed on this agent")
                self.set_batching(**patch)
                applied["batching"] = patch
        if not applied:
            self.result(cmd.id, cmd.command, "rejected", "set-config needs telemetry_interval_s and/or batching",
                        cmd.deployment_id)
            return
        self.emit("events", self.envelope.make(EventPayload, event="config", message="runtime settings changed",
                                               command_id=cmd.id, details=applied))
        self.result(cmd.id, cmd.command, "succeeded", "applied until the agent restarts", cmd.deployment_id,
                    **applied)

    # ------------------------------------------------------------------ install worker
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            cmd, run = job
            try:
                outcome = run()
            except EdgeoptError as exc:
                self.result(cmd.id, cmd.command, "failed", exc.one_line(), cmd.deployment_id)
            except Exception as exc:
                log.exception("command %s (%s) crashed", cmd.id, cmd.command)
                self.result(cmd.id, cmd.command, "failed", _describe(exc), cmd.deployment_id)
            else:
                self.result(cmd.id, cmd.command, "succeeded", "done", cmd.deployment_id, **_outcome(outcome))
            self._forget(cmd)  # the final result is in the outbox now

    def stop(self) -> None:
        self._jobs.put(None)
        self._worker.join(1.0)


def _outcome(value: Any) -> dict[str, Any]:
    """Result details from whatever the installer returned (an InstalledModel, a dict, or nothing)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return json.loads(json.dumps(value, default=str))
    out = {}
    for key in ("name", "version", "previous_version"):
        if getattr(value, key, None) is not None:
            out["model" if key == "name" else key] = str(getattr(value, key))
    return out


def _describe(exc: BaseException) -> str:
    return exc.one_line() if isinstance(exc, EdgeoptError) else f"{type(exc).__name__}: {exc}"

