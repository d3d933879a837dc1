"""Exact tests of `agent/commands.py` and `agent/control.py`: each result's fields and text, the bounds of
``set-config``, the pending records, the replay memory's limits and the refusal reporter's rate limit
(docs/mutation.md). The signed round trip with the real verifier is tested in test_mqtt_commands.py.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgeopt.agent import control as C
from edgeopt.agent.commands import BatchingPatch, CommandHandler, SetConfigArgs, _describe, _first_error, _outcome
from edgeopt.agent.control import CommandVerifier, RefusalReporter, ReplayGuard
from edgeopt.agent.mqtt import Envelope
from edgeopt.sdk.command_signing import CommandRefused, new_command
from edgeopt.sdk.errors import EdgeoptError, SecurityError

SHA = "b" * 64


class Verifier:
    """Stands in for CommandVerifier: the raw bytes are a JSON dict of new_command's arguments."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail

    def verify(self, raw: bytes):
        if self.fail is not None:
            raise self.fail
        doc = json.loads(raw)
        return new_command(doc.pop("command"), fleet="test", device_id="dev-1", **doc)


def raw(command: str, command_id: str = "c1", args: dict | None = None, deployment_id: str | None = None) -> bytes:
    return json.dumps({"command": command, "command_id": command_id, "args": args,
                       "deployment_id": deployment_id}).encode()


class Installer:
    def __init__(self, outcome=None, fail: BaseException | None = None):
        self.outcome, self.fail = outcome, fail
        self.calls: list[tuple] = []

    def install_url(self, url, sha256, size=None, *, command_id=None, deployment_id=None):
        self.calls.append(("install_url", url, sha256, size, command_id, deployment_id))
        if self.fail is not None:
            raise self.fail
        return self.outcome

    def rollback(self, model, version=None, *, command_id=None, deployment_id=None):
        self.calls.append(("rollback", model, version, command_id, deployment_id))
        if self.fail is not None:
            raise self.fail
        return self.outcome


class Sink(list):
    def __init__(self):
        super().__init__()
        self.cond = threading.Condition()

    def __call__(self, kind, payload):
        with self.cond:
            self.append((kind, payload))
            self.cond.notify_all()

    def results(self, n: int | None = None):
        if n is not None:
            with self.cond:
                assert self.cond.wait_for(lambda: sum(k == "cmd/result" for k, _ in self) >= n, timeout=30)
        return [p for k, p in self if k == "cmd/result"]


@pytest.fixture
def make(tmp_path):
    handlers = []

    def build(installer=None, *, verifier=None, set_interval=None, set_batching=None, pending=True,
              allowed=("http://h/dl/",)):
        sink = Sink()
        h = CommandHandler(Envelope("dev-1", "sess-1"), sink, verifier=verifier or Verifier(), allowed_urls=allowed,
                           installer=installer, set_interval=set_interval, set_batching=set_batching,
                           pending_dir=tmp_path / "pending" if pending else None)
        handlers.append(h)
        return h, sink

    yield build
    for h in handlers:
        h.stop()


def _pending_name(command_id: str) -> str:
    return hashlib.sha256(command_id.encode()).hexdigest()[:24] + ".json"


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("field,ok,bad", [
    ("max_batch", [1, 4096], [0, 4097]),
    ("max_delay_ms", [0.0, 1000.0], [-0.001, 1000.001]),
    ("max_queue", [1, 1_000_000], [0, 1_000_001]),
])
def test_batching_patch_bounds(field, ok, bad):
    for v in ok:
        assert getattr(BatchingPatch(**{field: v}), field) == v
    for v in bad:
        with pytest.raises(ValidationError):
            BatchingPatch(**{field: v})


