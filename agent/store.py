"""The agent's state directory: installed packages and one atomic `current` pointer per model.

Layout::

    <state_dir>/
      lock                          fcntl lock shared by the daemon, the installer and the CLI
      journal.json                  the install or rollback in progress (absent when idle)
      packages/<name>/<version>/    an extracted package: manifest.json, manifest.sig, artifacts
      models/<name>/current.json    {"version": ..., "previous": ...}: the pointer, replaced with os.replace
      staging/                      installs in progress (emptied by recover())
      trash/                        folders being deleted (renamed here first, so deletion is atomic)
      cache/<runtime>/              runtime caches (OpenVINO CACHE_DIR), so a restart does not recompile
      downloads/                    packages being downloaded (``.part`` files survive restarts to resume)

A version folder appears in ``packages/`` only by renaming a fully written and fsynced staging folder,
and the pointer file only changes by ``os.replace``: after a SIGKILL at any moment the pointer names
either the old or the new version, and that version's folder is complete. :meth:`Store.recover` removes
what a killed install left behind (staging, a new version folder the pointer never reached).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from packaging.version import InvalidVersion, Version

from ..sdk.errors import EdgeoptError, PackageError, UnavailableError
from ..sdk.package import MANIFEST_NAME, Manifest, parse_manifest

log = logging.getLogger(__name__)

POINTER_NAME = "current.json"
JOURNAL_NAME = "journal.json"
# Which load a daemon start was in when its process last died, and how often each version's load died: a crash
# in a runtime's native code (seen: an AOTInductor .pt2 on an H200, SIGSEGV at load) kills the agent, and a service
# manager restarting it would crash it again at every start. After CRASHES_BEFORE_SKIP such deaths in a row the
# version is skipped at start (the previous one serves, or none), with an error event, until the file is deleted
# (a fixed runtime) or the version is installed afresh.
LOAD_GUARD_NAME = "load-guard.json"
CRASHES_BEFORE_SKIP = 2
LOAD_GUARD_MAX_BYTES = 256 * 1024
LOAD_GUARD_MAX_COUNT = 1000
LOAD_GUARD_LOCK = "load-guard.lock"
LOAD_GUARD_LOCK_TIMEOUT_S = 10.0
CRASH_ENV = "EDGEOPT_AGENT_CRASH_AT"
STALE_DOWNLOAD_S = 24 * 3600


def crash_point(name: str) -> None:
    """Fault injection for the SIGKILL tests: kill this process here if EDGEOPT_AGENT_CRASH_AT names it."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("fault injection: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class InstalledModel:
    """One model's serving version as the pointer names it."""

    name: str
    version: str
    path: Path
    manifest: Manifest
    previous_version: str | None = None

    @property
    def model_path(self) -> Path:
        """The artifact the runtime loads."""
        return self.path / self.manifest.model_file


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def no_space(exc: BaseException) -> bool:
    """The filesystem (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def no_space_error(root: Path, doing: str) -> UnavailableError:
    """The one-line error for a full state directory: where, while doing what, how much is free."""
    try:
        free = f"{shutil.disk_usage(root).free} bytes free"
    except OSError:
        free = "free space unknown"
    return UnavailableError(f"no space left on the device of {root} while {doing} ({free})",
                            hint="free space on that filesystem and retry; the previous version keeps serving")


def _boot_id() -> str | None:
    """This boot of the machine (Linux); None where the kernel does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read(64).strip() or None
    except OSError:
        return None


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk-full write must not leave a half-written file behind
        raise
    crash_point(f"before_replace_{path.stem}")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (a power cut must not leave a renamed but empty file)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _version_key(v: str):
    try:
        return (1, Version(v))
    except InvalidVersion:
        return (0, v)


