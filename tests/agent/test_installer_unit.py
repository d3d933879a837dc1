"""Exact tests of `agent/installer.py`: every event the installer sends (fields and text), every refusal's
message, each failure stage and what it leaves, the free-space rule at its boundary (docs/mutation.md).

Real packages of the digits CNN (tests/agent/conftest.py's ``make_package``) installed with the real ONNX
Runtime; only the download, the free space and a failing step are stood in for, through the installer
module's own names.
"""
from __future__ import annotations

import errno
import json
import shutil
import types

import pytest

from edgeopt.agent import installer as I
from edgeopt.agent.installer import Installer
from edgeopt.agent.store import Store
from edgeopt.sdk.errors import EdgeoptError, InputError, PackageError, SecurityError, UnsupportedError

EVENT_KEYS = {"event", "ok", "model", "version", "from_version", "message", "command_id", "deployment_id", "details"}


def _recording_closes(closed: list[str]):
    """``load_installed`` whose models append their version to ``closed`` when the installer closes them."""
    real_load = I.load_installed

    def load(model, config):
        loaded = real_load(model, config)
        real_close = loaded.close
        loaded.close = lambda: (closed.append(model.version), real_close())
        return loaded
    return load


def _installer(agent_config, events, **config):
    cfg = agent_config(**config)
    return Installer(Store(cfg.state_dir), cfg, on_event=events)


def _unsigned(make_package, rewrite_archive, tmp_path, version="1.0.0", *, runtime="onnxruntime", edit=None,
              drop=()):
    """An unsigned package whose manifest ``edit(doc)`` changed and whose members in ``drop`` are gone."""
    src = make_package(version, key=None, runtime=runtime)
    out = tmp_path / f"edited-{version}-{len(list(tmp_path.glob('edited-*')))}.eopkg"

    def change(name, data):
        if name == "manifest.json" and edit is not None:
            doc = json.loads(data)
            edit(doc)
            return json.dumps(doc).encode()
        return None

    rewrite_archive(src, out, change)
    if drop:
        import io
        import tarfile

        with tarfile.open(out) as tin:
            members = [(m, tin.extractfile(m).read()) for m in tin.getmembers() if m.name not in drop]
        with tarfile.open(out, "w:gz") as tout:
            for m, data in members:
                tout.addfile(m, io.BytesIO(data))
    return out


# --------------------------------------------------------------------------- events


def test_install_events_fields_and_texts(installer, events, make_package):
    installer.install_file(make_package("1.0.0"))
    assert all(set(e) == EVENT_KEYS for e in events)
    assert all(e["command_id"] is None and e["deployment_id"] is None for e in events)
    first = {e["event"]: e for e in events}
    assert first["self_test"]["message"] == "4 golden samples within tolerance"
    assert first["switch"]["message"] == "serving digits 1.0.0" and first["switch"]["details"] == {}
    assert first["switch"]["from_version"] is None
    assert first["install"]["message"] == "installed digits 1.0.0"
    details = dict(first["install"]["details"])
    placement = details.pop("placement")
    assert details == {"profile": "cpu", "runtime": "onnxruntime", "device": "CPUExecutionProvider",
                       "precision": "fp32"}
    assert placement["ok"] is True and set(placement["devices"]) == {"CPUExecutionProvider"}
    events.clear()
    installer.install_file(make_package("2.0.0"), command_id="c9", deployment_id="d9")
    assert events.kinds() == [("self_test", True), ("switch", True), ("install", True)]
    assert events.last("switch")["message"] == "serving digits 2.0.0 (was 1.0.0)"
    assert all((e["model"], e["version"], e["from_version"]) == ("digits", "2.0.0", "1.0.0") for e in events)
    assert all((e["command_id"], e["deployment_id"]) == ("c9", "d9") for e in events)


def test_a_broken_event_sink_does_not_fail_the_install(agent_config, make_package):
    def sink(doc):
        raise RuntimeError("sink down")

    cfg = agent_config()
    inst = Installer(Store(cfg.state_dir), cfg, on_event=sink)
    assert inst.install_file(make_package("1.0.0")).version == "1.0.0"
    no_sink = Installer(Store(cfg.state_dir), cfg)
    assert no_sink.install_file(make_package("2.0.0")).version == "2.0.0"