def test_set_config_args_bounds_and_unknown_keys():
    assert SetConfigArgs(telemetry_interval_s=0.1).telemetry_interval_s == 0.1
    assert SetConfigArgs(telemetry_interval_s=3600).telemetry_interval_s == 3600
    for bad in (0.099, 3600.01):
        with pytest.raises(ValidationError):
            SetConfigArgs(telemetry_interval_s=bad)
    for bad in ({"nope": 1}, {"batching": {"nope": 1}}):
        with pytest.raises(ValidationError):
            SetConfigArgs.model_validate(bad)
    empty = SetConfigArgs()
    assert (empty.telemetry_interval_s, empty.batching) == (None, None)
    assert BatchingPatch().model_dump() == {"enabled": None, "max_batch": None, "max_delay_ms": None,
                                            "max_queue": None}


def test_first_error_names_the_path_or_the_arguments():
    with pytest.raises(ValidationError) as err:
        SetConfigArgs.model_validate({"batching": {"max_batch": 0}, "telemetry_interval_s": 0})
    assert _first_error(err.value) == "telemetry_interval_s: Input should be greater than or equal to 0.1"
    with pytest.raises(ValidationError) as err:
        SetConfigArgs.model_validate({"batching": {"max_batch": 0}})
    assert _first_error(err.value) == "batching.max_batch: Input should be greater than or equal to 1"
    with pytest.raises(ValidationError) as err:
        SetConfigArgs.model_validate(5)
    assert _first_error(err.value) == "<args>: Input should be a valid dictionary or instance of SetConfigArgs"


# --------------------------------------------------------------------------- results


def test_result_fields(make):
    h, sink = make()
    for status, ok in (("accepted", True), ("succeeded", True), ("failed", False), ("rejected", False)):
        h.result("id-" + status, "ping", status, "m", "dep", a=1)
        r = sink.results()[-1]
        assert (r.command_id, r.command, r.ok, r.status, r.message, r.deployment_id, r.details) == \
            ("id-" + status, "ping", ok, status, "m", "dep", {"a": 1})
        assert (r.device_id, r.session_id) == ("dev-1", "sess-1")
    h.result("x" * 70, None, "failed")
    r = sink.results()[-1]
    assert r.command_id == "x" * 64 and r.command is None and r.message == "" and r.details == {}
    h.result("", "ping", "failed")
    assert sink.results()[-1].command_id == "unknown"


def test_ping(make):
    h, sink = make()
    h.handle(raw("ping", "p1", deployment_id="d"))
    (r,) = sink.results()
    assert (r.command_id, r.status, r.message, r.deployment_id, r.details) == ("p1", "succeeded", "pong", "d",
                                                                              {"session_id": "sess-1"})


def test_refused_and_broken_verifier(make):
    h, sink = make(verifier=Verifier(CommandRefused("forged", "bad_signature", "c9")))
    h.handle(b"x")
    assert sink.results() == [] and h.refusals.by_reason == {"bad_signature": 1}
    h2, sink2 = make(verifier=Verifier(OSError("disk gone")))
    h2.handle(b"x")
    (kind, ev), = sink2
    assert kind == "events" and h2.refusals.by_reason == {"internal_error": 1}
    assert ev.message == "command refused: command could not be verified (internal error; see the agent log)"


def test_bad_arguments_are_rejected_with_the_first_error(make):
    h, sink = make(Installer())
    h.handle(raw("rollback", "r1", {"version": "1"}, deployment_id="d1"))
    (r,) = sink.results()
    assert (r.status, r.message, r.deployment_id) == ("rejected", "bad rollback arguments: model: Field required", "d1")


def test_a_handler_crash_is_a_failed_result(make):
    def boom(seconds):
        raise RuntimeError("no timer")

    h, sink = make(set_interval=boom)
    h.handle(raw("set-config", "s1", {"telemetry_interval_s": 1}, deployment_id="d2"))
    (r,) = sink.results()
    assert (r.status, r.message, r.deployment_id) == ("failed", "RuntimeError: no timer", "d2")


# --------------------------------------------------------------------------- deploy and rollback