class _PathLock:
    """One flock per state directory per process, re-entrant across this process's threads and Store objects.

    flock locks belong to an open file description: two Store objects in one process opening the lock
    file separately would block each other, hence one shared fd per path.
    """

    _registry: dict[Path, "_PathLock"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: Path):
        self.path = path
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None

    @classmethod
    def for_path(cls, path: Path) -> "_PathLock":
        with cls._registry_lock:
            key = path.resolve()
            if key not in cls._registry:
                cls._registry[key] = cls(key)
            return cls._registry[key]

    @contextlib.contextmanager
    def hold(self, timeout: float | None) -> Iterator[None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.rlock.acquire(timeout=-1 if timeout is None else timeout):
            raise UnavailableError(f"{self.path}: another thread holds the state lock")
        try:
            if self.depth == 0:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if deadline is not None and time.monotonic() >= deadline:
                            os.close(fd)
                            raise UnavailableError(
                                f"{self.path}: another edgeopt process is installing into this state directory",
                                hint="wait for it to finish and retry") from None
                        time.sleep(0.05)
                self.fd = fd
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0 and self.fd is not None:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    os.close(self.fd)
                    self.fd = None
        finally:
            self.rlock.release()


class Store:
    """The state directory. Mutating methods must run inside :meth:`locked`."""

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        try:
            for sub in ("packages", "models", "staging", "trash", "cache", "downloads"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgeoptError(f"cannot create the state directory {self.root}: {exc.strerror}",
                               hint="check state_dir in the agent config and its permissions") from None
        self._lock = _PathLock.for_path(self.root / "lock")

    # ------------------------------------------------------------------ paths
    @property
    def packages_dir(self) -> Path:
        return self.root / "packages"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def journal_path(self) -> Path:
        return self.root / JOURNAL_NAME

    def package_dir(self, name: str, version: str) -> Path:
        return self.packages_dir / name / version

    def pointer_path(self, name: str) -> Path:
        return self.root / "models" / name / POINTER_NAME

    # ------------------------------------------------------------------ start-up load guard
    @property
    def load_guard_path(self) -> Path:
        return self.root / LOAD_GUARD_NAME

    @contextlib.contextmanager
    def _guard_locked(self) -> Iterator[bool]:
        """Its own lock, not the state lock: an install from a shell holds that one for minutes, and a start
        must not wait on it. Yields False (guard off for this step, with a warning) when it cannot be had."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(_PathLock.for_path(self.root / LOAD_GUARD_LOCK).hold(LOAD_GUARD_LOCK_TIMEOUT_S))
            except (UnavailableError, OSError) as exc:
                log.warning("cannot lock the start-up crash guard (%s): it is off for this load", exc)
                yield False
                return
            yield True

    def _read_guard(self) -> dict[str, Any]:
        """The guard file, or an empty one: a missing, oversized or corrupt file never stops a start. Counts
        that are not small non-negative integers are dropped (a hostile 1e999 or "many" counts nothing)."""
        empty: dict[str, Any] = {"loading": None, "crashes": {}}
        try:
            with open(self.load_guard_path, "rb") as fh:
                raw = fh.read(LOAD_GUARD_MAX_BYTES + 1)
        except FileNotFoundError:
            return empty
        except OSError as exc:
            log.warning("cannot read %s (%s): starting without it", self.load_guard_path, exc.strerror)
            return empty
        try:
            if len(raw) > LOAD_GUARD_MAX_BYTES:
                raise ValueError("too large")
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            loading = doc.get("loading")
            if loading is not None and not (isinstance(loading, dict) and isinstance(loading.get("model"), str)
                                            and isinstance(loading.get("version"), str)):
                raise ValueError("bad 'loading'")
            if loading is not None:
                boot = loading.get("boot_id")
                loading = {"model": loading["model"], "version": loading["version"],
                           "boot_id": boot if isinstance(boot, str) else None}
            counts = doc.get("crashes") or {}
            if not isinstance(counts, dict):
                raise ValueError("bad 'crashes'")
            crashes = {k: v for k, v in counts.items()
                       if isinstance(k, str) and type(v) is int and 0 <= v < LOAD_GUARD_MAX_COUNT}
        except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: deeply nested JSON
            log.warning("%s is unreadable (%s): starting without it", self.load_guard_path, str(exc)[:200])
            return empty
        return {"loading": loading, "crashes": crashes}

    def _write_guard(self, doc: dict[str, Any]) -> None:
        """The guard is a safety net, never a reason to fail: a full disk or a read-only state directory leaves
        it off for this load, with a warning."""
        try:
            _write_json_atomic(self.load_guard_path, doc)
        except OSError as exc:
            log.warning("cannot write %s (%s): the start-up crash guard is off for this load",
                        self.load_guard_path, exc.strerror or exc)

    @staticmethod
    def _guard_key(name: str, version: str) -> str:
        return f"{name} {version}"

    def note_unfinished_load(self) -> tuple[str, str, int] | None:
        """At start: a load the guard still names never finished, so the process that ran it died there.
        Counts it against that version and returns (model, version, deaths in a row); a load cut short by the
        machine restarting (another boot id: a power cut, a reboot) is no death and counts nothing."""
        with self._guard_locked() as ok:
            if not ok:
                return None
            doc = self._read_guard()
            loading = doc["loading"]
            if loading is None:
                return None
            doc["loading"] = None
            if loading["boot_id"] is not None and loading["boot_id"] != _boot_id():
                log.warning("a load of %s %s was cut short by the machine restarting: not counted",
                            loading["model"], loading["version"])
                self._write_guard(doc)
                return None
            key = self._guard_key(loading["model"], loading["version"])
            doc["crashes"][key] = min(doc["crashes"].get(key, 0) + 1, LOAD_GUARD_MAX_COUNT - 1)
            self._write_guard(doc)
        log.error("the agent died while loading %s %s at its last start (%d time(s) in a row)", loading["model"],
                  loading["version"], doc["crashes"][key])
        return loading["model"], loading["version"], doc["crashes"][key]

    def load_crashes(self, name: str, version: str) -> int:
        return self._read_guard()["crashes"].get(self._guard_key(name, version), 0)

    def begin_load(self, name: str, version: str) -> None:
        with self._guard_locked() as ok:
            if ok:
                doc = self._read_guard()
                doc["loading"] = {"model": name, "version": version, "pid": os.getpid(),
                                  "started_at": time.time(), "boot_id": _boot_id()}
                self._write_guard(doc)

    def end_load(self, name: str, version: str, loaded: bool) -> None:
        """The load returned (with the model, or with an exception: either way the process survived it)."""
        with self._guard_locked() as ok:
            if ok:
                doc = self._read_guard()
                doc["loading"] = None
                if loaded:
                    doc["crashes"].pop(self._guard_key(name, version), None)
                self._write_guard(doc)

    def clear_load_crashes(self, name: str, version: str) -> None:
        """A fresh install of the version tries it again at the next start (writes only when there is a count)."""
        with self._guard_locked() as ok:
            if ok:
                doc = self._read_guard()
                if doc["crashes"].pop(self._guard_key(name, version), None) is not None:
                    self._write_guard(doc)

    # ------------------------------------------------------------------ locking
    def locked(self, timeout: float | None = 600.0):
        """Exclusive lock on the state directory (re-entrant in this process)."""
        return self._lock.hold(timeout)

    # ------------------------------------------------------------------ reading
    def read_pointer(self, name: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.pointer_path(name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise PackageError(f"{self.pointer_path(name)}: unreadable model pointer ({exc})") from None
        return doc if isinstance(doc, dict) and isinstance(doc.get("version"), str) else None

    def pointers(self) -> dict[str, str]:
        """Model name -> current version, read from the pointers only (cheap: for change detection)."""
        out = {}
        for d in sorted((self.root / "models").iterdir()):
            ptr = self.read_pointer(d.name) if d.is_dir() else None
            if ptr:
                out[d.name] = ptr["version"]
        return out

    def read_manifest(self, name: str, version: str) -> Manifest:
        path = self.package_dir(name, version) / MANIFEST_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PackageError(f"{name} {version} is not installed ({path} is missing)") from None
        return parse_manifest(data, source=str(path))

    def current(self, name: str) -> InstalledModel | None:
        """The version the pointer names, or None when the model is not installed."""
        ptr = self.read_pointer(name)
        if ptr is None:
            return None
        version = ptr["version"]
        return InstalledModel(name=name, version=version, path=self.package_dir(name, version),
                              manifest=self.read_manifest(name, version), previous_version=ptr.get("previous"))

    def installed(self) -> dict[str, InstalledModel]:
        """Every model with a current pointer."""
        out = {}
        for name in self.pointers():
            model = self.current(name)
            if model is not None:
                out[name] = model
        return out

    def versions(self, name: str) -> list[str]:
        """Versions of ``name`` present in packages/, oldest first."""
        base = self.packages_dir / name
        if not base.is_dir():
            return []
        found = [d.name for d in base.iterdir() if d.is_dir() and (d / MANIFEST_NAME).is_file()]
        return sorted(found, key=_version_key)

    def check_complete(self, name: str, version: str) -> None:
        """Cheap completeness check (every listed file present with its size); raises PackageError."""
        manifest = self.read_manifest(name, version)
        root = self.package_dir(name, version)
        for fname, entry in manifest.files.items():
            p = root / fname
            if not p.is_file() or p.is_symlink() or p.stat().st_size != entry.size:
                raise PackageError(f"{name} {version}: {fname} is missing or truncated in {root}")

    # ------------------------------------------------------------------ writing (inside locked())
    def new_staging(self) -> Path:
        """A fresh, not yet existing path under staging/."""
        return self.staging_dir / uuid.uuid4().hex

    def commit_package(self, staged: Path, name: str, version: str) -> Path:
        """Move a fully extracted staging folder to packages/<name>/<version>; returns that path.

        If that version is already there (an earlier install of the same version, e.g. after a rollback)
        and is not the current one, it is replaced by the new copy.
        """
        fsync_tree(staged)
        target = self.package_dir(name, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            ptr = self.read_pointer(name)
            if ptr and ptr["version"] == version:
                raise PackageError(f"{name} {version} is the current version; it cannot be replaced in place")
            self._trash(target)
        os.rename(staged, target)
        _fsync_dir(target.parent)
        return target

    def set_current(self, name: str, version: str, previous: str | None) -> None:
        """Point ``name`` at ``version`` atomically (the single commit point of an install or rollback)."""
        if not (self.package_dir(name, version) / MANIFEST_NAME).is_file():
            raise PackageError(f"{name} {version} is not in {self.packages_dir}; cannot switch to it")
        ptr = self.pointer_path(name)
        ptr.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(ptr, {"version": version, "previous": previous,
                                 "switched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def write_journal(self, doc: dict[str, Any]) -> None:
        _write_json_atomic(self.journal_path, doc)

    def read_journal(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.journal_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("unreadable journal %s: ignored", self.journal_path)
            return {}
        return doc if isinstance(doc, dict) else {}

    def clear_journal(self) -> None:
        self.journal_path.unlink(missing_ok=True)
        _fsync_dir(self.root)

    def remove_version(self, name: str, version: str) -> None:
        """Delete one installed version that no pointer names (current or previous)."""
        ptr = self.read_pointer(name) or {}
        if version in (ptr.get("version"), ptr.get("previous")):
            raise PackageError(f"{name} {version} is the current or previous version; not removed")
        target = self.package_dir(name, version)
        if target.exists():
            self._trash(target)
            self.empty_trash()

    def prune(self, name: str, keep: int = 3) -> list[str]:
        """Keep the current, the previous and the newest others up to ``keep`` versions; delete the rest."""
        ptr = self.read_pointer(name) or {}
        pinned = {ptr.get("version"), ptr.get("previous")}
        others = [v for v in self.versions(name) if v not in pinned]
        spare = max(0, keep - len(pinned - {None}))
        doomed = others[:-spare] if spare else others
        for v in doomed:
            self.remove_version(name, v)
        return doomed

    def _trash(self, path: Path) -> None:
        # A rename is atomic; the slow rmtree then happens outside packages/ (see empty_trash).
        os.rename(path, self.root / "trash" / f"{path.parent.name}-{path.name}-{uuid.uuid4().hex[:8]}")

    def empty_trash(self) -> None:
        for d in (self.root / "trash").iterdir():
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)

    # ------------------------------------------------------------------ recovery
    def recover(self) -> list[str]:
        """Finish or undo what a killed install or rollback left; returns what was done (for the log).

        The pointer is the commit point: a journaled install whose version the pointer does not name is
        undone (its new folder removed, unless it existed before); one the pointer names is kept.
        Then staging/ and trash/ are emptied and every pointer is checked to name a complete folder.
        """
        actions: list[str] = []
        with self.locked():
            journal = self.read_journal()
            if journal is not None:
                name, version = journal.get("model"), journal.get("version")
                ptr = self.read_pointer(name) if isinstance(name, str) else None
                if journal.get("op") in ("install", "rollback-install") and name and version:
                    if ptr and ptr.get("version") == version:
                        actions.append(f"{name} {version}: install had switched before the stop; kept")
                    elif journal.get("created") and self.package_dir(name, version).exists():
                        self._trash(self.package_dir(name, version))
                        actions.append(f"{name} {version}: unfinished install undone")
                    else:
                        actions.append(f"{name} {version}: unfinished install had not been staged yet")
                elif name:
                    actions.append(f"{name}: unfinished {journal.get('op', '?')} found; pointer names "
                                   f"{ptr.get('version') if ptr else None}")
                self.clear_journal()
            for d in list(self.staging_dir.iterdir()):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                actions.append(f"removed staging {d.name}")
            for tmp in self.root.glob("models/*/.*.tmp"):
                tmp.unlink(missing_ok=True)
            for tmp in self.root.glob(".journal.json.*.tmp"):
                tmp.unlink(missing_ok=True)
            self.empty_trash()
            # A partial download is kept so a restarted agent can resume it; one nobody resumed for a day
            # belongs to an abandoned deploy.
            for part in self.downloads_dir.iterdir():
                if time.time() - part.stat().st_mtime > STALE_DOWNLOAD_S:
                    part.unlink(missing_ok=True)
                    actions.append(f"removed stale download {part.name}")
            actions.extend(self._check_pointers())
        for a in actions:
            log.info("recover: %s", a)
        return actions

    def _check_pointers(self) -> list[str]:
        actions = []
        for d in sorted((self.root / "models").iterdir()):
            ptr = self.read_pointer(d.name) if d.is_dir() else None
            if not ptr:
                continue
            try:
                self.check_complete(d.name, ptr["version"])
                continue
            except EdgeoptError as exc:
                problem = exc.one_line()
            prev = ptr.get("previous")
            try:
                if not prev:
                    raise PackageError("no previous version")
                self.check_complete(d.name, prev)
                self.set_current(d.name, prev, None)
                actions.append(f"{d.name}: {problem}; back to {prev}")
            except EdgeoptError:
                self.pointer_path(d.name).unlink()
                actions.append(f"{d.name}: {problem}; no complete version left, model removed")
        return actions