def test_constructor_defaults(agent_config):
    cfg = agent_config()
    store = Store(cfg.state_dir)
    inst = Installer(store, cfg, capabilities={"x": 1})
    assert inst.capabilities == {"x": 1}
    assert inst.max_extract_bytes == 2 * cfg.download.max_bytes
    assert Installer(store, cfg, capabilities={}, max_extract_bytes=123).max_extract_bytes == 123
    assert Installer(store, cfg, capabilities={}).capabilities == {}
    assert Installer(store, cfg).capabilities == I.probe()


def test_extract_limit_is_the_installers(agent_config, events, make_package):
    pkg = make_package("1.0.0")
    inst = Installer(Store(agent_config().state_dir), agent_config(), on_event=events, max_extract_bytes=100)
    with pytest.raises(PackageError, match=r"over the 100-byte limit"):
        inst.install_file(pkg)
    assert events.last("refused")["details"] == {"stage": "open", "error": "PackageError"}
    assert events.last("refused")["message"].endswith("over the 100-byte limit")


def test_crash_points_list_every_fault_injection_point_in_order():
    """CRASH_POINTS is what the kill tests and the docs name: it must be exactly the installer's points."""
    import inspect
    import re

    used = re.findall(r'crash_point\("([a-z_]+)"\)', inspect.getsource(I))
    assert list(I.CRASH_POINTS) == used


# --------------------------------------------------------------------------- install_url


def test_install_url_downloads_installs_and_removes_the_file(installer, events, make_package, monkeypatch):
    pkg = make_package("1.0.0")
    calls = []

    def fake_download(url, dest, **kw):
        calls.append((url, dest, kw))
        shutil.copyfile(pkg, dest)
        return dest

    monkeypatch.setattr(I, "download", fake_download)
    model = installer.install_url("https://store/p.eopkg", "AB" * 32, size=pkg.stat().st_size, command_id="c1",
                                  deployment_id="d1")
    assert model.version == "1.0.0"
    (url, dest, kw), = calls
    assert url == "https://store/p.eopkg" and dest == installer.store.downloads_dir / f"{'ab' * 32}.eopkg"
    cfg = installer.config.download
    assert kw == {"sha256": "AB" * 32, "size": pkg.stat().st_size, "max_bytes": cfg.max_bytes,
                  "timeout_s": cfg.timeout_s, "allowed": cfg.allowed_urls}
    assert not dest.exists()
    ev = events[0]
    assert (ev["event"], ev["ok"], ev["command_id"], ev["deployment_id"]) == ("download", True, "c1", "d1")
    assert ev["message"] == f"downloaded {pkg.stat().st_size} bytes"
    assert set(ev["details"]) == {"url", "bytes", "seconds"} and ev["details"]["url"] == "https://store/p.eopkg"
    assert ev["details"]["bytes"] == pkg.stat().st_size and 0 <= ev["details"]["seconds"] < 600
    assert ev["details"]["seconds"] == round(ev["details"]["seconds"], 3)  # milliseconds, no more
    assert events.kinds()[1:] == [("self_test", True), ("switch", True), ("install", True)]
    assert all(e["command_id"] == "c1" for e in events)


def test_install_url_removes_the_download_when_the_install_fails(installer, events, tmp_path, monkeypatch):
    def fake_download(url, dest, **kw):
        dest.write_bytes(b"not a package")
        return dest

    monkeypatch.setattr(I, "download", fake_download)
    with pytest.raises(PackageError, match="not a valid .eopkg archive"):
        installer.install_url("https://store/p.eopkg", "a" * 64)
    assert list(installer.store.downloads_dir.iterdir()) == []
    assert events.kinds() == [("download", True), ("refused", False)]


