"""Exact, fast tests of `agent/store.py` on hand-made version folders (no model, no runtime).

They pin every message and every branch of the store: the pointer, the journal, pruning, the trash and each
case of recovery (docs/mutation.md). The crash tests of the real installer are in test_kill.py.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from edgeopt.agent import store as S
from edgeopt.agent.store import InstalledModel, Store
from edgeopt.sdk.errors import EdgeoptError, PackageError, UnavailableError
from edgeopt.sdk.package import FileEntry, Manifest, SourceModel, TensorSpec


def _manifest(name: str, version: str, files: dict[str, bytes]) -> Manifest:
    return Manifest(name=name, version=version, profile={"name": "cpu"}, runtime="onnxruntime", runtime_version="x",
                    device="CPU", precision="fp32", model_file="model.onnx",
                    inputs=[TensorSpec(name="x", dtype="float32", shape=[1])],
                    outputs=[TensorSpec(name="y", dtype="float32", shape=[1])],
                    source_model=SourceModel(filename="m.onnx", format="onnx", sha256="0" * 64),
                    files={n: FileEntry(sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for n, d in files.items()})


# A store that never gives up its lock (a mutant of the wait loop) fails here in a minute, not pytest's five.
pytestmark = pytest.mark.timeout(60)


def _put(store: Store, name: str, version: str, files: dict[str, bytes] | None = None):
    """A complete version folder as an install leaves it."""
    files = {"model.onnx": b"model-" + version.encode()} if files is None else files
    d = store.package_dir(name, version)
    d.mkdir(parents=True)
    (d / "manifest.json").write_bytes(_manifest(name, version, files).to_json_bytes())
    for n, data in files.items():
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        (d / n).write_bytes(data)
    return d


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "state")


def _child(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


# --------------------------------------------------------------------------- helpers


def test_no_space():
    assert S.no_space(OSError(errno.ENOSPC, "full"))
    assert S.no_space(OSError(errno.EDQUOT, "quota"))
    assert not S.no_space(OSError(errno.EIO, "io"))
    err = ValueError("x")
    err.errno = errno.ENOSPC
    assert not S.no_space(err)


def test_no_space_error_text(tmp_path):
    err = S.no_space_error(tmp_path, "extracting")
    free = S.shutil.disk_usage(tmp_path).free
    # the free figure moves with the disk: compare the text around it
    head, _, tail = str(err).partition(" (")
    assert head == f"no space left on the device of {tmp_path} while extracting"
    assert tail.endswith(" bytes free)") and abs(int(tail.split()[0]) - free) < 1 << 30
    assert err.hint == "free space on that filesystem and retry; the previous version keeps serving"
    assert str(S.no_space_error(tmp_path / "gone", "x")).endswith("while x (free space unknown)")


def test_installed_model_is_immutable_and_previous_defaults_to_none(store):
    _put(store, "m", "1.0.0")
    model = InstalledModel(name="m", version="1.0.0", path=store.package_dir("m", "1.0.0"),
                           manifest=store.read_manifest("m", "1.0.0"))
    assert model.previous_version is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.version = "2.0.0"


def test_write_json_atomic_keeps_the_error_when_the_temp_file_was_never_made(tmp_path, monkeypatch):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S, "open", full, raising=False)
    with pytest.raises(OSError) as err:
        S._write_json_atomic(tmp_path / "p.json", {"a": 1})
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_format_and_failure(tmp_path):
    S._write_json_atomic(tmp_path / "p.json", {"b": 1, "a": [1]})
    assert (tmp_path / "p.json").read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}'
    with pytest.raises(TypeError):
        S._write_json_atomic(tmp_path / "q.json", {"a": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_version_key_orders_versions_and_puts_unparsable_names_first():
    found = ["1.10.0", "zeta", "1.2.0", "0.9", "alpha", "2.0.0rc1", "2.0.0"]
    assert sorted(found, key=S._version_key) == ["alpha", "zeta", "0.9", "1.2.0", "1.10.0", "2.0.0rc1", "2.0.0"]


# --------------------------------------------------------------------------- the lock


def test_lock_is_one_per_path_reentrant_and_released(tmp_path):
    a, b = Store(tmp_path / "s"), Store(tmp_path / "s")
    assert a._lock is b._lock and a._lock is not Store(tmp_path / "other")._lock
    lock = a._lock
    with a.locked():
        assert lock.depth == 1 and lock.fd is not None
        with b.locked(timeout=0):
            assert lock.depth == 2
        assert lock.depth == 1 and lock.fd is not None
    assert lock.depth == 0 and lock.fd is None
    assert stat.S_IMODE((tmp_path / "s" / "lock").stat().st_mode) == 0o644 & ~S.os.umask(S.os.umask(0))
    with a.locked(timeout=None):
        assert lock.depth == 1


def test_lock_held_by_another_thread(tmp_path):
    store = Store(tmp_path / "s")
    held, release = threading.Event(), threading.Event()

    def hold():
        with store.locked():
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(30)
        with pytest.raises(UnavailableError) as err:
            with store.locked(timeout=0.01):
                pass
        assert str(err.value) == f"{(tmp_path / 's' / 'lock').resolve()}: another thread holds the state lock"
    finally:
        release.set()
        t.join(30)
    with store.locked(timeout=0):
        pass


def test_lock_without_timeout_waits_for_other_threads(tmp_path):
    """timeout=None blocks on the thread lock (acquire's -1); a number is passed on as the wait."""
    store = Store(tmp_path / "s")
    seen = []
    real = store._lock.rlock

    class Recording:
        def acquire(self, timeout):
            seen.append(timeout)
            return real.acquire(timeout=timeout)

        def release(self):
            real.release()

    store._lock.rlock = Recording()
    try:
        with store.locked(timeout=None):
            pass
        with store.locked(timeout=2.5):
            pass
        with store.locked():
            pass
    finally:
        store._lock.rlock = real
    assert seen == [-1, 2.5, 600.0]


# --------------------------------------------------------------------------- reading


def test_layout_and_paths(store):
    assert sorted(p.name for p in store.root.iterdir()) == ["cache", "downloads", "models", "packages", "staging",
                                                              "trash"]
    assert store.packages_dir == store.root / "packages" and store.staging_dir == store.root / "staging"
    assert store.downloads_dir == store.root / "downloads" and store.cache_dir == store.root / "cache"
    assert store.journal_path == store.root / "journal.json"
    assert store.package_dir("m", "1.0") == store.root / "packages" / "m" / "1.0"
    assert store.pointer_path("m") == store.root / "models" / "m" / "current.json"


def test_state_dir_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgeoptError) as err:
        Store(tmp_path / "file" / "state")
    assert str(err.value) == f"cannot create the state directory {tmp_path / 'file' / 'state'}: Not a directory"
    assert err.value.hint == "check state_dir in the agent config and its permissions"