def test_deploy_accepted_then_succeeded_and_forgotten(make, tmp_path):
    inst = Installer(outcome={"name": "digits", "at": Path("/x")})
    h, sink = make(inst)
    h.handle(raw("deploy", "d1", {"package_url": "http://h/dl/p.eopkg", "sha256": SHA, "size": 5}, "dep"))
    accepted, done = sink.results(2)
    assert (accepted.status, accepted.message, accepted.deployment_id) == ("accepted",
                                                                           "downloading http://h/dl/p.eopkg", "dep")
    assert (done.status, done.message, done.details, done.deployment_id) == ("succeeded", "done",
                                                                             {"name": "digits", "at": "/x"}, "dep")
    assert inst.calls == [("install_url", "http://h/dl/p.eopkg", SHA, 5, "d1", "dep")]
    h.stop()
    assert list((tmp_path / "pending").iterdir()) == []


def test_deploy_outside_the_store_is_rejected(make):
    inst = Installer()
    h, sink = make(inst, allowed=())
    h.handle(raw("deploy", "d1", {"package_url": "http://h/dl/p.eopkg", "sha256": SHA}))
    (r,) = sink.results()
    assert r.status == "rejected" and inst.calls == []
    assert r.message == ("no package store is configured: every package url is refused (set [download] allowed_urls "
                         "in the agent config to the dashboard's download URL)")


def test_rollback_accepted_message_and_arguments(make):
    inst = Installer()
    h, sink = make(inst)
    h.handle(raw("rollback", "r1", {"model": "digits", "version": "1.0.0"}, "dep"))
    accepted, done = sink.results(2)
    assert (accepted.status, accepted.message) == ("accepted", "rolling back digits")
    assert (done.status, done.details) == ("succeeded", {})
    assert inst.calls == [("rollback", "digits", "1.0.0", "r1", "dep")]


def test_no_installer_rejects(make, tmp_path):
    h, sink = make(None)
    h.handle(raw("rollback", "r1", {"model": "digits"}, "dep"))
    (r,) = sink.results()
    assert (r.status, r.message, r.deployment_id) == ("rejected", "this agent has no installer", "dep")
    assert list((tmp_path / "pending").iterdir()) == []


@pytest.mark.parametrize("fail,message", [
    (SecurityError("bad signature", hint="re-sign it"), "bad signature (re-sign it)"),
    (ValueError("odd"), "ValueError: odd"),
])
def test_worker_failures(make, fail, message, tmp_path):
    h, sink = make(Installer(fail=fail))
    h.handle(raw("rollback", "r1", {"model": "digits"}, "dep"))
    _, done = sink.results(2)
    assert (done.status, done.ok, done.message, done.deployment_id) == ("failed", False, message, "dep")
    h.stop()
    assert list((tmp_path / "pending").iterdir()) == []


def test_the_worker_runs_jobs_in_order_and_stops(make):
    inst = Installer()
    h, sink = make(inst)
    for i in range(3):
        h.handle(raw("rollback", f"r{i}", {"model": f"m{i}"}))
    sink.results(6)
    assert [c[1] for c in inst.calls] == ["m0", "m1", "m2"]
    h.stop()
    assert not h._worker.is_alive()


def test_pending_record_while_running(make, tmp_path):
    release, started = threading.Event(), threading.Event()

    class Slow(Installer):
        def rollback(self, *a, **kw):
            started.set()
            release.wait(30)

    h, sink = make(Slow())
    h.handle(raw("rollback", "r1", {"model": "digits"}, "dep"))
    assert started.wait(30)
    (path,) = (tmp_path / "pending").iterdir()
    assert path.name == _pending_name("r1")
    assert json.loads(path.read_text()) == {"id": "r1", "command": "rollback", "deployment_id": "dep",
                                            "args": {"model": "digits"}}
    release.set()
    sink.results(2)


