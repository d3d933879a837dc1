"""SIGKILL during install or rollback, at named points and at arbitrary moments.

The install runs in a real subprocess (`edgeopt agent install`) that kills itself with SIGKILL at the
fault-injection point named by EDGEOPT_AGENT_CRASH_AT. Then, as a restarted agent would, the test runs
`Store.recover()` and loads what the pointer names: it must be a complete version (the old one before the
pointer switch, the new one after), serving real inferences, never neither.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeopt.agent.config import load_config
from edgeopt.agent.loader import load_serving
from edgeopt.agent.store import CRASH_ENV, Store

EDGEOPT = str(Path(sys.executable).with_name("edgeopt"))


def _cli(args, crash_at=None, **kw):
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([EDGEOPT, *args], env=env, capture_output=True, text=True, timeout=120, **kw)


def _restart_serves(config_path: Path) -> str | None:
    """What a restarted agent serves: recover, then load and run the current version."""
    config = load_config(config_path)
    store = Store(config.state_dir)
    serving = load_serving(store, config)
    assert list(store.staging_dir.iterdir()) == []
    assert store.read_journal() is None
    assert not list(store.root.glob("models/*/.*.tmp"))
    if "digits" not in serving:
        return None
    model, loaded = serving["digits"]
    store.check_complete("digits", model.version)
    assert loaded.infer({"images": np.zeros((1, 1, 8, 8), np.float32)})["logits"].shape == (1, 10)
    loaded.close()
    return model.version


BEFORE_SWITCH = ["after_extract", "before_replace_journal", "after_journal", "after_commit", "after_load",
                 "after_self_test", "before_switch", "before_replace_current"]
AFTER_SWITCH = ["after_switch_pointer", "after_on_switch", "after_install"]


@pytest.mark.parametrize("point", BEFORE_SWITCH + AFTER_SWITCH)
def test_sigkill_during_upgrade(point, agent_config_file, make_package):
    ok = _cli(["agent", "install", str(make_package("1.0.0")), "--config", str(agent_config_file)])
    assert ok.returncode == 0, ok.stderr
    killed = _cli(["agent", "install", str(make_package("2.0.0")), "--config", str(agent_config_file)],
                  crash_at=point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    expected = "1.0.0" if point in BEFORE_SWITCH else "2.0.0"
    assert _restart_serves(agent_config_file) == expected
    store = Store(load_config(agent_config_file).state_dir)
    # an undone install leaves no trace; a finished one keeps the old version as previous
    assert store.versions("digits") == (["1.0.0"] if expected == "1.0.0" else ["1.0.0", "2.0.0"])
    if point not in ("after_load", "after_switch_pointer"):
        return
    # the state is not wedged: the lock died with the process, and the install can be done again
    again = _cli(["agent", "install", str(make_package("2.0.0")), "--config", str(agent_config_file)])
    if expected == "1.0.0":
        assert again.returncode == 0, again.stderr
    else:
        assert again.returncode == 3 and "digits 2.0.0 is the installed version; refused" in again.stderr
    assert _restart_serves(agent_config_file) == "2.0.0"


@pytest.mark.parametrize("point,expected", [("rollback_before_switch", "2.0.0"),
                                            ("before_replace_current", "2.0.0"),
                                            ("rollback_after_switch_pointer", "1.0.0")])
def test_sigkill_during_rollback(point, expected, agent_config_file, make_package):
    for v in ("1.0.0", "2.0.0"):
        assert _cli(["agent", "install", str(make_package(v)), "--config", str(agent_config_file)]).returncode == 0
    killed = _cli(["agent", "rollback", "digits", "--config", str(agent_config_file)], crash_at=point)
    assert killed.returncode == -signal.SIGKILL
    assert _restart_serves(agent_config_file) == expected
    assert Store(load_config(agent_config_file).state_dir).versions("digits") == ["1.0.0", "2.0.0"]


def test_sigkill_during_first_install_leaves_nothing(agent_config_file, make_package):
    killed = _cli(["agent", "install", str(make_package("1.0.0")), "--config", str(agent_config_file)],
                  crash_at="after_load")
    assert killed.returncode == -signal.SIGKILL
    assert _restart_serves(agent_config_file) is None
    assert Store(load_config(agent_config_file).state_dir).versions("digits") == []


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.25])
def test_sigkill_at_arbitrary_moments(delay_s, agent_config_file, make_package):
    """Not a named point: an outside SIGKILL some time after the install's journal appears."""
    assert _cli(["agent", "install", str(make_package("1.0.0", runtime="openvino")),
                 "--config", str(agent_config_file)]).returncode == 0
    journal = load_config(agent_config_file).state_dir / "journal.json"
    proc = subprocess.Popen([EDGEOPT, "agent", "install", str(make_package("2.0.0", runtime="openvino")),
                             "--config", str(agent_config_file)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not journal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _restart_serves(agent_config_file) in ("1.0.0", "2.0.0")