def test_read_pointer(store):
    assert store.read_pointer("m") is None
    store.pointer_path("m").parent.mkdir(parents=True)
    for text in ('["1.0.0"]', '{"version": 1}', '{"previous": "1.0.0"}'):
        store.pointer_path("m").write_text(text)
        assert store.read_pointer("m") is None, text
    store.pointer_path("m").write_text('{"version": "1.0.0", "previous": null}')
    assert store.read_pointer("m") == {"version": "1.0.0", "previous": None}
    store.pointer_path("m").write_text('{"version": ')
    with pytest.raises(PackageError, match=r"current.json: unreadable model pointer \(Expecting value"):
        store.read_pointer("m")
    store.pointer_path("m").write_bytes(b"\xff")
    with pytest.raises(PackageError) as err:
        store.read_pointer("m")
    assert str(err.value).startswith(f"{store.pointer_path('m')}: unreadable model pointer (")


def test_pointers_current_and_installed(store):
    assert store.pointers() == {} and store.installed() == {} and store.current("b") is None
    for name, version in (("b", "2.0.0"), ("a", "1.0.0")):
        _put(store, name, version)
        store.set_current(name, version, "0.9" if name == "b" else None)
    (store.root / "models" / "stray-file").write_text("x")
    (store.root / "models" / "empty").mkdir()
    assert list(store.pointers().items()) == [("a", "1.0.0"), ("b", "2.0.0")]
    b = store.current("b")
    assert b == InstalledModel(name="b", version="2.0.0", path=store.package_dir("b", "2.0.0"),
                               manifest=store.read_manifest("b", "2.0.0"), previous_version="0.9")
    assert b.model_path == store.package_dir("b", "2.0.0") / "model.onnx"
    assert store.current("a").previous_version is None
    assert sorted(store.installed()) == ["a", "b"] and store.installed()["b"] == b