def test_pending_dir_is_made_with_its_parents(tmp_path):
    h = CommandHandler(Envelope("dev-1", "s"), Sink(), verifier=Verifier(), pending_dir=tmp_path / "a" / "b")
    try:
        assert (tmp_path / "a" / "b").is_dir()
        # the install worker must never keep the agent's process from exiting
        assert h._worker.daemon and h._worker.is_alive()
    finally:
        h.stop()


def test_without_a_pending_dir_nothing_is_recorded(make, tmp_path):
    h, sink = make(Installer(), pending=False)
    h.handle(raw("rollback", "r1", {"model": "digits"}))
    assert [r.status for r in sink.results(2)] == ["accepted", "succeeded"]
    assert h.fail_interrupted() == 0 and not (tmp_path / "pending").exists()


def test_fail_interrupted(make, tmp_path):
    pending = tmp_path / "pending"
    h, sink = make(Installer())
    (pending / "a.json").write_text(json.dumps({"id": "i1", "command": "deploy", "deployment_id": "dep",
                                                "args": {"name": "digits"}}))
    (pending / "b.json").write_text(json.dumps({"command": "rollback", "args": {"model": "other"}}))
    (pending / "c.json").write_text(json.dumps({"id": "i3", "command": "rollback", "args": None}))
    (pending / "0.json").write_text("{broken")  # first in order: the others are still answered
    (pending / "keep.txt").write_text("not a record")
    serving = {"digits": "1.0.0", "other": "3.0.0"}
    assert h.fail_interrupted(serving.get) == 3
    r1, r2, r3 = sink.results()
    tail = "; send the command again"
    head = "interrupted: the agent stopped before the command finished; the state was recovered"
    assert (r1.command_id, r1.command, r1.status, r1.deployment_id, r1.details) == ("i1", "deploy", "failed", "dep",
                                                                                    {"interrupted": True})
    assert r1.message == head + " and digits 1.0.0 is serving" + tail
    assert (r2.command_id, r2.command, r2.message) == ("unknown", "rollback", head + " and other 3.0.0 is serving" + tail)
    assert (r3.command_id, r3.message) == ("i3", head + tail)
    assert sorted(p.name for p in pending.iterdir()) == ["keep.txt"]


# --------------------------------------------------------------------------- set-config


def test_set_config_applies_and_reports(make):
    applied = {}
    h, sink = make(set_interval=lambda s: applied.__setitem__("interval", s), set_batching=lambda **kw: applied.update(kw))
    h.handle(raw("set-config", "s1", {"telemetry_interval_s": 2, "batching": {"max_batch": 8, "enabled": False}}, "d"))
    assert applied == {"interval": 2.0, "max_batch": 8, "enabled": False}
    (kind, ev), (_, r) = sink
    assert kind == "events" and (ev.event, ev.message, ev.command_id) == ("config", "runtime settings changed", "s1")
    assert ev.details == {"telemetry_interval_s": 2.0, "batching": {"max_batch": 8, "enabled": False}}
    assert (r.status, r.message, r.deployment_id) == ("succeeded", "applied until the agent restarts", "d")
    assert r.details == ev.details


def test_set_config_one_part_only(make):
    applied = {}
    h, sink = make(set_interval=lambda s: applied.__setitem__("interval", s))
    h.handle(raw("set-config", "s1", {"telemetry_interval_s": 3}))
    assert applied == {"interval": 3.0} and sink.results()[0].details == {"telemetry_interval_s": 3.0}
    h2, sink2 = make(set_batching=lambda **kw: applied.update(kw))
    h2.handle(raw("set-config", "s2", {"batching": {"max_queue": 10}}))
    assert sink2.results()[0].details == {"batching": {"max_queue": 10}}


@pytest.mark.parametrize("args", [{}, {"batching": {}}, {"batching": {"max_batch": None}}])
def test_set_config_with_nothing_to_change_is_rejected(make, args):
    h, sink = make(set_interval=lambda s: None, set_batching=lambda **kw: None)
    h.handle(raw("set-config", "s1", args, "d"))
    (r,) = sink.results()
    assert (r.status, r.message, r.deployment_id) == ("rejected", "set-config needs telemetry_interval_s and/or batching",
                                                      "d")
    assert [k for k, _ in sink] == ["cmd/result"]


