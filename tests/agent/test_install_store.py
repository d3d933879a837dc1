"""The state directory: locking between processes, recovery of leftovers, corrupt current version."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeopt.agent.config import load_config
from edgeopt.agent.store import Store
from edgeopt.sdk.errors import UnavailableError

EDGEOPT = str(Path(sys.executable).with_name("edgeopt"))


def test_lock_excludes_other_processes(tmp_path, lock_held_elsewhere):
    store = Store(tmp_path / "state")
    with lock_held_elsewhere(store):
        with pytest.raises(UnavailableError, match="another edgeopt process is installing into this state directory"):
            with store.locked(timeout=0.2):
                pass
    with store.locked(timeout=5):  # free again once the holder is gone
        with store.locked(timeout=0):  # re-entrant in this process
            pass


def test_two_concurrent_cli_installs_serialize(agent_config_file, make_package):
    cfg = str(agent_config_file)
    assert subprocess.run([EDGEOPT, "agent", "install", str(make_package("1.0.0")), "--config", cfg]).returncode == 0
    procs = [subprocess.Popen([EDGEOPT, "agent", "install", str(make_package(v)), "--config", cfg],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ("2.0.0", "3.0.0")]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    # 3.0.0 always ends up current; 2.0.0 either went first or was refused as a downgrade after 3.0.0
    assert results[1][0] == 0, results[1][1]
    assert results[0][0] == 0 or "digits 2.0.0 is lower than the installed 3.0.0; refused" in results[0][1]
    store = Store(load_config(agent_config_file).state_dir)
    assert store.current("digits").version == "3.0.0"
    store.check_complete("digits", "3.0.0")


def test_recover_cleans_leftovers(installer, make_package):
    store = installer.store
    installer.install_file(make_package("1.0.0"))
    (store.staging_dir / "abc").mkdir()
    (store.staging_dir / "abc" / "model.onnx").write_bytes(b"half")
    (store.root / "trash" / "old").mkdir()
    (store.pointer_path("digits").parent / ".current.json.1234.tmp").write_text("{")
    # a journaled install whose folder reached packages/ but never the pointer
    fake = store.package_dir("digits", "9.0.0")
    fake.mkdir()
    (fake / "manifest.json").write_text("{}")
    store.write_journal({"op": "install", "model": "digits", "version": "9.0.0", "created": True})
    actions = store.recover()
    assert "digits 9.0.0: unfinished install undone" in actions
    assert "removed staging abc" in actions
    assert store.versions("digits") == ["1.0.0"]
    assert list(store.staging_dir.iterdir()) == [] and list((store.root / "trash").iterdir()) == []
    assert not list(store.root.glob("models/*/.*.tmp")) and store.read_journal() is None


def test_recover_falls_back_when_current_is_damaged(installer, make_package):
    store = installer.store
    installer.install_file(make_package("1.0.0"))
    installer.install_file(make_package("2.0.0"))
    (store.package_dir("digits", "2.0.0") / "model.onnx").write_bytes(b"truncated")
    actions = store.recover()
    assert any(a.startswith("digits: digits 2.0.0: model.onnx is missing or truncated") and a.endswith("back to 1.0.0")
               for a in actions), actions
    assert store.current("digits").version == "1.0.0"


def test_unwritable_state_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception, match=r"cannot create the state directory .*file/state"):
        Store(blocker / "state")


def test_recover_keeps_fresh_partial_downloads_and_drops_stale_ones(tmp_path):
    import os
    import time

    store = Store(tmp_path / "state")
    fresh = store.downloads_dir / ("a" * 64 + ".eopkg.part")
    stale = store.downloads_dir / ("b" * 64 + ".eopkg.part")
    fresh.write_bytes(b"x")
    stale.write_bytes(b"y")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    actions = store.recover()
    assert fresh.exists() and not stale.exists()
    assert f"removed stale download {stale.name}" in actions
