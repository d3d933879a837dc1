"""Command handling (unit): only signed commands for this device run; every verified command gets a
result naming its id; a refused one gets a rate-limited ``refused`` event and no result; nothing raises.

The installer is faked here (its real behaviour is tested in test_install.py and the integration tests);
the verifier is the real one, with its replay memory in a temporary state directory.
"""
from __future__ import annotations

import json
import threading

import pytest

from edgeopt.agent.commands import CommandHandler
from edgeopt.agent.control import CommandVerifier
from edgeopt.agent.mqtt import Envelope
from edgeopt.sdk.errors import SecurityError
from edgeopt.sdk.telemetry import CommandResultPayload, EventPayload

SHA = "a" * 64
STORE = "http://h/dl/"


class FakeInstaller:
    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.calls: list[tuple] = []
        self.done = threading.Event()

    def install_url(self, url, sha256, size=None, *, command_id=None, deployment_id=None):
        self.calls.append(("install_url", url, sha256, size, command_id, deployment_id))
        self.done.set()
        if self.fail:
            raise self.fail
        return type("Installed", (), {"name": "digits", "version": "2.0.0", "previous_version": "1.0.0"})()

    def rollback(self, model, version=None, *, command_id=None, deployment_id=None):
        self.calls.append(("rollback", model, version, command_id))
        self.done.set()
        return type("Installed", (), {"name": model, "version": "1.0.0", "previous_version": None})()


class Sink(list):
    def __call__(self, kind, payload):
        self.append((kind, payload))

    def results(self) -> list[CommandResultPayload]:
        return [p for k, p in self if k == "cmd/result"]

    def events(self) -> list[EventPayload]:
        return [p for k, p in self if k == "events"]

    def wait_results(self, n: int) -> list[CommandResultPayload]:
        for _ in range(500):
            if len(self.results()) >= n:
                break
            threading.Event().wait(0.01)
        return self.results()


@pytest.fixture
def control_config(agent_config, command_keys):
    """An AgentConfig (device dev-1, fleet test) that trusts the dashboard's command key."""
    def make(**control):
        return agent_config(control={"trust_keys": [str(command_keys.public)], **control},
                            download={"allowed_urls": [STORE]})
    return make


@pytest.fixture
def cmd(command_keys, sign_command):
    """``cmd(id, command, args=..., **fields)``: a command signed by the dashboard's key for dev-1."""
    def make(command_id: str, command: str, args: dict | None = None, key=None, **fields) -> bytes:
        fields.setdefault("fleet", "test")
        fields.setdefault("device_id", "dev-1")
        return sign_command(key or command_keys.private, command, command_id=command_id, args=args, **fields)
    return make


def _handler(config, sink, installer=None, pending_dir=None, applied=None):
    applied = applied if applied is not None else {}
    return CommandHandler(Envelope("dev-1", "sess-1"), sink, verifier=CommandVerifier(config),
                          allowed_urls=config.download.allowed_urls, installer=installer,
                          set_interval=lambda s: applied.__setitem__("interval", s),
                          set_batching=lambda **kw: applied.update(kw), pending_dir=pending_dir)


@pytest.fixture
def setup(control_config):
    sink = Sink()
    installer = FakeInstaller()
    applied: dict = {}
    handler = _handler(control_config(), sink, installer, applied=applied)
    yield handler, sink, installer, applied
    handler.stop()
    handler.verifier.close()


@pytest.mark.parametrize("command, args, message", [
    ("deploy", {"package_url": "http://h/dl/p.eopkg"}, "bad deploy arguments: sha256: Field required"),
    ("deploy", {"package_url": "http://h/dl/x", "sha256": SHA, "force": True},
     "bad deploy arguments: force: Extra inputs are not permitted"),
    ("rollback", {}, "bad rollback arguments: model: Field required"),
    ("set-config", {"telemetry_interval_s": 0},
     "bad set-config arguments: telemetry_interval_s: Input should be greater than or equal to 0.1"),
    ("set-config", {"colour": "red"}, "bad set-config arguments: colour: Extra inputs are not permitted"),
    ("set-config", {}, "set-config needs telemetry_interval_s and/or batching"),
])
def test_signed_commands_with_bad_arguments_get_a_rejected_result(setup, cmd, command, args, message):
    handler, sink, installer, _ = setup
    handler.handle(cmd("c1", command, args))
    (result,) = sink.results()
    assert result.command_id == "c1" and result.status == "rejected" and result.ok is False
    assert message in result.message
    assert installer.calls == []
    assert result.session_id == "sess-1" and result.device_id == "dev-1"