@pytest.mark.parametrize("args,message", [
    ({"telemetry_interval_s": 1}, "telemetry interval cannot be changed on this agent"),
    ({"batching": {"max_batch": 2}}, "batching cannot be changed on this agent"),
])
def test_set_config_on_an_agent_that_cannot(make, args, message):
    h, sink = make()
    h.handle(raw("set-config", "s1", args))
    (r,) = sink.results()
    assert (r.status, r.message) == ("failed", message)


def test_bad_set_config_is_rejected(make):
    h, sink = make(set_interval=lambda s: None)
    h.handle(raw("set-config", "s1", {"telemetry_interval_s": 0.05}))
    assert sink.results()[0].message == ("bad set-config arguments: telemetry_interval_s: Input should be greater "
                                         "than or equal to 0.1")


# --------------------------------------------------------------------------- helpers


def test_outcome():
    assert _outcome(None) == {}
    assert _outcome({"a": Path("/p"), "b": [1]}) == {"a": "/p", "b": [1]}
    model = type("M", (), {"name": "digits", "version": "2.0.0", "previous_version": None})()
    assert _outcome(model) == {"model": "digits", "version": "2.0.0"}
    full = type("M", (), {"name": "d", "version": 2, "previous_version": "1"})()
    assert _outcome(full) == {"model": "d", "version": "2", "previous_version": "1"}
    assert _outcome(object()) == {}


def test_describe():
    assert _describe(EdgeoptError("it broke", hint="fix it")) == "it broke (fix it)"
    assert _describe(KeyError("k")) == "KeyError: 'k'"


# --------------------------------------------------------------------------- control: replay memory


def _cmd(command_id="c1", nonce=None, ttl_s=60):
    cmd = new_command("ping", fleet="test", device_id="dev-1", command_id=command_id, ttl_s=ttl_s)
    return cmd.model_copy(update={"nonce": nonce}) if nonce else cmd


def test_replay_guard_refuses_a_second_delivery(tmp_path):
    guard = ReplayGuard(tmp_path / "a" / "b" / "control.db")  # its folder is made, parents too
    assert guard.max_remembered == C.MAX_REMEMBERED == 200_000
    guard.record(_cmd("c1", "n1"), 100.0, 0.0)
    for again in (_cmd("c1", "n2"), _cmd("c2", "n1")):  # the same id, or the same nonce
        with pytest.raises(CommandRefused) as err:
            guard.record(again, 100.0, 0.0)
        assert err.value.reason == "replayed" and err.value.claimed_id == again.id
        assert str(err.value) == f"command {again.id} was already received: replay refused"
    assert len(guard) == 1
    guard.close()


def test_replay_guard_is_used_from_another_thread(tmp_path):
    """The MQTT thread records what the agent's main thread opened."""
    guard = ReplayGuard(tmp_path / "control.db")
    errors = []

    def record():
        try:
            guard.record(_cmd("c1", "n1"), 100.0, 0.0)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=record)
    t.start()
    t.join(30)
    assert errors == [] and len(guard) == 1
    guard.close()


def test_replay_guard_forgets_only_after_the_deadline(tmp_path):
    guard = ReplayGuard(tmp_path / "control.db")
    guard.record(_cmd("c1", "n1"), 100.0, 0.0)
    with pytest.raises(CommandRefused):
        guard.record(_cmd("c1", "n1"), 100.0, 100.0)  # at its forget_after: still remembered
    guard.record(_cmd("c1", "n1"), 200.0, 100.001)  # after it: forgotten, accepted again
    assert len(guard) == 1
    guard.close()


