"""Command handling (unit): every command, malformed or not, gets a result naming its id; nothing raises.

The installer is faked here (its real behaviour is tested in test_install.py and the integration tests).
"""
from __future__ import annotations

import json
import threading

import pytest

from edgeopt.agent.commands import CommandHandler
from edgeopt.agent.mqtt import Envelope
from edgeopt.sdk.errors import SecurityError
from edgeopt.sdk.telemetry import CommandResultPayload, EventPayload

SHA = "a" * 64


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

    def wait_results(self, n: int) -> list[CommandResultPayload]:
        for _ in range(500):
            if len(self.results()) >= n:
                break
            threading.Event().wait(0.01)
        return self.results()


@pytest.fixture
def setup():
    sink = Sink()
    installer = FakeInstaller()
    applied: dict = {}
    handler = CommandHandler(Envelope("dev-1", "sess-1"), sink, installer=installer,
                             set_interval=lambda s: applied.__setitem__("interval", s),
                             set_batching=lambda **kw: applied.update(kw))
    yield handler, sink, installer, applied
    handler.stop()


def _cmd(**doc) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize("raw, cid, message", [
    (b"{not json", "unknown", "payload is not JSON"),
    (b"[1, 2]", "unknown", "payload must be a JSON object"),
    (_cmd(id="c1", command="reboot"), "c1", "invalid cmd payload at command"),
    (_cmd(command="ping"), "unknown", "invalid cmd payload at id: Field required"),
    (_cmd(id="c2", command="ping", schema_version="9.0"), "c2", "unsupported schema_version '9.0'"),
    (_cmd(id="c3", command="deploy", args={"package_url": "http://x/p.eopkg"}), "c3",
     "bad deploy arguments: sha256: Field required"),
    (_cmd(id="c4", command="deploy", args={"package_url": "http://x", "sha256": SHA, "force": True}), "c4",
     "bad deploy arguments: force: Extra inputs are not permitted"),
    (_cmd(id="c5", command="rollback", args={}), "c5", "bad rollback arguments: model: Field required"),
    (_cmd(id="c6", command="set-config", args={"telemetry_interval_s": 0}), "c6",
     "bad set-config arguments: telemetry_interval_s: Input should be greater than or equal to 0.1"),
    (_cmd(id="c7", command="set-config", args={"colour": "red"}), "c7",
     "bad set-config arguments: colour: Extra inputs are not permitted"),
    (_cmd(id="c8", command="set-config", args={}), "c8", "set-config needs telemetry_interval_s and/or batching"),
])
def test_malformed_commands_get_a_rejected_result(setup, raw, cid, message):
    handler, sink, installer, _ = setup
    handler.handle(raw)
    (result,) = sink.results()
    assert result.command_id == cid and result.status == "rejected" and result.ok is False
    assert message in result.message
    assert installer.calls == []
    assert result.session_id == "sess-1" and result.device_id == "dev-1"


def test_ping(setup):
    handler, sink, _, _ = setup
    handler.handle(_cmd(id="p1", command="ping"))
    (result,) = sink.results()
    assert (result.command_id, result.status, result.ok, result.message) == ("p1", "succeeded", True, "pong")


def test_deploy_answers_accepted_then_succeeded(setup):
    handler, sink, installer, _ = setup
    handler.handle(_cmd(id="d1", command="deploy", deployment_id="dep-9",
                        args={"package_url": "http://h/p.eopkg", "sha256": SHA, "size": 10}))
    accepted, done = sink.wait_results(2)
    assert (accepted.status, done.status) == ("accepted", "succeeded")
    assert done.command_id == "d1" and done.deployment_id == "dep-9"
    assert done.details == {"model": "digits", "version": "2.0.0", "previous_version": "1.0.0"}
    assert installer.calls == [("install_url", "http://h/p.eopkg", SHA, 10, "d1", "dep-9")]
    assert accepted.seq < done.seq


def test_deploy_failure_is_a_failed_result(setup):
    handler, sink, installer, _ = setup
    installer.fail = SecurityError("signature does not verify with any trusted key")
    handler.handle(_cmd(id="d2", command="deploy", args={"package_url": "http://h/p", "sha256": SHA}))
    accepted, done = sink.wait_results(2)
    assert (done.status, done.ok) == ("failed", False)
    assert done.message == "signature does not verify with any trusted key"


def test_unexpected_installer_crash_is_a_failed_result(setup):
    handler, sink, installer, _ = setup
    installer.fail = RuntimeError("disk on fire")
    handler.handle(_cmd(id="d3", command="deploy", args={"package_url": "http://h/p", "sha256": SHA}))
    _, done = sink.wait_results(2)
    assert done.status == "failed" and done.message == "RuntimeError: disk on fire"


def test_rollback(setup):
    handler, sink, installer, _ = setup
    handler.handle(_cmd(id="r1", command="rollback", args={"model": "digits"}))
    _, done = sink.wait_results(2)
    assert done.status == "succeeded" and done.details["version"] == "1.0.0"
    assert installer.calls == [("rollback", "digits", None, "r1")]


def test_set_config_applies_and_emits_event(setup):
    handler, sink, _, applied = setup
    handler.handle(_cmd(id="s1", command="set-config",
                        args={"telemetry_interval_s": 2.5, "batching": {"max_batch": 4, "max_delay_ms": 1}}))
    (result,) = sink.results()
    assert result.status == "succeeded"
    assert applied == {"interval": 2.5, "max_batch": 4, "max_delay_ms": 1.0}
    (event,) = [p for k, p in sink if k == "events"]
    assert isinstance(event, EventPayload) and event.event == "config" and event.command_id == "s1"


def test_command_interrupted_by_a_stop_gets_a_failed_result_after_restart(tmp_path):
    """A deploy accepted, then the agent killed before it finished: the next start answers it as failed."""
    class Hanging(FakeInstaller):
        def install_url(self, *a, **kw):
            self.done.set()
            threading.Event().wait(3600)  # stands for a process killed mid-install

    pending = tmp_path / "commands"
    first_sink = Sink()
    first = CommandHandler(Envelope("dev-1", "sess-1"), first_sink, installer=Hanging(), pending_dir=pending)
    first.handle(_cmd(id="d7", command="deploy", deployment_id="dep-7",
                      args={"package_url": "http://h/p.eopkg", "sha256": SHA, "name": "digits"}))
    assert [r.status for r in first_sink.wait_results(1)] == ["accepted"]
    assert len(list(pending.glob("*.json"))) == 1
    # "restart": a new handler on the same state dir
    sink = Sink()
    second = CommandHandler(Envelope("dev-1", "sess-2"), sink, installer=FakeInstaller(), pending_dir=pending)
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


def test_finished_commands_leave_no_pending_record(tmp_path):
    sink = Sink()
    handler = CommandHandler(Envelope("dev-1", "sess-1"), sink, installer=FakeInstaller(), pending_dir=tmp_path)
    try:
        handler.handle(_cmd(id="d8", command="deploy", args={"package_url": "http://h/p.eopkg", "sha256": SHA}))
        assert [r.status for r in sink.wait_results(2)] == ["accepted", "succeeded"]
        for _ in range(100):
            if not list(tmp_path.glob("*.json")):
                break
            threading.Event().wait(0.01)
        assert list(tmp_path.glob("*.json")) == []
    finally:
        handler.stop()
