"""A version whose load kills the agent's process (a crash in a runtime's native code: seen with an AOTInductor
.pt2 on an H200, SIGSEGV inside the load) must not crash-loop the agent: the start that died is counted, and after
two deaths in a row the version is skipped at start (the previous version serves), with an error event, until
the guard file the event names is deleted. The deaths are real: each start runs in a subprocess that SIGKILLs
itself inside the load (EDGEOPT_AGENT_CRASH_AT=start_load MODEL VERSION)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from edgeopt.agent.store import CRASH_ENV, Store

EDGEOPT = str(Path(sys.executable).with_name("edgeopt"))

START = r"""
import json, sys
import numpy as np
from edgeopt.agent.config import load_config
from edgeopt.agent.loader import load_serving
from edgeopt.agent.store import Store
config = load_config(sys.argv[1])
events = []
serving = load_serving(Store(config.state_dir), config, on_event=events.append)
out = {name: m.version for name, (m, loaded) in serving.items()}
if "digits" in serving:
    assert serving["digits"][1].infer({"images": np.zeros((1, 1, 8, 8), np.float32)})["logits"].shape == (1, 10)
print(json.dumps({"serving": out, "events": [(e["event"], e["version"], e["message"]) for e in events]}))
"""


def _start(config: Path, crash_in: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_in:
        env[CRASH_ENV] = f"start_load digits {crash_in}"
    return subprocess.run([sys.executable, "-c", START, str(config)], env=env, capture_output=True, text=True,
                          timeout=120)


def _install(config: Path, pkg: Path) -> None:
    done = subprocess.run([EDGEOPT, "agent", "install", str(pkg), "--config", str(config)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_version_that_kills_the_start_is_skipped_after_two_deaths(agent_config_file, make_package):
    _install(agent_config_file, make_package("1.0.0"))
    _install(agent_config_file, make_package("2.0.0"))
    # one death, then a start that survives: the count is reset (a power cut during a load is no pattern)
    assert _start(agent_config_file, "2.0.0").returncode == -signal.SIGKILL
    ok = _start(agent_config_file, None)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["serving"] == {"digits": "2.0.0"}
    state = Store(agent_config_file.parent / "state")
    assert state.load_crashes("digits", "2.0.0") == 0
    # two deaths in a row: the third start skips 2.0.0 (it never reaches the crash point) and serves 1.0.0
    for _ in range(2):
        assert _start(agent_config_file, "2.0.0").returncode == -signal.SIGKILL
    third = _start(agent_config_file, "2.0.0")
    assert third.returncode == 0, third.stderr
    doc = json.loads(third.stdout)
    assert doc["serving"] == {"digits": "1.0.0"}
    (event, version, message), = doc["events"]
    assert (event, version) == ("error", "2.0.0") and "died while loading it at its last 2 starts" in message
    # and it stays skipped at the next start too, until installed again
    assert json.loads(_start(agent_config_file, "2.0.0").stdout)["serving"] == {"digits": "1.0.0"}
    assert state.load_crashes("digits", "2.0.0") == 2
    # the runtime fixed, the operator deletes the guard file the message names: the next start tries it again
    assert str(state.load_guard_path) in message
    state.load_guard_path.unlink()
    assert json.loads(_start(agent_config_file, None).stdout)["serving"] == {"digits": "2.0.0"}


def test_a_corrupt_or_hostile_guard_file_never_stops_a_start(agent_config_file, make_package):
    _install(agent_config_file, make_package("1.0.0"))
    guard = agent_config_file.parent / "state" / "load-guard.json"
    # Counts that would skip 1.0.0 if they were believed (infinite, huge, fractional, boolean, text) are dropped;
    # nesting deep enough to exhaust the parser's recursion is an unreadable file, not a dead start.
    for junk in (b"{not json", b"[]", json.dumps({"loading": {"model": 3}}).encode(), b" " * (300 * 1024),
                 json.dumps({"crashes": {"digits 1.0.0": "many"}}).encode(),
                 b'{"crashes": {"digits 1.0.0": 1e999}}', b'{"crashes": {"digits 1.0.0": Infinity}}',
                 b'{"crashes": {"digits 1.0.0": 99999999999999999999999}}', b'{"crashes": {"digits 1.0.0": 7.0}}',
                 b'{"crashes": {"digits 1.0.0": true}}', b'{"crashes": [1, 2]}', b"[" * 100_000 + b"]" * 100_000,
                 b'{"loading": null, "crashes": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001):
        guard.write_bytes(junk)
        run = _start(agent_config_file, None)
        assert run.returncode == 0, (junk[:40], run.stderr[-1000:])
        assert json.loads(run.stdout)["serving"] == {"digits": "1.0.0"}, junk[:40]
        assert Store(agent_config_file.parent / "state").load_crashes("digits", "1.0.0") == 0


def test_a_load_cut_short_by_a_reboot_is_not_counted(agent_config_file, make_package):
    """The guard names the boot it was written in: a load interrupted by the machine going down (a power cut,
    a reboot) is no crash of the runtime, and a device that loses power twice during loads keeps its version."""
    from edgeopt.agent.store import _boot_id

    _install(agent_config_file, make_package("1.0.0"))
    state = Store(agent_config_file.parent / "state")
    loading = {"model": "digits", "version": "1.0.0", "pid": 1, "started_at": 0.0}
    # another boot: not counted; this boot, or a guard written before boots were recorded: one death
    for boot, counted in (("another-boot", False), (_boot_id(), True), (None, True)):
        state.load_guard_path.write_text(json.dumps({"loading": {**loading, "boot_id": boot}, "crashes": {}}))
        assert state.note_unfinished_load() == (("digits", "1.0.0", 1) if counted else None)
        assert state.load_crashes("digits", "1.0.0") == int(counted)
        assert json.loads(state.load_guard_path.read_text())["loading"] is None
        state.load_guard_path.unlink()
    # the same boot twice in a row: the second death is counted on the first
    for expected in (1, 2):
        state.begin_load("digits", "1.0.0")
        assert state.note_unfinished_load() == ("digits", "1.0.0", expected)


def test_a_full_disk_leaves_the_guard_off_and_the_start_serves(agent_config_file, make_package, monkeypatch):
    import errno

    from edgeopt.agent import store as store_mod
    from edgeopt.agent.config import load_config
    from edgeopt.agent.loader import load_serving

    _install(agent_config_file, make_package("1.0.0"))
    config = load_config(agent_config_file)

    def full(path, doc):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "_write_json_atomic", full)
    serving = load_serving(Store(config.state_dir), config)
    assert serving["digits"][0].version == "1.0.0"
    assert not (Path(config.state_dir) / "load-guard.json").exists()