def test_install_url_download_failure_event(installer, events, monkeypatch):
    def fake_download(url, dest, **kw):
        raise SecurityError("refused, nothing was fetched", hint="add it")

    monkeypatch.setattr(I, "download", fake_download)
    with pytest.raises(SecurityError):
        installer.install_url("https://elsewhere/p.eopkg", "a" * 64, command_id="c2")
    ev, = events
    assert (ev["event"], ev["ok"], ev["message"]) == ("download", False, "refused, nothing was fetched (add it)")
    assert ev["details"] == {"url": "https://elsewhere/p.eopkg"} and ev["command_id"] == "c2"


def test_install_url_checks_free_space_before_downloading(installer, events, monkeypatch):
    monkeypatch.setattr(I, "download", lambda *a, **kw: pytest.fail("downloaded although the disk is too small"))
    free = shutil.disk_usage(installer.store.root).free
    with pytest.raises(UnsupportedError, match=rf"the download needs {free} bytes, \d+ are free$"):
        installer.install_url("https://store/p.eopkg", "a" * 64, size=free)
    assert events.last("download")["ok"] is False


# --------------------------------------------------------------------------- free space


@pytest.mark.parametrize("need", [0, 1000, 12345])
def test_free_space_rule_at_its_boundary(installer, monkeypatch, need):
    """A package needs its size plus a tenth plus 16 MiB free; exactly that is enough."""
    root = installer.store.root
    exact = need * 1.1 + 16 * 1024 * 1024
    monkeypatch.setattr(I.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=exact))
    installer._check_free(need, "the package needs")
    monkeypatch.setattr(I.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=exact - 1))
    with pytest.raises(UnsupportedError) as err:
        installer._check_free(need, "the package needs")
    assert str(err.value) == f"not enough disk space in {root}: the package needs {need} bytes, {exact - 1} are free"


def test_install_refused_when_the_disk_is_too_small(installer, events, make_package, monkeypatch):
    pkg = make_package("1.0.0")
    monkeypatch.setattr(I.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=16 * 1024 * 1024))
    with pytest.raises(UnsupportedError, match=r"the package needs \d+ bytes, 16777216 are free"):
        installer.install_file(pkg)
    ev = events.last("refused")
    assert ev["details"] == {"stage": "verify", "error": "UnsupportedError"} and ev["model"] == "digits"
    assert installer.store.versions("digits") == []


# --------------------------------------------------------------------------- verification


def test_same_and_lower_versions_refused_with_their_reason(installer, events, make_package):
    installer.install_file(make_package("2.0.0"))
    for version, word in (("2.0.0", "the installed version"), ("1.0.0", "lower than the installed 2.0.0")):
        with pytest.raises(InputError) as err:
            installer.install_file(make_package(version))
        assert str(err.value) == f"digits {version} is {word}; refused"
        assert err.value.hint == "use an explicit rollback to go back to an older version"
        ev = events.last("refused")
        assert (ev["model"], ev["version"], ev["from_version"]) == ("digits", version, "2.0.0")
        assert ev["details"] == {"stage": "verify", "error": "InputError"}


def test_explicit_rollback_install_of_a_lower_version(installer, events, make_package):
    installer.install_file(make_package("2.0.0"))
    seen = []
    installer.on_switch = lambda model, loaded: seen.append(installer.store.read_journal())
    events.clear()
    model = installer.install_file(make_package("1.0.0"), rollback=True)
    assert (model.version, model.previous_version) == ("1.0.0", "2.0.0")
    assert events.kinds() == [("self_test", True), ("switch", True), ("rollback", True)]
    journal, = seen
    assert {k: v for k, v in journal.items() if k != "started_at"} == {
        "op": "rollback-install", "model": "digits", "version": "1.0.0", "from_version": "2.0.0", "created": True}
    assert isinstance(journal["started_at"], float)
    assert installer.store.read_journal() is None


def test_install_journal(installer, make_package):
    seen = []
    installer.on_switch = lambda model, loaded: seen.append(installer.store.read_journal())
    installer.install_file(make_package("1.0.0"))
    assert seen[0]["op"] == "install" and seen[0]["from_version"] is None and seen[0]["created"] is True


