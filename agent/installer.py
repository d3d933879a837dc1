"""Safe install, switch and rollback of packages.

Install: open the archive defensively, verify every file's sha256 and the manifest signature against the
trusted keys, check that this device can run the package's profile, refuse a version not above the
installed one (unless it is an explicit rollback), extract into staging, move the folder into
``packages/<name>/<version>/``, load it, warm it up, run its golden samples, switch the ``current``
pointer atomically and hand the loaded model to ``on_switch`` (the server hot-swaps it).
Any failure leaves the previous version serving and emits an event saying why; a journal lets
:meth:`Store.recover` undo a half-done install after a SIGKILL. Fault-injection points (environment
variable ``EDGEOPT_AGENT_CRASH_AT``) let the tests kill the process between any two steps.
"""
from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from packaging.version import Version

from ..sdk.errors import EdgeoptError, InputError, PackageError, SecurityError, UnsupportedError
from ..sdk.package import PackageReader, load_public_key, verify_signature
from .config import AgentConfig
from .download import download
from .loader import load_installed, placement_check, self_test, warm_up
from .probe import can_run, probe
from .runtimes import LoadedModel
from .store import InstalledModel, Store, crash_point, no_space, no_space_error

log = logging.getLogger(__name__)

EventSink = Callable[[dict[str, Any]], None]
SwitchHook = Callable[[InstalledModel, LoadedModel], None]

KEEP_VERSIONS = 3
# Crash points in install order (EDGEOPT_AGENT_CRASH_AT=<one of these>); the store adds
# before_replace_current and before_replace_journal inside its atomic writes.
CRASH_POINTS = ("after_extract", "after_journal", "after_commit", "after_load", "after_self_test",
                "before_switch", "after_switch_pointer", "after_on_switch", "after_install",
                "rollback_before_switch", "rollback_after_switch_pointer")
_SAFE_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+!_-]{0,63}$")