def test_read_manifest_of_a_missing_version(store):
    with pytest.raises(PackageError) as err:
        store.read_manifest("m", "1.0.0")
    path = store.package_dir("m", "1.0.0") / "manifest.json"
    assert str(err.value) == f"m 1.0.0 is not installed ({path} is missing)"
    _put(store, "m", "1.0.0")
    path.write_text("[]")
    with pytest.raises(PackageError, match=f"^{path}: manifest.json must be a JSON object$"):
        store.read_manifest("m", "1.0.0")


def test_versions(store):
    assert store.versions("m") == []
    for v in ("1.10.0", "1.2.0"):
        _put(store, "m", v)
    (store.packages_dir / "m" / "odd").mkdir()
    (store.packages_dir / "m" / "odd" / "manifest.json").write_text("{}")
    (store.packages_dir / "m" / "3.0.0").mkdir()  # no manifest: not a version
    (store.packages_dir / "m" / "4.0.0").write_text("a file")
    assert store.versions("m") == ["odd", "1.2.0", "1.10.0"]
    (store.packages_dir / "n").write_text("a file, not a folder")
    assert store.versions("n") == []


def test_check_complete(store):
    d = _put(store, "m", "1.0.0", {"model.onnx": b"abc", "sub/g.npz": b"g"})
    store.check_complete("m", "1.0.0")
    (d / "model.onnx").write_bytes(b"ab")
    with pytest.raises(PackageError) as err:
        store.check_complete("m", "1.0.0")
    assert str(err.value) == f"m 1.0.0: model.onnx is missing or truncated in {d}"
    (d / "model.onnx").write_bytes(b"abc")
    (d / "sub" / "g.npz").unlink()
    with pytest.raises(PackageError, match=r"^m 1.0.0: sub/g.npz is missing or truncated in "):
        store.check_complete("m", "1.0.0")
    (d / "elsewhere").write_bytes(b"g")
    (d / "sub" / "g.npz").symlink_to(d / "elsewhere")
    with pytest.raises(PackageError, match=r"^m 1.0.0: sub/g.npz is missing or truncated in "):
        store.check_complete("m", "1.0.0")
    (d / "sub" / "g.npz").unlink()
    (d / "sub" / "g.npz").mkdir()
    with pytest.raises(PackageError, match=r"^m 1.0.0: sub/g.npz is missing or truncated in "):
        store.check_complete("m", "1.0.0")


# --------------------------------------------------------------------------- writing


def test_new_staging_is_fresh(store):
    a, b = store.new_staging(), store.new_staging()
    assert a.parent == store.staging_dir and b.parent == store.staging_dir and a != b and not a.exists()


def test_commit_package(store):
    staged = store.new_staging()
    staged.mkdir()
    (staged / "manifest.json").write_text("{}")
    target = store.commit_package(staged, "m", "1.0.0")
    assert target == store.package_dir("m", "1.0.0") and (target / "manifest.json").read_text() == "{}"
    assert not staged.exists()
    # the same version again, not current: replaced by the new copy (the old one goes to the trash)
    again = store.new_staging()
    again.mkdir()
    (again / "manifest.json").write_text('{"new": 1}')
    store.commit_package(again, "m", "1.0.0")
    assert (target / "manifest.json").read_text() == '{"new": 1}'
    trashed = list((store.root / "trash").iterdir())
    assert len(trashed) == 1 and trashed[0].name.startswith("m-1.0.0-") and len(trashed[0].name) == len("m-1.0.0-") + 8
    assert (trashed[0] / "manifest.json").read_text() == "{}"
    # the current version is never replaced in place
    _put(store, "n", "1.0.0")
    store.set_current("n", "1.0.0", None)
    third = store.new_staging()
    third.mkdir()
    with pytest.raises(PackageError) as err:
        store.commit_package(third, "n", "1.0.0")
    assert str(err.value) == "n 1.0.0 is the current version; it cannot be replaced in place"
    assert third.exists()
    # another version of a current model is replaced as usual
    _put(store, "n", "2.0.0")
    (third / "x").write_text("x")
    store.commit_package(third, "n", "2.0.0")
    assert (store.package_dir("n", "2.0.0") / "x").exists()