def test_unsigned_package_refused_by_default(installer, events, make_package):
    pkg = make_package("1.0.0", key=None)
    with pytest.raises(SecurityError) as err:
        installer.install_file(pkg)
    assert str(err.value) == f"{pkg.name} is not signed (no manifest.sig); refused"
    assert err.value.hint == "sign it with edgeopt package --sign-key, or set allow_unsigned = true for development"


def test_signed_package_without_trusted_keys_when_unsigned_is_allowed(agent_config, events, make_package):
    inst = _installer(agent_config, events, trusted_keys=[], allow_unsigned=True)
    assert inst.install_file(make_package("1.0.0", key="other")).version == "1.0.0"


def test_signed_package_without_any_key_is_refused(agent_config, events, make_package):
    """A config that trusts no key and refuses unsigned packages cannot pass validation; the installer still
    refuses rather than skip the check if it is handed one."""
    cfg = agent_config().model_copy(update={"trusted_keys": [], "allow_unsigned": False})
    inst = Installer(Store(cfg.state_dir), cfg, on_event=events)
    with pytest.raises(SecurityError) as err:
        inst.install_file(make_package("1.0.0"))
    assert str(err.value) == "no trusted key configured; cannot verify the package signature"


def test_signed_package_checked_even_when_unsigned_is_allowed(agent_config, events, make_package):
    inst = _installer(agent_config, events, allow_unsigned=True)
    with pytest.raises(SecurityError, match="signature does not match any trusted key"):
        inst.install_file(make_package("1.0.0", key="other"))
    with pytest.raises(SecurityError, match="model.onnx does not match its sha256"):
        inst.install_file(make_package("1.0.0", key="trusted", tamper="artifact"))


def test_hashes_checked_on_unsigned_packages(agent_config, events, make_package, rewrite_archive, tmp_path):
    inst = _installer(agent_config, events, allow_unsigned=True)
    pkg = rewrite_archive(make_package("1.0.0", key=None), tmp_path / "t.eopkg",
                          lambda n, d: d[:-1] + bytes([d[-1] ^ 1]) if n == "model.onnx" else None)
    with pytest.raises(SecurityError, match="model.onnx does not match its sha256"):
        inst.install_file(pkg)


@pytest.mark.parametrize("version,ok", [
    ("1." + "0" * 62, True),   # 64 characters
    ("1." + "0" * 63, False),  # 65
    (" 1.0.0", False),         # PEP 440 allows the space; a folder name must not start with it
    ("v1.0.0", True),
    ("1!2.0", True),
    ("1.0.0+local_x", True),
])
def test_version_as_folder_name(agent_config, events, make_package, rewrite_archive, tmp_path, version, ok):
    inst = _installer(agent_config, events, allow_unsigned=True)
    pkg = _unsigned(make_package, rewrite_archive, tmp_path, edit=lambda d: d.update(version=version))
    if ok:
        assert inst.install_file(pkg).version == version
    else:
        with pytest.raises(PackageError) as err:
            inst.install_file(pkg)
        assert str(err.value) == f"version {version!r} cannot be used as a folder name"


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(model_file="../../etc/passwd"),
     "manifest model_file '../../etc/passwd' is not one of the package's files"),
    (lambda d: d["golden"].update(file="other.npz"), "manifest golden.file 'other.npz' is not one of the package's files"),
])
def test_manifest_names_only_its_own_files(agent_config, events, make_package, rewrite_archive, tmp_path, edit,
                                           message):
    inst = _installer(agent_config, events, allow_unsigned=True)
    with pytest.raises(PackageError) as err:
        inst.install_file(_unsigned(make_package, rewrite_archive, tmp_path, edit=edit))
    assert str(err.value) == message
    assert events.last("refused")["details"] == {"stage": "verify", "error": "PackageError"}


def test_package_without_golden_installs(agent_config, events, make_package, rewrite_archive, tmp_path):
    inst = _installer(agent_config, events, allow_unsigned=True)
    pkg = _unsigned(make_package, rewrite_archive, tmp_path, edit=lambda d: d.update(golden=None))
    assert inst.install_file(pkg).manifest.golden is None


