"""`edgeopt-agent` as a real process: --help, one-line errors, serving while the broker is unreachable,
SIGTERM shutdown, and an outbox left by one run delivered, in order, by the next."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from agent_support import Broker, Subscriber, agent_test_fixtures, free_port, infer, wait_for
from edgeopt.agent.config import render_config
from edgeopt.agent.daemon import POINTER_POLL_S
from edgeopt.agent.outbox import Outbox
from edgeopt.sdk.telemetry import parse_payload

_fx = agent_test_fixtures()
make_package = _fx.make_package
agent_keys = _fx.agent_keys

AGENT = [sys.executable, "-m", "edgeopt.agent.daemon"]


def _run(args, **kw):
    return subprocess.run(AGENT + args, capture_output=True, text=True, timeout=120, **kw)


def _write_config(tmp_path: Path, keys, broker_port: int, api_port: int, device_id: str = "daemon-1") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(render_config(device_id=device_id, fleet="itest", broker=f"mqtt://127.0.0.1:{broker_port}",
                                  state_dir=tmp_path / "state", trusted_keys=[keys.trusted_public],
                                  api_port=api_port, telemetry_interval_s=0.3))
    return path


def test_help():
    out = _run(["--help"])
    assert out.returncode == 0
    assert "--config" in out.stdout and "SIGTERM" in out.stdout


def test_missing_and_invalid_config_are_one_line_errors(tmp_path, agent_keys):
    out = _run(["--config", str(tmp_path / "nope.toml")])
    assert out.returncode == 3
    assert out.stderr.strip().splitlines() == [
        f"edgeopt-agent: error: {tmp_path / 'nope.toml'}: agent config file not found "
        "(create one with: edgeopt agent init ... > agent.toml)"]
    bad = _write_config(tmp_path, agent_keys, 1883, 0)
    bad.write_text(bad.read_text() + "\ncolour = 'red'\n")
    out = _run(["--config", str(bad)])
    assert out.returncode == 3
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("edgeopt-agent: error: ") and "colour" in line


def test_port_in_use_is_a_clear_error(tmp_path, agent_keys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _run(["--config", str(_write_config(tmp_path, agent_keys, free_port(), port))])
    assert out.returncode == 8
    assert out.stderr.strip().splitlines()[-1] == (
        f"edgeopt-agent: error: local API port 127.0.0.1:{port} is already in use "
        "(stop the other process or set [api] port in the config)")


def _outbox_payloads(state_dir: Path) -> list:
    box = Outbox(state_dir)
    try:
        rows = box.peek(100_000)
    finally:
        box.close()
    return [parse_payload(r.topic.split("/", 4)[4], r.payload) for r in rows]


def test_unreachable_broker_then_restart_delivers_the_outbox(tmp_path, agent_keys, make_package, digits_heldout):
    from edgeopt.agent.config import load_config
    from edgeopt.agent.installer import Installer
    from edgeopt.agent.store import Store

    api_port, broker_port = free_port(), free_port()
    config_path = _write_config(tmp_path, agent_keys, broker_port, api_port)
    config = load_config(config_path)
    Installer(Store(config.state_dir), config).install_file(make_package("1.0.0"))
    images = np.load(digits_heldout)["images"][:4]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # Run 1: the broker is down. The agent serves anyway and buffers telemetry and events on disk.
    proc = subprocess.Popen(AGENT + ["--config", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"agent exited: {proc.stderr.read()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=2)
                conn.request("GET", "/v2/health/ready")
                return conn.getresponse().status == 200
            except OSError:
                return False

        wait_for(ready, 60, what="the agent's API")
        for i in range(4):
            code, body = infer(("127.0.0.1", api_port), images[i:i + 1])
            assert code == 200 and body["model_version"] == "1.0.0"
        wait_for(lambda: sum(1 for p in _outbox_payloads(config.state_dir) if p.kind == "telemetry") >= 3, 30,
                 what="telemetry in the outbox")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    pending = _outbox_payloads(config.state_dir)
    first_session = {p.session_id for p in pending}
    assert len(first_session) == 1
    assert [p.seq for p in pending] == sorted(p.seq for p in pending)
    assert any(p.kind == "event" and p.event == "stopped" for p in pending)
    assert sum(m.requests for p in pending if p.kind == "telemetry" for m in p.models) == 4

    # Run 2: the broker is up. Everything run 1 left is delivered, in order, before/alongside run 2's own.
    broker = Broker(tmp_path / "broker", port=broker_port).start()
    sub = Subscriber("127.0.0.1", broker_port, "itest", "daemon-1")
    proc = subprocess.Popen(AGENT + ["--config", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    online: list = []
    try:
        want = [(p.session_id, p.seq) for p in pending]

        def delivered():
            with sub.lock:
                got = [(p.session_id, p.seq) for _, p in sub.messages if p is not None]
            return [g for g in got if g in set(want)] if set(want) <= set(got) else None

        got = wait_for(delivered, 60, what="the first run's outbox at the subscriber")
        deduped = list(dict.fromkeys(got))
        assert deduped == want  # in order, none missing
        online = wait_for(lambda: [s for s in sub.of("status") if s.state == "online"], 20, what="birth")
        assert online[-1].session_id not in first_session and online[-1].packages[0].version == "1.0.0"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        try:
            assert proc.returncode == 0, err[-2000:]
            offline = wait_for(lambda: [s for s in sub.of("status") if s.state == "offline"], 10,
                               what="the offline status on SIGTERM")
            assert not online or offline[-1].session_id == online[-1].session_id
        finally:
            sub.close()
            broker.stop()
    assert _outbox_payloads(config.state_dir) == []  # flushed on the clean stop


def test_install_from_another_process_is_hot_swapped(tmp_path, agent_keys, make_package, digits_heldout):
    """`edgeopt agent install` from a shell (another process, same state dir) while the daemon serves:
    the daemon notices the pointer and serves the new version."""
    from edgeopt.agent.config import load_config
    from edgeopt.agent.daemon import Agent

    config_path = _write_config(tmp_path, agent_keys, free_port(), 0)
    agent = Agent(load_config(config_path)).start()
    x = np.load(digits_heldout)["images"][:1]
    try:
        agent.installer.install_file(make_package("1.0.0"))
        assert infer(agent.server.address, x)[1]["model_version"] == "1.0.0"
        cli = "import sys; from edgeopt.sdk.cli import main; sys.argv[0] = 'edgeopt'; main()"
        out = subprocess.run([sys.executable, "-c", cli, "agent", "install", str(make_package("1.2.0")),
                              "--config", str(config_path)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        wait_for(lambda: infer(agent.server.address, x)[1].get("model_version") == "1.2.0", 30,
                 what="the daemon to serve 1.2.0")
        # both reach the fleet: the local command's own events, and the daemon's note that it swapped
        switch = wait_for(lambda: (s := [p for p in _outbox_payloads(config_path.parent / "state")
                                         if p.kind == "event" and p.event == "switch" and p.version == "1.2.0"])
                          and len(s) >= 2 and s, 10, what="the switch events")
        assert any("installed by another process" in p.message for p in switch)
        assert any(p.details.get("source") == "edgeopt agent (local command)" and p.session_id.startswith("cli-")
                   for p in switch)
    finally:
        agent.stop(flush_timeout=0.5)


def test_check_validates_without_starting(tmp_path, agent_keys):
    path = _write_config(tmp_path, agent_keys, 1883, 0)
    out = _run(["--config", str(path), "--check"])
    assert out.returncode == 0
    assert out.stdout.strip() == f"{path}: ok (device daemon-1, fleet itest, broker mqtt://127.0.0.1:1883)"
    assert not (tmp_path / "state").exists()  # nothing was created


def test_a_version_that_kills_the_daemon_at_start_is_skipped_and_not_reloaded(tmp_path, agent_keys, make_package,
                                                                             digits_heldout):
    """The real daemon, killed twice by SIGKILL inside the load of 2.0.0 (a native crash in a runtime; seen with
    an AOTInductor .pt2 on an H200): the third start serves 1.0.0, says why in an error event, and its pointer
    watcher does not load 2.0.0 behind the guard's back (the pointer still names it)."""
    from edgeopt.agent.config import load_config
    from edgeopt.agent.installer import Installer
    from edgeopt.agent.store import CRASH_ENV, Store

    api_port = free_port()
    config_path = _write_config(tmp_path, agent_keys, free_port(), api_port)
    config = load_config(config_path)
    store = Store(config.state_dir)
    for version in ("1.0.0", "2.0.0"):
        Installer(store, config).install_file(make_package(version))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", CRASH_ENV: "start_load digits 2.0.0"}
    for _ in range(2):
        died = subprocess.run(AGENT + ["--config", str(config_path)], capture_output=True, text=True, env=env,
                              timeout=120)
        assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert store.load_crashes("digits", "2.0.0") == 1  # the second death is counted by the next start
    images = np.load(digits_heldout)["images"][:1]
    proc = subprocess.Popen(AGENT + ["--config", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        def serving():
            if proc.poll() is not None:
                raise AssertionError(f"agent exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                return infer(("127.0.0.1", api_port), images)
            except OSError:
                return None

        code, body = wait_for(serving, 60, what="the agent's API")
        assert code == 200 and body["model_version"] == "1.0.0"
        # three pointer-watch rounds later: still alive, still 1.0.0 (an unguarded reload would serve 2.0.0)
        time.sleep(3 * POINTER_POLL_S + 1)
        assert serving()[1]["model_version"] == "1.0.0"
        assert store.read_pointer("digits")["version"] == "2.0.0"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    errors = [p for p in _outbox_payloads(config.state_dir) if p.kind == "event" and p.event == "error"]
    assert [(p.version, "died while loading it at its last 2 starts" in p.message) for p in errors] == [
        ("2.0.0", True)], [p.message for p in errors]
    assert store.load_crashes("digits", "2.0.0") == 2