def _unsigned(**doc) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize("raw, reason, message", [
    (b"{not json", "malformed", "malformed command: payload is not JSON"),
    (b"[1, 2]", "malformed", "malformed command: payload must be a JSON object"),
    (b"[" * 100_000, "malformed", "malformed command"),
    # What mosquitto_pub sent in the probe: schema 1, no signature. It used to run.
    (_unsigned(id="c1", command="rollback", args={"model": "digits"}), "unsigned", "unsigned command"),
    (_unsigned(id="c2", command="set-config", schema_version="1.0", args={"telemetry_interval_s": 3600}),
     "unsigned", "unsigned command: unsupported schema_version '1.0'"),
    (_unsigned(schema_version="2.0", body="{}", key_id="0" * 16, signature="AA=="), "unknown_key",
     "command signed by key 0000000000000000, which this device does not trust"),
])
def test_unsigned_or_malformed_messages_are_refused_without_a_result(setup, raw, reason, message):
    handler, sink, installer, applied = setup
    handler.handle(raw)
    assert sink.results() == [] and installer.calls == [] and applied == {}
    (event,) = sink.events()
    assert event.event == "refused" and event.ok is False and event.details["reason"] == reason
    assert event.message.startswith("command refused: " + message)
    assert event.command_id is None  # the id is unverified: never attached to a deployment's command
    assert handler.refusals.by_reason == {reason: 1}


def test_forged_expired_foreign_and_replayed_commands_are_refused(setup, cmd, command_keys):
    from datetime import datetime, timedelta, timezone

    handler, sink, installer, applied = setup
    now = datetime.now(timezone.utc)
    ok = cmd("good", "rollback", {"model": "digits"})
    attempts = {
        "bad_signature": ok.replace(b'\\"digits\\"', b'\\"other\\"'),  # body edited after signing
        "unknown_key": cmd("forged", "rollback", {"model": "digits"}, key=command_keys.other_private),
        "wrong_target": cmd("elsewhere", "rollback", {"model": "digits"}, device_id="dev-2"),
        "expired": cmd("old", "rollback", {"model": "digits"}, issued_at=now - timedelta(hours=2),
                       expires_at=now - timedelta(hours=1)),
        "not_yet_valid": cmd("future", "rollback", {"model": "digits"}, issued_at=now + timedelta(hours=1),
                             expires_at=now + timedelta(hours=2)),
        "lifetime_too_long": cmd("forever", "rollback", {"model": "digits"}, expires_at=now + timedelta(days=30)),
    }
    assert attempts["bad_signature"] != ok
    for raw in attempts.values():
        handler.handle(raw)
    assert sink.results() == [] and installer.calls == []
    assert handler.refusals.by_reason == {reason: 1 for reason in attempts}
    handler.handle(ok)
    _, done = sink.wait_results(2)
    assert done.command_id == "good" and done.status == "succeeded"
    handler.handle(ok)  # the same message again: a replay
    assert handler.refusals.by_reason["replayed"] == 1
    assert installer.calls == [("rollback", "digits", None, "good")]
    # Refusals are reported as events, one at once and the rest folded into the next (rate limit).
    (event,) = sink.events()
    assert event.details["reason"] == "bad_signature"


def test_replay_memory_survives_a_restart(control_config, cmd):
    config = control_config()
    raw = cmd("once", "ping")
    first_sink, second_sink = Sink(), Sink()
    first = _handler(config, first_sink)
    first.handle(raw)
    assert [r.status for r in first_sink.results()] == ["succeeded"]
    first.stop()
    first.verifier.close()
    second = _handler(config, second_sink)  # "restart" on the same state directory
    try:
        second.handle(raw)
        assert second_sink.results() == []
        assert second.refusals.by_reason == {"replayed": 1}
        second.handle(cmd("once", "ping"))  # same id, fresh nonce: still the same command id
        assert second.refusals.by_reason == {"replayed": 2}
    finally:
        second.stop()
        second.verifier.close()


def test_no_trusted_key_refuses_everything(agent_config, cmd):
    sink = Sink()
    config = agent_config()
    handler = _handler(config, sink, FakeInstaller())
    try:
        handler.handle(cmd("p", "ping"))
        assert sink.results() == []
        assert handler.refusals.by_reason == {"no_trusted_key": 1}
        assert "no command-signing key is trusted" in sink.events()[0].message
    finally:
        handler.stop()
        handler.verifier.close()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:5432/", "http://h:8080/dl/p.eopkg", "https://h/dl/p.eopkg", "http://other/dl/p.eopkg",
    "http://h/dl/../admin", "http://h/dl/%2e%2e/admin", "http://user@h/dl/p", "http://h/dlx/p", "file:///etc/passwd",
])
def test_deploy_outside_the_package_store_is_rejected_before_any_download(setup, cmd, url):
    handler, sink, installer, _ = setup
    handler.handle(cmd("d-out", "deploy", {"package_url": url, "sha256": SHA}))
    (result,) = sink.results()
    assert result.status == "rejected" and installer.calls == []
    assert "refused" in result.message or "must be http" in result.message


def test_ping(setup, cmd):
    handler, sink, _, _ = setup
    handler.handle(cmd("p1", "ping"))
    (result,) = sink.results()
    assert (result.command_id, result.status, result.ok, result.message) == ("p1", "succeeded", True, "pong")