def test_replay_guard_full_memory_refuses(tmp_path):
    guard = ReplayGuard(tmp_path / "control.db", max_remembered=2)
    guard.record(_cmd("c1", "n1"), 100.0, 0.0)
    guard.record(_cmd("c2", "n2"), 100.0, 0.0)
    with pytest.raises(CommandRefused) as err:
        guard.record(_cmd("c3", "n3"), 100.0, 0.0)
    assert str(err.value) == "command c3 refused: 2 unexpired commands remembered already (replay memory full)"
    assert err.value.hint == "lower the dashboard's command lifetime" and err.value.reason == "replayed"
    guard.record(_cmd("c3", "n3"), 200.0, 150.0)  # the first two expired: room again
    assert len(guard) == 1
    guard.close()


def test_replay_memory_is_on_disk(tmp_path):
    guard = ReplayGuard(tmp_path / "control.db")
    guard.record(_cmd("c1", "n1"), 123.5, 0.0)
    guard.close()
    rows = sqlite3.connect(tmp_path / "control.db").execute("SELECT nonce, id, forget_after FROM seen").fetchall()
    assert rows == [("n1", "c1", 123.5)]


def test_verifier_remembers_until_expiry_plus_skew(agent_config, command_keys, sign_command):
    config = agent_config(control={"trust_keys": [str(command_keys.public)], "max_clock_skew_s": 30})
    now = datetime.now(timezone.utc).timestamp()
    verifier = CommandVerifier(config, clock=lambda: now)
    cmd = verifier.verify(sign_command(command_keys.private, "ping", fleet="test", device_id="dev-1",
                                       command_id="v1", ttl_s=60))
    assert cmd.id == "v1"
    verifier.close()
    (forget_after,) = sqlite3.connect(Path(config.state_dir) / "control.db").execute(
        "SELECT forget_after FROM seen").fetchone()
    assert forget_after == cmd.expires_at.timestamp() + 30
    late = CommandVerifier(config, clock=lambda: now + 3600)
    with pytest.raises(CommandRefused) as err:
        late.verify(sign_command(command_keys.private, "ping", fleet="test", device_id="dev-1", ttl_s=60))
    assert err.value.reason != "replayed"
    late.close()


# --------------------------------------------------------------------------- control: refusal reporter


def test_refusal_reporter_rate_limit_and_counts():
    clock = [100.0]
    sink = Sink()
    rep = RefusalReporter(Envelope("dev-1", "s"), sink, clock=lambda: clock[0])
    assert rep.min_interval_s == 5.0 and rep.total == 0
    rep.refused(CommandRefused("bad sig", "bad_signature", "c1", hint="check keys"))
    (kind, ev), = sink
    assert kind == "events" and (ev.event, ev.ok, ev.command_id) == ("refused", False, None)
    assert ev.message == "command refused: bad sig (check keys)"
    assert ev.details == {"reason": "bad_signature", "claimed_command_id": "c1", "refused_total": 1,
                          "refused_by_reason": {"bad_signature": 1}, "not_reported_separately": 0}
    clock[0] = 104.999
    rep.refused(CommandRefused("old", "expired"))
    rep.refused(CommandRefused("old", "expired"))
    assert len(sink) == 1 and rep.total == 3
    clock[0] = 105.0  # exactly min_interval_s after the last report: reported
    rep.refused(CommandRefused("other", "wrong_device", "c4"))
    assert len(sink) == 2
    assert sink[-1][1].details == {"reason": "wrong_device", "claimed_command_id": "c4", "refused_total": 4,
                                   "refused_by_reason": {"bad_signature": 1, "expired": 2, "wrong_device": 1},
                                   "not_reported_separately": 2}
    clock[0] = 110.0
    rep.refused(CommandRefused("x", "expired"))
    assert sink[-1][1].details["not_reported_separately"] == 0


def test_refusal_reporter_reports_the_first_at_any_clock():
    sink = Sink()
    rep = RefusalReporter(Envelope("dev-1", "s"), sink, min_interval_s=10, clock=lambda: -1e9)
    rep.refused(CommandRefused("x", "expired"))
    assert len(sink) == 1