def test_openvino_model_needs_its_weights(agent_config, events, make_package, rewrite_archive, tmp_path):
    inst = _installer(agent_config, events, allow_unsigned=True)

    def drop_bin(doc):
        del doc["files"]["model.bin"]

    pkg = _unsigned(make_package, rewrite_archive, tmp_path, runtime="openvino", edit=drop_bin, drop=("model.bin",))
    with pytest.raises(PackageError) as err:
        inst.install_file(pkg)
    assert str(err.value) == "OpenVINO model model.xml has no model.bin in the package"
    # an ONNX model named .xml is not an OpenVINO model: no weights file is asked for
    I.Installer._check_manifest_paths(types.SimpleNamespace(
        version="1.0.0", model_file="model.xml", golden=None, files={"model.xml": 1}, runtime="onnxruntime"))
    I.Installer._check_manifest_paths(types.SimpleNamespace(
        version="1.0.0", model_file="model.onnx", golden=None, files={"model.onnx": 1}, runtime="openvino"))


# --------------------------------------------------------------------------- extraction and activation failures


@pytest.mark.parametrize("exc,message", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device of {root} while extracting "
                                                        "digits 1.0.0 ("),
    (OSError(errno.EIO, "I/O error"), "extraction failed: [Errno 5] I/O error"),
    (PackageError("member 'x' would land outside the target folder"), "member 'x' would land outside the target folder"),
])
def test_extraction_failure(installer, events, make_package, monkeypatch, exc, message):
    def fail(self, dest):
        dest.mkdir(parents=True)
        (dest / "half").write_bytes(b"x")
        raise exc

    monkeypatch.setattr(I.PackageReader, "extract_to", fail)
    with pytest.raises(EdgeoptError) as err:
        installer.install_file(make_package("1.0.0"))
    assert str(err.value).startswith(message.format(root=installer.store.root))
    assert err.value.__suppress_context__
    ev = events.last("refused")
    assert ev["details"] == {"stage": "extract", "error": type(err.value).__name__}
    assert list(installer.store.staging_dir.iterdir()) == []
    assert installer.store.versions("digits") == []


def test_extraction_that_failed_before_making_the_folder(installer, events, make_package, monkeypatch):
    def fail(self, dest):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(I.PackageReader, "extract_to", fail)
    with pytest.raises(PackageError, match=r"^extraction failed: \[Errno 13\] Permission denied$"):
        installer.install_file(make_package("1.0.0"))


def test_unreadable_pointer_refuses_with_no_from_version(installer, events, make_package):
    pointer = installer.store.pointer_path("digits")
    pointer.parent.mkdir(parents=True)
    pointer.write_text("{")
    with pytest.raises(PackageError, match="unreadable model pointer"):
        installer.install_file(make_package("1.0.0"))
    ev = events.last("refused")
    assert (ev["model"], ev["version"], ev["from_version"]) == ("digits", "1.0.0", None)


@pytest.mark.parametrize("step,stage,event", [
    ("load_installed", "load", "install"),
    ("warm_up", "load", "install"),
    ("self_test", "self_test", "self_test"),
])
def test_failure_at_each_stage_keeps_the_old_version(installer, events, make_package, monkeypatch, step, stage, event):
    installer.install_file(make_package("1.0.0"))
    closed: list[str] = []
    load = _recording_closes(closed)

    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(I, "load_installed", load)
    monkeypatch.setattr(I, step, boom)
    events.clear()
    pointer = installer.store.pointer_path("digits").stat().st_ino
    with pytest.raises(EdgeoptError) as err:
        installer.install_file(make_package("2.0.0"))
    assert str(err.value) == f"{stage} failed: RuntimeError: boom" and type(err.value) is EdgeoptError
    assert isinstance(err.value.__cause__, RuntimeError)
    ev = events[-1]
    assert (ev["event"], ev["ok"]) == (event, False)
    assert ev["message"] == f"{stage} failed: RuntimeError: boom; 1.0.0 still serving"
    assert ev["details"] == {"stage": stage, "error": "EdgeoptError"}
    assert installer.store.current("digits").version == "1.0.0"
    assert installer.store.versions("digits") == ["1.0.0"]
    assert installer.store.read_journal() is None
    assert closed == ([] if step == "load_installed" else ["2.0.0"])
    assert installer.store.pointer_path("digits").stat().st_ino == pointer  # never rewritten: it never switched