def test_deploy_answers_accepted_then_succeeded(setup, cmd):
    handler, sink, installer, _ = setup
    handler.handle(cmd("d1", "deploy", {"package_url": "http://h/dl/p.eopkg", "sha256": SHA, "size": 10},
                       deployment_id="dep-9"))
    accepted, done = sink.wait_results(2)
    assert (accepted.status, done.status) == ("accepted", "succeeded")
    assert done.command_id == "d1" and done.deployment_id == "dep-9"
    assert done.details == {"model": "digits", "version": "2.0.0", "previous_version": "1.0.0"}
    assert installer.calls == [("install_url", "http://h/dl/p.eopkg", SHA, 10, "d1", "dep-9")]
    assert accepted.seq < done.seq


def test_deploy_failure_is_a_failed_result(setup, cmd):
    handler, sink, installer, _ = setup
    installer.fail = SecurityError("signature does not verify with any trusted key")
    handler.handle(cmd("d2", "deploy", {"package_url": "http://h/dl/p", "sha256": SHA}))
    accepted, done = sink.wait_results(2)
    assert (done.status, done.ok) == ("failed", False)
    assert done.message == "signature does not verify with any trusted key"


def test_unexpected_installer_crash_is_a_failed_result(setup, cmd):
    handler, sink, installer, _ = setup
    installer.fail = RuntimeError("disk on fire")
    handler.handle(cmd("d3", "deploy", {"package_url": "http://h/dl/p", "sha256": SHA}))
    _, done = sink.wait_results(2)
    assert done.status == "failed" and done.message == "RuntimeError: disk on fire"


def test_rollback(setup, cmd):
    handler, sink, installer, _ = setup
    handler.handle(cmd("r1", "rollback", {"model": "digits"}))
    _, done = sink.wait_results(2)
    assert done.status == "succeeded" and done.details["version"] == "1.0.0"
    assert installer.calls == [("rollback", "digits", None, "r1")]


def test_set_config_applies_and_emits_event(setup, cmd):
    handler, sink, _, applied = setup
    handler.handle(cmd("s1", "set-config",
                       {"telemetry_interval_s": 2.5, "batching": {"max_batch": 4, "max_delay_ms": 1}}))
    (result,) = sink.results()
    assert result.status == "succeeded"
    assert applied == {"interval": 2.5, "max_batch": 4, "max_delay_ms": 1.0}
    (event,) = [p for k, p in sink if k == "events"]
    assert isinstance(event, EventPayload) and event.event == "config" and event.command_id == "s1"


def test_command_interrupted_by_a_stop_gets_a_failed_result_after_restart(tmp_path, control_config, cmd):
    """A deploy accepted, then the agent killed before it finished: the next start answers it as failed."""
    class Hanging(FakeInstaller):
        def install_url(self, *a, **kw):
            self.done.set()
            threading.Event().wait(3600)  # stands for a process killed mid-install

    pending = tmp_path / "commands"
    first_sink = Sink()
    config = control_config()
    first = _handler(config, first_sink, Hanging(), pending_dir=pending)
    first.handle(cmd("d7", "deploy", {"package_url": "http://h/dl/p.eopkg", "sha256": SHA, "name": "digits"},
                     deployment_id="dep-7"))
    assert [r.status for r in first_sink.wait_results(1)] == ["accepted"]
    assert len(list(pending.glob("*.json"))) == 1
    # "restart": a new handler on the same state dir
    sink = Sink()
    first.verifier.close()
    second = _handler(config, sink, FakeInstaller(), pending_dir=pending)
    try:
        assert second.fail_interrupted(lambda name: "1.0.0" if name == "digits" else None) == 1
        (res,) = sink.results()
        assert (res.command_id, res.status, res.deployment_id, res.details) == ("d7", "failed", "dep-7",
                                                                                  {"interrupted": True})
        assert res.message == ("interrupted: the agent stopped before the command finished; the state was "
                               "recovered and digits 1.0.0 is serving; send the command again")
        assert list(pending.glob("*.json")) == []
        assert second.fail_interrupted() == 0  # answered once only
    finally:
        second.stop()


def test_finished_commands_leave_no_pending_record(tmp_path, control_config, cmd):
    sink = Sink()
    handler = _handler(control_config(), sink, FakeInstaller(), pending_dir=tmp_path / "pending")
    tmp_path = tmp_path / "pending"
    try:
        handler.handle(cmd("d8", "deploy", {"package_url": "http://h/dl/p.eopkg", "sha256": SHA}))
        assert [r.status for r in sink.wait_results(2)] == ["accepted", "succeeded"]
        for _ in range(100):
            if not list(tmp_path.glob("*.json")):
                break
            threading.Event().wait(0.01)
        assert list(tmp_path.glob("*.json")) == []
    finally:
        handler.stop()


def test_a_broken_replay_memory_refuses_instead_of_crashing(control_config, cmd):
    """If the replay memory cannot be written (disk gone), the command is refused, never run unchecked."""
    sink = Sink()
    installer = FakeInstaller()
    handler = _handler(control_config(), sink, installer)
    try:
        handler.verifier.replay.close()  # every later write fails
        handler.handle(cmd("r9", "rollback", {"model": "digits"}))
        assert installer.calls == [] and sink.results() == []
        assert handler.refusals.by_reason == {"internal_error": 1}
        assert "internal error" in sink.events()[0].message
    finally:
        handler.stop()
