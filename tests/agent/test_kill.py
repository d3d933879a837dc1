"""SIGKILL during install or rollback, at named points and at every write of the state directory.

Named points: the install runs in a real subprocess (`edgeopt agent install`) that kills itself with SIGKILL
at the fault-injection point named by EDGEOPT_AGENT_CRASH_AT.

Every write: the CLI runs under tests/agent/stop_at_write.py, whose audit hook stops the process (SIGSTOP)
just before or just after one write of the state directory (open for writing, rename/replace, remove,
mkdir); the test sees it stopped there (so the kill lands before the step completes, at a point it names),
SIGKILLs it, and does that for each point of an uninterrupted run in turn. A write added to the store or
the installer becomes a point by itself.

Then, as a restarted agent would, the test runs `Store.recover()` and loads what the pointer names: it must
be a complete version (the old one before the pointer switch, the new one after), serving real inferences,
never neither.
"""
from __future__ import annotations

import os
import re
import shutil
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
from edgeopt.sdk.errors import EdgeoptError

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


# ------------------------------------------------------------------ every write of the store

STOPPER = str(Path(__file__).with_name("stop_at_write.py"))


def _hooked_env(state: Path, spec: str) -> dict:
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    env.update({"EDGEOPT_TEST_STATE_DIR": str(state), "EDGEOPT_TEST_STOP_AT": spec})
    return env


def _census(args: list[str], state: Path, work: Path) -> list[str]:
    """Every write point of one uninterrupted run, in order."""
    out = work / "census.txt"
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, STOPPER, *args], env=_hooked_env(state, f"census:{out}"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out.read_text().splitlines()


def _stop_and_kill(args: list[str], state: Path, index: int, work: Path) -> str:
    """Run until write point ``index``, where the process stops itself; SIGKILL it there. Returns the point."""
    marker = work / "stopped.txt"
    marker.unlink(missing_ok=True)
    with open(work / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, STOPPER, *args], env=_hooked_env(state, f"{index}:{marker}"),
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while True:  # polling with a generous deadline: the child stops itself, or ends (a failure)
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid:
            break
        assert time.monotonic() < deadline, f"point {index}: the child neither stopped nor ended in 120 s"
        time.sleep(0.01)
    assert os.WIFSTOPPED(status), f"point {index} never reached: the child ended first " \
                                  f"({(work / 'stderr.txt').read_text()[-800:]})"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return marker.read_text().strip()


def _kill_at_every_write(args, state: Path, template: Path, work: Path, old, new, versions_old, versions_new):
    """Kill ``args`` at each of its write points in turn (from a copy of ``template``); check each restart."""
    shutil.copytree(template, state)
    points = _census(args, state, work)
    # The first point after which the pointer file holds something new: from there on a restart must serve
    # the new version (so an in-place write, killed once the file is truncated, serves neither: caught).
    switch = next((i for i, p in enumerate(points) if p.startswith("after ") and
                   p.endswith(" models/digits/current.json")), None)
    assert switch is not None, f"no write of models/digits/current.json among {points}"
    for index, expected_point in enumerate(points):
        shutil.rmtree(state)
        shutil.copytree(template, state)
        landed = _stop_and_kill(args, state, index, work)
        assert landed == f"{index}\t{expected_point}", (index, expected_point, landed)
        switched = index >= switch
        where = f"killed at point {index} ({expected_point})"
        try:
            served = _restart_serves(Path(args[-1]))
        except EdgeoptError as exc:
            pytest.fail(f"{where}: the restarted agent cannot serve: {exc.one_line()}")
        assert served == (new if switched else old), where
        assert Store(state).versions("digits") == (versions_new if switched else versions_old), where
    # The pointer only ever changes by replacing it whole (one os.replace), never by writing it in place.
    assert [p for p in points if "models/digits/current.json" in p] == [
        "before rename models/digits/.current.json.*.tmp -> models/digits/current.json",
        "after rename models/digits/.current.json.*.tmp -> models/digits/current.json"], points
    assert any("journal.json" in p for p in points)
    return points


@pytest.fixture
def kill_work(tmp_path, agent_config_file):
    state = load_config(agent_config_file).state_dir
    work = tmp_path / "kill-work"
    work.mkdir()
    return state, tmp_path / "template", work


def test_sigkill_at_every_write_of_an_upgrade(agent_config_file, make_package, kill_work):
    state, template, work = kill_work
    assert _cli(["agent", "install", str(make_package("1.0.0")), "--config", str(agent_config_file)]).returncode == 0
    shutil.copytree(state, template)
    shutil.rmtree(state)
    args = ["agent", "install", str(make_package("2.0.0")), "--config", str(agent_config_file)]
    points = _kill_at_every_write(args, state, template, work, "1.0.0", "2.0.0", ["1.0.0"], ["1.0.0", "2.0.0"])
    # the census saw the whole install: staging, the committed folder, the journal, the pointer
    assert any(p.startswith("after open-write staging/") for p in points)
    assert any(re.match(r"after rename staging/\* -> packages/digits/2\.0\.0$", p) for p in points), points
    assert any(p == "after remove journal.json" for p in points), points


def test_sigkill_at_every_write_of_a_first_install(agent_config_file, make_package, kill_work):
    state, template, work = kill_work
    Store(state)  # an empty, initialised state directory
    shutil.copytree(state, template)
    shutil.rmtree(state)
    args = ["agent", "install", str(make_package("1.0.0")), "--config", str(agent_config_file)]
    _kill_at_every_write(args, state, template, work, None, "1.0.0", [], ["1.0.0"])


def test_sigkill_at_every_write_of_a_rollback(agent_config_file, make_package, kill_work):
    state, template, work = kill_work
    for v in ("1.0.0", "2.0.0"):
        assert _cli(["agent", "install", str(make_package(v)), "--config", str(agent_config_file)]).returncode == 0
    shutil.copytree(state, template)
    shutil.rmtree(state)
    args = ["agent", "rollback", "digits", "--config", str(agent_config_file)]
    _kill_at_every_write(args, state, template, work, "2.0.0", "1.0.0", ["1.0.0", "2.0.0"], ["1.0.0", "2.0.0"])