def test_set_current(store):
    with pytest.raises(PackageError) as err:
        store.set_current("m", "1.0.0", None)
    assert str(err.value) == f"m 1.0.0 is not in {store.packages_dir}; cannot switch to it"
    assert not store.pointer_path("m").parent.exists()
    _put(store, "m", "1.0.0")
    before = time.time()
    store.set_current("m", "1.0.0", "0.5.0")
    doc = json.loads(store.pointer_path("m").read_text())
    assert set(doc) == {"version", "previous", "switched_at"}
    assert (doc["version"], doc["previous"]) == ("1.0.0", "0.5.0")
    switched = time.mktime(time.strptime(doc["switched_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before - 2 <= switched <= time.time() + 1
    assert list(store.pointer_path("m").parent.iterdir()) == [store.pointer_path("m")]


def test_journal(store):
    assert store.read_journal() is None
    store.write_journal({"op": "install", "model": "m"})
    assert store.read_journal() == {"op": "install", "model": "m"}
    store.journal_path.write_text("[1]")
    assert store.read_journal() == {}
    store.journal_path.write_text("{")
    assert store.read_journal() == {}
    store.clear_journal()
    assert not store.journal_path.exists() and store.read_journal() is None
    store.clear_journal()  # twice: nothing to remove is fine


def test_remove_version(store):
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        _put(store, "m", v)
    store.set_current("m", "3.0.0", "2.0.0")
    for pinned in ("3.0.0", "2.0.0"):
        with pytest.raises(PackageError) as err:
            store.remove_version("m", pinned)
        assert str(err.value) == f"m {pinned} is the current or previous version; not removed"
    store.remove_version("m", "1.0.0")
    assert store.versions("m") == ["2.0.0", "3.0.0"]
    assert list((store.root / "trash").iterdir()) == []
    store.remove_version("m", "0.1.0")  # not there: nothing to do
    _put(store, "x", "1.0.0")
    store.remove_version("x", "1.0.0")  # no pointer at all
    assert store.versions("x") == []


@pytest.mark.parametrize("keep,previous,doomed", [
    (3, "5.0.0", ["1.0.0", "2.0.0", "3.0.0"]),          # current + previous + the newest other
    (4, "5.0.0", ["1.0.0", "2.0.0"]),
    (2, "5.0.0", ["1.0.0", "2.0.0", "3.0.0", "4.0.0"]),  # only the two pinned
    (1, "5.0.0", ["1.0.0", "2.0.0", "3.0.0", "4.0.0"]),  # pinned versions are never pruned
    (3, None, ["1.0.0", "2.0.0", "3.0.0"]),              # no previous: current + the two newest others
    (9, "5.0.0", []),
])
def test_prune(store, keep, previous, doomed):
    for v in ("1.0.0", "2.0.0", "3.0.0", "4.0.0", "5.0.0", "6.0.0"):
        _put(store, "m", v)
    store.set_current("m", "6.0.0", previous)
    assert store.prune("m", keep=keep) == doomed
    assert store.versions("m") == [v for v in ("1.0.0", "2.0.0", "3.0.0", "4.0.0", "5.0.0", "6.0.0") if v not in doomed]


def test_prune_keeps_three_by_default(store):
    for v in ("1.0.0", "2.0.0", "3.0.0", "4.0.0"):
        _put(store, "m", v)
    store.set_current("m", "4.0.0", "3.0.0")
    assert store.prune("m") == ["1.0.0"]


def test_empty_trash_removes_folders_and_files(store):
    trash = store.root / "trash"
    (trash / "d" / "sub").mkdir(parents=True)
    (trash / "d" / "sub" / "f").write_text("x")
    (trash / "f").write_text("x")
    store.empty_trash()
    assert list(trash.iterdir()) == []


# --------------------------------------------------------------------------- recovery


def test_recover_install_the_pointer_had_reached(store):
    _put(store, "m", "2.0.0")
    store.set_current("m", "2.0.0", None)
    store.write_journal({"op": "install", "model": "m", "version": "2.0.0", "created": True})
    assert store.recover() == ["m 2.0.0: install had switched before the stop; kept"]
    assert store.versions("m") == ["2.0.0"] and store.read_journal() is None


@pytest.mark.parametrize("op", ["install", "rollback-install"])
def test_recover_undoes_an_install_the_pointer_never_reached(store, op):
    _put(store, "m", "1.0.0")
    store.set_current("m", "1.0.0", None)
    _put(store, "m", "2.0.0")
    store.write_journal({"op": op, "model": "m", "version": "2.0.0", "created": True})
    assert store.recover() == ["m 2.0.0: unfinished install undone"]
    assert store.versions("m") == ["1.0.0"] and list((store.root / "trash").iterdir()) == []


def test_recover_keeps_a_folder_the_install_did_not_create(store):
    _put(store, "m", "1.0.0")
    _put(store, "m", "2.0.0")
    store.set_current("m", "1.0.0", None)
    store.write_journal({"op": "install", "model": "m", "version": "2.0.0", "created": False})
    assert store.recover() == ["m 2.0.0: unfinished install had not been staged yet"]
    assert store.versions("m") == ["1.0.0", "2.0.0"]
    store.write_journal({"op": "install", "model": "m", "version": "3.0.0", "created": True})
    assert store.recover() == ["m 3.0.0: unfinished install had not been staged yet"]


def test_recover_reports_other_operations(store):
    _put(store, "m", "1.0.0")
    store.set_current("m", "1.0.0", None)
    store.write_journal({"op": "rollback", "model": "m"})
    assert store.recover() == ["m: unfinished rollback found; pointer names 1.0.0"]
    store.write_journal({"model": "m"})
    assert store.recover() == ["m: unfinished ? found; pointer names 1.0.0"]
    store.write_journal({"op": "rollback", "model": "gone"})
    assert store.recover() == ["gone: unfinished rollback found; pointer names None"]
    store.write_journal({"op": "install", "model": "m"})  # no version: nothing to undo
    assert store.recover() == ["m: unfinished install found; pointer names 1.0.0"]
    for journal in ({}, {"op": "install"}, {"op": "install", "version": "1.0.0"}):
        store.write_journal(journal)
        assert store.recover() == [], journal
        assert store.read_journal() is None
    store.journal_path.write_text("{")
    assert store.recover() == [] and store.read_journal() is None
    assert store.versions("m") == ["1.0.0"]


def test_recover_empties_staging_and_temp_files(store):
    (store.staging_dir / "half").mkdir()
    (store.staging_dir / "half" / "model.onnx").write_bytes(b"x")
    (store.staging_dir / "loose.part").write_bytes(b"x")
    (store.root / "models" / "m").mkdir()
    (store.root / "models" / "m" / ".current.json.1234abcd.tmp").write_text("{")
    (store.root / ".journal.json.1234abcd.tmp").write_text("{")
    (store.root / "trash" / "old").mkdir()
    (store.root / "keep.tmp").write_text("not ours")
    assert sorted(store.recover()) == ["removed staging half", "removed staging loose.part"]
    assert list(store.staging_dir.iterdir()) == [] and list((store.root / "trash").iterdir()) == []
    assert list((store.root / "models" / "m").iterdir()) == []
    assert not (store.root / ".journal.json.1234abcd.tmp").exists() and (store.root / "keep.tmp").exists()


def test_recover_drops_downloads_older_than_a_day(store):
    day = 24 * 3600
    now = time.time()
    for name, age in (("young.part", day - 10), ("old.part", day + 10)):
        (store.downloads_dir / name).write_bytes(b"x")
        os.utime(store.downloads_dir / name, (now - age, now - age))
    assert store.recover() == ["removed stale download old.part"]
    assert [p.name for p in store.downloads_dir.iterdir()] == ["young.part"]


def test_recover_falls_back_to_a_complete_previous_version(store):
    _put(store, "m", "1.0.0")
    d2 = _put(store, "m", "2.0.0")
    store.set_current("m", "2.0.0", "1.0.0")
    (d2 / "model.onnx").write_bytes(b"cut")
    assert store.recover() == [f"m: m 2.0.0: model.onnx is missing or truncated in {d2}; back to 1.0.0"]
    assert store.read_pointer("m")["version"] == "1.0.0" and store.read_pointer("m")["previous"] is None


def test_recover_removes_a_model_without_a_complete_version(store):
    d1 = _put(store, "m", "1.0.0")
    d2 = _put(store, "m", "2.0.0")
    store.set_current("m", "2.0.0", "1.0.0")
    (d1 / "model.onnx").unlink()
    (d2 / "model.onnx").unlink()
    assert store.recover() == [f"m: m 2.0.0: model.onnx is missing or truncated in {d2}; no complete version left, "
                               "model removed"]
    assert store.read_pointer("m") is None and store.pointers() == {}
    d3 = _put(store, "n", "3.0.0")
    store.set_current("n", "3.0.0", None)
    (d3 / "model.onnx").unlink()
    assert store.recover() == [f"n: n 3.0.0: model.onnx is missing or truncated in {d3}; no complete version left, "
                               "model removed"]


def test_recover_checks_every_pointer_and_skips_what_is_not_a_model(store):
    _put(store, "a", "1.0.0")
    store.set_current("a", "1.0.0", None)
    d = _put(store, "b", "1.0.0")
    store.set_current("b", "1.0.0", None)
    (d / "model.onnx").unlink()
    (store.root / "models" / "afile").write_text("x")
    (store.root / "models" / "nopointer").mkdir()
    assert store.recover() == [f"b: b 1.0.0: model.onnx is missing or truncated in {d}; no complete version left, "
                               "model removed"]
    assert store.pointers() == {"a": "1.0.0"}


# --------------------------------------------------------------------------- in child processes (last: slowest)


def test_crash_point_kills_only_at_its_name(tmp_path):
    code = """
        from edgeopt.agent.store import crash_point
        crash_point("other")
        print("passed other", flush=True)
        crash_point("here")
        print("passed here", flush=True)
    """
    alive = _child(code)
    assert alive.returncode == 0 and alive.stdout.split("\n")[:2] == ["passed other", "passed here"]
    killed = _child(code, {"EDGEOPT_AGENT_CRASH_AT": "here"})
    assert killed.returncode == -9 and killed.stdout == "passed other\n"


def test_a_crash_before_the_pointer_replace_leaves_a_temp_file_recover_removes(tmp_path):
    state = tmp_path / "state"
    code = f"""
        from edgeopt.agent.store import Store
        s = Store({str(state)!r})
        s.set_current("m", "1.0.0", None)
    """
    store = Store(state)
    _put(store, "m", "1.0.0")
    killed = _child(code, {"EDGEOPT_AGENT_CRASH_AT": "before_replace_current"})
    assert killed.returncode == -9
    left = list(store.pointer_path("m").parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".current.json.") and left[0].name.endswith(".tmp")
    assert store.read_pointer("m") is None
    store.recover()
    assert list(store.pointer_path("m").parent.iterdir()) == []
    journal = _child(f"""
        from edgeopt.agent.store import Store
        Store({str(state)!r}).write_journal({{"op": "install"}})
    """, {"EDGEOPT_AGENT_CRASH_AT": "before_replace_journal"})
    assert journal.returncode == -9 and store.read_journal() is None
    assert [p.name.startswith(".journal.json.") for p in state.glob(".*.tmp")] == [True]
    store.recover()
    assert list(state.glob(".*.tmp")) == []


def test_lock_held_by_another_process_times_out(tmp_path, lock_held_elsewhere):
    store = Store(tmp_path / "s")
    with lock_held_elsewhere(store):
        with pytest.raises(UnavailableError) as err:
            with store.locked(timeout=0):
                pass
        assert str(err.value) == (f"{(store.root / 'lock').resolve()}: another edgeopt process is installing into "
                                  "this state directory")
        assert err.value.hint == "wait for it to finish and retry"
        assert store._lock.depth == 0 and store._lock.fd is None