def test_first_install_failure_says_nothing_serves(installer, events, make_package, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(I, "warm_up", boom)
    with pytest.raises(EdgeoptError):
        installer.install_file(make_package("1.0.0"))
    assert events.last("install")["message"] == "load failed: RuntimeError: boom; nothing still serving"
    assert events.last("install")["from_version"] is None
    assert installer.store.versions("digits") == [] and installer.store.current("digits") is None


def test_edgeopt_error_in_a_stage_is_raised_as_it_is(installer, events, make_package, monkeypatch):
    own = UnsupportedError("the device went away")

    def boom(*a, **kw):
        raise own

    monkeypatch.setattr(I, "warm_up", boom)
    with pytest.raises(UnsupportedError) as err:
        installer.install_file(make_package("1.0.0"))
    assert err.value is own
    assert events.last("install")["details"] == {"stage": "load", "error": "UnsupportedError"}


def test_interrupt_is_raised_as_it_is_and_undone(installer, events, make_package, monkeypatch):
    installer.install_file(make_package("1.0.0"))

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(I, "self_test", interrupt)
    with pytest.raises(KeyboardInterrupt):
        installer.install_file(make_package("2.0.0"))
    assert events.last("self_test")["message"] == "self_test failed: KeyboardInterrupt:; 1.0.0 still serving"
    assert installer.store.versions("digits") == ["1.0.0"]


def test_switch_failure_on_a_first_install_removes_the_pointer(installer, events, make_package):
    def boom(model, loaded):
        raise RuntimeError("swap refused")

    installer.on_switch = boom
    with pytest.raises(EdgeoptError, match="^switch failed: RuntimeError: swap refused$"):
        installer.install_file(make_package("1.0.0"))
    assert installer.store.read_pointer("digits") is None and installer.store.versions("digits") == []
    assert events.last("install")["details"] == {"stage": "switch", "error": "EdgeoptError"}


def test_switch_failure_restores_the_old_pointer_with_its_previous(installer, events, make_package):
    installer.install_file(make_package("1.0.0"))
    installer.install_file(make_package("2.0.0"))

    def boom(model, loaded):
        raise RuntimeError("swap refused")

    installer.on_switch = boom
    with pytest.raises(EdgeoptError):
        installer.install_file(make_package("3.0.0"))
    assert installer.store.read_pointer("digits")["version"] == "2.0.0"
    assert installer.store.read_pointer("digits")["previous"] == "1.0.0"


def test_no_space_while_committing(installer, events, make_package, monkeypatch):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(installer.store, "commit_package", full)
    with pytest.raises(EdgeoptError) as err:
        installer.install_file(make_package("1.0.0"))
    assert str(err.value).startswith(f"no space left on the device of {installer.store.root} while installing "
                                     "digits 1.0.0 (commit) (")
    assert isinstance(err.value.__cause__, OSError)


def test_journal_failure_leaves_an_existing_folder_of_that_version(installer, events, make_package, monkeypatch):
    """An install that could not even write its journal never created the version folder: it stays."""
    installer.install_file(make_package("1.0.0"))
    installer.install_file(make_package("2.0.0"))
    installer.rollback("digits", "1.0.0")  # 2.0.0 stays on disk, not current
    assert installer.store.versions("digits") == ["1.0.0", "2.0.0"]

    def fail(doc):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(installer.store, "write_journal", fail)
    with pytest.raises(EdgeoptError, match=r"^journal failed: OSError: \[Errno 5\] I/O error$"):
        installer.install_file(make_package("2.0.0"), rollback=True)
    assert installer.store.versions("digits") == ["1.0.0", "2.0.0"]
    assert list(installer.store.staging_dir.iterdir()) == []
    assert events.last("install")["details"] == {"stage": "journal", "error": "EdgeoptError"}


def test_undo_that_fails_is_left_to_recover(installer, events, make_package, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(I, "warm_up", boom)
    monkeypatch.setattr(installer.store, "remove_version", boom)
    with pytest.raises(EdgeoptError, match="^load failed: RuntimeError: boom$"):
        installer.install_file(make_package("1.0.0"))
    assert installer.store.versions("digits") == ["1.0.0"]  # not removed: recover() will
    assert installer.store.read_journal() is not None
    assert installer.store.recover() == ["digits 1.0.0: unfinished install undone"]


def test_install_prunes_to_three_versions(installer, make_package):
    for v in ("1.0.0", "2.0.0", "3.0.0", "4.0.0"):
        installer.install_file(make_package(v))
    assert installer.store.versions("digits") == ["2.0.0", "3.0.0", "4.0.0"]
    assert I.KEEP_VERSIONS == 3


# --------------------------------------------------------------------------- rollback


def test_rollback_refusals_and_their_events(installer, events, make_package):
    with pytest.raises(InputError) as err:
        installer.rollback("nope", command_id="c1")
    assert str(err.value) == "model 'nope' is not installed; nothing to roll back"
    assert err.value.hint == "see installed models with: edgeopt agent list"
    ev = events.last("rollback")
    assert (ev["ok"], ev["model"], ev["version"], ev["from_version"], ev["command_id"]) == (False, "nope", None, None,
                                                                                            "c1")
    assert ev["message"] == "model 'nope' is not installed; nothing to roll back (see installed models with: " \
                            "edgeopt agent list)"
    installer.install_file(make_package("1.0.0"))
    with pytest.raises(InputError) as err:
        installer.rollback("digits")
    assert str(err.value) == "digits 1.0.0 has no previous version to roll back to"
    assert events.last("rollback")["from_version"] == "1.0.0"
    with pytest.raises(InputError) as err:
        installer.rollback("digits", "1.0.0")
    assert str(err.value) == "digits 1.0.0 is already the current version"
    installer.install_file(make_package("2.0.0"))
    with pytest.raises(InputError) as err:
        installer.rollback("digits", "9.0.0")
    assert str(err.value) == "digits 9.0.0 is not installed here (installed: 1.0.0, 2.0.0)"
    assert events.last("rollback")["version"] == "9.0.0"


def test_rollback_targets_and_previous(installer, events, make_package):
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        installer.install_file(make_package(v))
    seen = []
    installer.on_switch = lambda model, loaded: seen.append(installer.store.read_journal())
    events.clear()
    back = installer.rollback("digits", "2.0.0", command_id="r1", deployment_id="d1")
    assert (back.version, back.previous_version) == ("2.0.0", "1.0.0")
    assert installer.store.read_pointer("digits")["previous"] == "1.0.0"
    assert seen == [{"op": "rollback", "model": "digits", "version": "2.0.0", "from_version": "3.0.0",
                     "created": False}]
    assert installer.store.read_journal() is None
    assert events.kinds() == [("self_test", True), ("switch", True), ("rollback", True)]
    assert events.last("self_test")["message"] == "4 golden samples within tolerance"
    assert events.last("switch")["message"] == "serving digits 2.0.0 (was 3.0.0)"
    assert events.last("rollback")["message"] == "rolled back digits from 3.0.0 to 2.0.0"
    assert all((e["version"], e["from_version"], e["command_id"], e["deployment_id"]) == ("2.0.0", "3.0.0", "r1", "d1")
               for e in events)
    # the default target is the previous version
    assert installer.rollback("digits").version == "1.0.0"
    assert installer.store.read_pointer("digits")["previous"] is None
    # with no previous version named, the newest version below the current one is the target
    installer.rollback("digits", "3.0.0")
    ptr = installer.store.read_pointer("digits")
    assert (ptr["version"], ptr["previous"]) == ("3.0.0", "2.0.0")
    assert installer.store.current("digits").previous_version == "2.0.0"


def test_rollback_below_when_the_pointer_names_no_previous(installer, make_package):
    for v in ("1.0.0", "2.0.0"):
        installer.install_file(make_package(v))
    installer.store.set_current("digits", "2.0.0", None)
    assert installer.rollback("digits").version == "1.0.0"


def test_rollback_needs_a_signature_on_disk(agent_config, events, make_package):
    inst = _installer(agent_config, events, allow_unsigned=True)
    inst.install_file(make_package("1.0.0", key=None))
    inst.install_file(make_package("2.0.0"))
    strict = _installer(agent_config, events)
    with pytest.raises(SecurityError) as err:
        strict.rollback("digits")
    assert str(err.value) == "digits 1.0.0 has no signature on disk; refused"
    assert inst.rollback("digits").version == "1.0.0"  # allowed where unsigned packages are


def test_rollback_checks_the_signature_on_disk(installer, make_package):
    installer.install_file(make_package("1.0.0"))
    installer.install_file(make_package("2.0.0"))
    sig = installer.store.package_dir("digits", "1.0.0") / "manifest.sig"
    doc = json.loads(sig.read_text())
    doc["signature"] = doc["signature"][:-4] + ("AAAA" if doc["signature"][-4:] != "AAAA" else "BBBB")
    sig.write_text(json.dumps(doc))
    with pytest.raises(SecurityError, match="signature does not match any trusted key|manifest.sig is malformed"):
        installer.rollback("digits")


def test_rollback_refuses_a_file_changed_on_disk(installer, make_package):
    installer.install_file(make_package("1.0.0"))
    installer.install_file(make_package("2.0.0"))
    golden = installer.store.package_dir("digits", "1.0.0") / "golden.npz"
    data = golden.read_bytes()
    golden.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    with pytest.raises(SecurityError) as err:
        installer.rollback("digits")
    assert str(err.value) == "digits 1.0.0: golden.npz changed on disk since it was installed"


def test_rollback_without_trusted_keys_when_unsigned_is_allowed(agent_config, events, make_package):
    inst = _installer(agent_config, events, trusted_keys=[], allow_unsigned=True)
    inst.install_file(make_package("1.0.0"))
    inst.install_file(make_package("2.0.0"))
    assert inst.rollback("digits").version == "1.0.0"


def test_rollback_failure_restores_the_pointer(installer, events, make_package):
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        installer.install_file(make_package(v))

    def boom(model, loaded):
        raise RuntimeError("swap refused")

    installer.on_switch = boom
    with pytest.raises(RuntimeError):
        installer.rollback("digits")
    ptr = installer.store.read_pointer("digits")
    assert (ptr["version"], ptr["previous"]) == ("3.0.0", "2.0.0")
    assert installer.store.read_journal() is None
    ev = events.last("rollback")
    assert (ev["ok"], ev["version"], ev["from_version"]) == (False, "2.0.0", "3.0.0")
    assert ev["message"] == "RuntimeError: swap refused; 3.0.0 still serving"


def test_rollback_self_test_failure_message(installer, events, make_package, monkeypatch):
    installer.install_file(make_package("1.0.0"))
    installer.install_file(make_package("2.0.0"))

    def fail(*a, **kw):
        raise UnsupportedError("device lost")

    closed: list[str] = []
    load = _recording_closes(closed)

    monkeypatch.setattr(I, "load_installed", load)
    monkeypatch.setattr(I, "self_test", fail)
    pointer = installer.store.pointer_path("digits").stat().st_ino
    with pytest.raises(UnsupportedError):
        installer.rollback("digits")
    assert events.last("rollback")["message"] == "device lost; 2.0.0 still serving"
    assert installer.store.read_pointer("digits")["version"] == "2.0.0"
    assert closed == ["1.0.0"]  # the model loaded for the self-test is closed again
    assert installer.store.pointer_path("digits").stat().st_ino == pointer  # never rewritten