class Installer:
    """Installs, switches and rolls back packages in a :class:`Store`.

    ``on_event`` gets dicts with the fields of ``EventPayload`` minus the envelope; ``on_switch`` is called
    after the pointer switched, with the new version already loaded, warmed up and self-tested.
    """

    def __init__(self, store: Store, config: AgentConfig, on_event: EventSink | None = None,
                 on_switch: SwitchHook | None = None, *, capabilities: dict[str, Any] | None = None,
                 max_extract_bytes: int | None = None):
        self.store = store
        self.config = config
        self.on_event = on_event
        self.on_switch = on_switch
        self.capabilities = capabilities if capabilities is not None else probe()
        # Bounds the unpacked content (zip-bomb guard); a package's content rarely exceeds 2x its archive.
        self.max_extract_bytes = max_extract_bytes or 2 * config.download.max_bytes

    # ------------------------------------------------------------------ events
    def _emit(self, event: str, ok: bool, *, model: str | None = None, version: str | None = None,
              from_version: str | None = None, message: str = "", ctx: dict[str, Any] | None = None,
              details: dict[str, Any] | None = None) -> None:
        doc = {"event": event, "ok": ok, "model": model, "version": version, "from_version": from_version,
               "message": message, "command_id": (ctx or {}).get("command_id"),
               "deployment_id": (ctx or {}).get("deployment_id"), "details": details or {}}
        (log.info if ok else log.warning)("event %s ok=%s %s %s: %s", event, ok, model, version, message)
        if self.on_event is not None:
            try:
                self.on_event(doc)
            except Exception:  # a broken sink must not turn a good install into a failed one
                log.exception("on_event callback failed")

    def _trusted_keys(self) -> list:
        return [load_public_key(p) for p in self.config.trusted_keys]

    # ------------------------------------------------------------------ install
    def install_url(self, url: str, sha256: str, size: int | None = None, *, rollback: bool = False,
                    command_id: str | None = None, deployment_id: str | None = None) -> InstalledModel:
        """Download (resumable, size-limited, sha256-checked) and install."""
        ctx = {"command_id": command_id, "deployment_id": deployment_id}
        dest = self.store.downloads_dir / f"{sha256.lower()}.eopkg"
        started = time.monotonic()
        try:
            if size is not None:  # refuse before filling the disk with a download that cannot be installed
                self._check_free(size, "the download needs")
            download(url, dest, sha256=sha256, size=size, max_bytes=self.config.download.max_bytes,
                     timeout_s=self.config.download.timeout_s, allowed=self.config.download.allowed_urls)
        except EdgeoptError as exc:
            self._emit("download", False, message=exc.one_line(), ctx=ctx, details={"url": url})
            raise
        self._emit("download", True, message=f"downloaded {dest.stat().st_size} bytes", ctx=ctx,
                   details={"url": url, "bytes": dest.stat().st_size,
                            "seconds": round(time.monotonic() - started, 3)})
        try:
            return self.install_file(dest, rollback=rollback, command_id=command_id, deployment_id=deployment_id)
        finally:
            dest.unlink(missing_ok=True)

    def install_file(self, path: str | Path, *, rollback: bool = False, command_id: str | None = None,
                     deployment_id: str | None = None) -> InstalledModel:
        """Verify, stage, load, self-test and switch to the package at ``path``; see the module doc."""
        ctx = {"command_id": command_id, "deployment_id": deployment_id}
        with self.store.locked():
            return self._install(Path(path), rollback, ctx)

    def _refuse(self, exc: EdgeoptError, model: str | None, version: str | None, from_version: str | None,
                ctx: dict[str, Any], stage: str) -> None:
        self._emit("refused", False, model=model, version=version, from_version=from_version,
                   message=exc.one_line(), ctx=ctx, details={"stage": stage, "error": type(exc).__name__})

    def _install(self, path: Path, rollback: bool, ctx: dict[str, Any]) -> InstalledModel:
        name = version = from_version = None
        try:
            reader = PackageReader(path, max_member_bytes=self.max_extract_bytes,
                                   max_total_bytes=self.max_extract_bytes)
            reader.open()
        except EdgeoptError as exc:
            self._refuse(exc, None, None, None, ctx, "open")
            raise
        try:
            manifest = reader.manifest
            name, version = manifest.name, manifest.version
            try:
                current = self.store.current(name)
                from_version = current.version if current else None
                self._verify(reader, path)
                self._check_manifest_paths(manifest)
                ok, reason = can_run(manifest, self.capabilities)
                if not ok:
                    raise UnsupportedError(reason)
                if current is not None and manifest.parsed_version <= Version(current.version) and not rollback:
                    word = "the installed version" if manifest.parsed_version == Version(current.version) \
                        else f"lower than the installed {current.version}"
                    raise InputError(f"{name} {version} is {word}; refused",
                                     hint="use an explicit rollback to go back to an older version")
                self._check_disk_space(manifest)
            except EdgeoptError as exc:
                self._refuse(exc, name, version, from_version, ctx, "verify")
                raise
            staging = self.store.new_staging()
            try:
                reader.extract_to(staging)
            except (EdgeoptError, OSError) as exc:
                shutil.rmtree(staging, ignore_errors=True)
                if no_space(exc):
                    err: EdgeoptError = no_space_error(self.store.root, f"extracting {name} {version}")
                else:
                    err = exc if isinstance(exc, EdgeoptError) else PackageError(f"extraction failed: {exc}")
                self._refuse(err, name, version, from_version, ctx, "extract")
                raise err from None
        finally:
            reader.close()
        crash_point("after_extract")
        return self._activate(staging, manifest, current, rollback, ctx)

    def _verify(self, reader: PackageReader, path: Path) -> None:
        keys = self._trusted_keys()
        if reader.signature_bytes is None:
            if not self.config.allow_unsigned:
                raise SecurityError(f"{path.name} is not signed (no manifest.sig); refused",
                                    hint="sign it with edgeopt package --sign-key, or set allow_unsigned = true "
                                         "for development")
            log.warning("%s is unsigned; accepted because allow_unsigned = true", path.name)
        elif keys:
            signer = verify_signature(reader.manifest_bytes, reader.signature_bytes, keys)
            log.info("%s: signature by key %s", path.name, signer)
        elif not self.config.allow_unsigned:  # unreachable with a validated config, kept as a guard
            raise SecurityError("no trusted key configured; cannot verify the package signature")
        reader.verify_hashes()

    @staticmethod
    def _check_manifest_paths(manifest) -> None:
        # The manifest names the files the runtime opens: they must be files of this package, or a crafted
        # manifest could make the loader read outside the package folder.
        if not _SAFE_VERSION.match(manifest.version):
            raise PackageError(f"version {manifest.version!r} cannot be used as a folder name")
        wanted = [("model_file", manifest.model_file)]
        if manifest.golden is not None:
            wanted.append(("golden.file", manifest.golden.file))
        for key, fname in wanted:
            if fname not in manifest.files:
                raise PackageError(f"manifest {key} {fname!r} is not one of the package's files")
        if manifest.runtime == "openvino" and manifest.model_file.endswith(".xml"):
            weights = manifest.model_file[:-4] + ".bin"
            if weights not in manifest.files:
                raise PackageError(f"OpenVINO model {manifest.model_file} has no {weights} in the package")

    def _check_disk_space(self, manifest) -> None:
        self._check_free(sum(f.size for f in manifest.files.values()), "the package needs")

    def _check_free(self, need: int, what: str) -> None:
        free = shutil.disk_usage(self.store.root).free
        if need * 1.1 + 16 * 1024 * 1024 > free:
            raise UnsupportedError(f"not enough disk space in {self.store.root}: {what} {need} bytes, "
                                   f"{free} are free")

    def _activate(self, staging: Path, manifest, current: InstalledModel | None, rollback: bool,
                  ctx: dict[str, Any]) -> InstalledModel:
        """Journal, commit the folder, load, self-test, switch. Undo on any failure."""
        name, version = manifest.name, manifest.version
        from_version = current.version if current else None
        loaded: LoadedModel | None = None
        placed: dict[str, Any] | None = None
        switched = False
        stage = "journal"
        try:
            self.store.write_journal({"op": "rollback-install" if rollback else "install", "model": name,
                                      "version": version, "from_version": from_version, "created": True,
                                      "started_at": time.time()})
            crash_point("after_journal")
            stage = "commit"
            path = self.store.commit_package(staging, name, version)
            crash_point("after_commit")
            new = InstalledModel(name=name, version=version, path=path, manifest=manifest,
                                 previous_version=from_version)
            stage = "load"
            loaded = load_installed(new, self.config)
            crash_point("after_load")
            stage = "placement"
            placed = self._check_placement(loaded, manifest, from_version, ctx)
            stage = "load"
            warm_up(loaded, package_dir=path, manifest=manifest)
            stage = "self_test"
            report = self_test(loaded, path, manifest)
            self._emit("self_test", True, model=name, version=version, from_version=from_version,
                       message=f"{report.get('samples', 0)} golden samples within tolerance", ctx=ctx, details=report)
            crash_point("after_self_test")
            stage = "switch"
            crash_point("before_switch")
            self.store.set_current(name, version, from_version)
            switched = True
            self.store.clear_load_crashes(name, version)  # installed again: the next start tries it again
            crash_point("after_switch_pointer")
            if self.on_switch is not None:
                self.on_switch(new, loaded)
            crash_point("after_on_switch")
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)  # still there when the journal could not be written
            self._undo(name, version, current, switched, loaded, created=stage != "journal")
            if no_space(exc):
                err = no_space_error(self.store.root, f"installing {name} {version} ({stage})")
            else:
                err = exc if isinstance(exc, EdgeoptError) else EdgeoptError(
                    f"{stage} failed: {type(exc).__name__}: {exc}")
            event = "self_test" if stage == "self_test" else "install"
            self._emit(event, False, model=name, version=version, from_version=from_version,
                       message=f"{err.one_line()}; {from_version or 'nothing'} still serving", ctx=ctx,
                       details={"stage": stage, "error": type(err).__name__})
            if err is exc or not isinstance(exc, Exception):
                raise
            raise err from exc
        self._emit("switch", True, model=name, version=version, from_version=from_version,
                   message=f"serving {name} {version}" + (f" (was {from_version})" if from_version else ""), ctx=ctx)
        self._emit("rollback" if rollback else "install", True, model=name, version=version,
                   from_version=from_version, message=f"installed {name} {version}", ctx=ctx,
                   details={"profile": manifest.profile_name, "runtime": manifest.runtime,
                            "device": manifest.device, "precision": manifest.precision,
                            "placement": {k: placed[k] for k in ("ok", "message", "devices", "precisions")
                                          if k in placed} if placed else None})
        self.store.prune(name, KEEP_VERSIONS)
        self.store.clear_journal()
        crash_point("after_install")
        return new

    def _check_placement(self, loaded: LoadedModel, manifest, from_version: str | None,
                         ctx: dict[str, Any]) -> dict[str, Any] | None:
        """Check what the runtime did with the graph; a mismatch is a ``placement`` event (ok=False) that the
        dashboard alerts on, and refuses the switch where the profile says ``placement = "strict"``. A match
        is not an event of its own: it rides in the install event's details."""
        report = placement_check(loaded, manifest)
        if report is None:
            return None
        name, version = manifest.name, manifest.version
        if not report["ok"]:
            self._emit("placement", False, model=name, version=version, from_version=from_version,
                       message=report["message"], ctx=ctx, details=report)
        if not report["ok"] and report.get("strict"):
            raise UnsupportedError(f"{name} {version} does not run as its manifest says: {report['message']}",
                                   hint="the profile's placement = \"strict\" refuses it; rebuild the package "
                                        "for this device or use a profile with placement = \"warn\"")
        return report

    def _undo(self, name: str, version: str, current: InstalledModel | None, switched: bool,
              loaded: LoadedModel | None, created: bool = True) -> None:
        try:
            if switched:
                if current is not None:
                    self.store.set_current(name, current.version, current.previous_version)
                else:
                    self.store.pointer_path(name).unlink(missing_ok=True)
            if created and self.store.package_dir(name, version).exists():
                self.store.remove_version(name, version)
            self.store.clear_journal()
        except Exception:  # recover() at the next start finishes what this could not
            log.exception("undo of %s %s failed; recover() will finish it", name, version)
        if loaded is not None:
            loaded.close()

    # ------------------------------------------------------------------ rollback
    def rollback(self, model: str, version: str | None = None, *, command_id: str | None = None,
                 deployment_id: str | None = None) -> InstalledModel:
        """Return ``model`` to ``version`` (default: the previous one) after re-verifying and self-testing it."""
        ctx = {"command_id": command_id, "deployment_id": deployment_id}
        with self.store.locked():
            current = self.store.current(model)
            try:
                if current is None:
                    raise InputError(f"model {model!r} is not installed; nothing to roll back",
                                     hint="see installed models with: edgeopt agent list")
                target = version or current.previous_version or self._below(model, current.version)
                if target is None:
                    raise InputError(f"{model} {current.version} has no previous version to roll back to")
                if target == current.version:
                    raise InputError(f"{model} {target} is already the current version")
                if target not in self.store.versions(model):
                    raise InputError(f"{model} {target} is not installed here "
                                     f"(installed: {', '.join(self.store.versions(model))})")
                self.store.check_complete(model, target)
                manifest = self._reverify_installed(model, target)
            except EdgeoptError as exc:
                self._emit("rollback", False, model=model, version=version,
                           from_version=current.version if current else None, message=exc.one_line(), ctx=ctx)
                raise
            return self._switch_existing(model, target, manifest, current, ctx)

    def _below(self, model: str, version: str) -> str | None:
        lower = [v for v in self.store.versions(model) if Version(v) < Version(version)]
        return lower[-1] if lower else None

    def _reverify_installed(self, model: str, version: str):
        """Files on disk still match the signed manifest (nothing changed them since install)."""
        from ..sdk.package import sha256_file

        root = self.store.package_dir(model, version)
        manifest = self.store.read_manifest(model, version)
        sig = root / "manifest.sig"
        if sig.is_file() and self.config.trusted_keys:
            verify_signature((root / "manifest.json").read_bytes(), sig.read_bytes(), self._trusted_keys())
        elif not self.config.allow_unsigned:
            raise SecurityError(f"{model} {version} has no signature on disk; refused")
        for fname, entry in manifest.files.items():
            if sha256_file(root / fname) != entry.sha256:
                raise SecurityError(f"{model} {version}: {fname} changed on disk since it was installed")
        return manifest

    def _switch_existing(self, model: str, target: str, manifest, current: InstalledModel,
                         ctx: dict[str, Any]) -> InstalledModel:
        previous = self._below(model, target)
        new = InstalledModel(name=model, version=target, path=self.store.package_dir(model, target),
                             manifest=manifest, previous_version=previous)
        loaded: LoadedModel | None = None
        switched = False
        try:
            loaded = load_installed(new, self.config)
            self._check_placement(loaded, manifest, current.version, ctx)
            warm_up(loaded, package_dir=new.path, manifest=manifest)
            report = self_test(loaded, new.path, manifest)
            self._emit("self_test", True, model=model, version=target, from_version=current.version,
                       message=f"{report.get('samples', 0)} golden samples within tolerance", ctx=ctx, details=report)
            self.store.write_journal({"op": "rollback", "model": model, "version": target,
                                      "from_version": current.version, "created": False})
            crash_point("rollback_before_switch")
            self.store.set_current(model, target, previous)
            switched = True
            crash_point("rollback_after_switch_pointer")
            if self.on_switch is not None:
                self.on_switch(new, loaded)
            self.store.clear_journal()
        except BaseException as exc:
            if switched:
                self.store.set_current(model, current.version, current.previous_version)
            self.store.clear_journal()
            if loaded is not None:
                loaded.close()
            msg = exc.one_line() if isinstance(exc, EdgeoptError) else f"{type(exc).__name__}: {exc}"
            self._emit("rollback", False, model=model, version=target, from_version=current.version,
                       message=f"{msg}; {current.version} still serving", ctx=ctx)
            raise
        self._emit("switch", True, model=model, version=target, from_version=current.version,
                   message=f"serving {model} {target} (was {current.version})", ctx=ctx)
        self._emit("rollback", True, model=model, version=target, from_version=current.version,
                   message=f"rolled back {model} from {current.version} to {target}", ctx=ctx)
        return new
