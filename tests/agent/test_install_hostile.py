"""Hostile archives: zip-slip paths, links, device files, oversize members, manifests pointing outside.

Each is a real signed digits package with one crafted member added (or a crafted manifest), so the
only thing wrong is the hostile part. The installer must refuse with an event and write nothing outside
its state directory; the installed version keeps serving.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from edgeopt.agent.installer import Installer
from edgeopt.sdk.errors import PackageError


def _members_of(pkg):
    with tarfile.open(pkg, "r:*") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _info(name, *, type_=tarfile.REGTYPE, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = type_, size, linkname, 0o644
    return info


HOSTILE = [
    ("../escaped.txt", tarfile.REGTYPE, "", r"unsafe path in package: '../escaped.txt' \('..' and empty components"),
    ("golden/../../escaped.txt", tarfile.REGTYPE, "", r"unsafe path in package: 'golden/../../escaped.txt'"),
    ("/tmp/edgeopt-abs-escaped.txt", tarfile.REGTYPE, "",
     r"unsafe path in package: '/tmp/edgeopt-abs-escaped.txt' \(absolute paths are refused\)"),
    ("evil-link", tarfile.SYMTYPE, "/etc/passwd", r"link member 'evil-link' refused \(packages hold plain files only\)"),
    ("evil-hardlink", tarfile.LNKTYPE, "model.onnx", r"link member 'evil-hardlink' refused"),
    ("evil-dev", tarfile.CHRTYPE, "", r"member 'evil-dev' is not a regular file \(type b'3'\); refused"),
    ("evil-fifo", tarfile.FIFOTYPE, "", r"member 'evil-fifo' is not a regular file \(type b'6'\); refused"),
    ("subdir", tarfile.DIRTYPE, "", r"member 'subdir' is not a regular file \(type b'5'\); refused"),
]


@pytest.mark.parametrize("name,type_,linkname,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_member_refused(installer, events, make_package, craft_archive, tmp_path, name, type_, linkname, message):
    installer.install_file(make_package("1.0.0"))
    members = _members_of(make_package("2.0.0"))
    data = b"pwned" if type_ == tarfile.REGTYPE else None
    members.insert(1, (_info(name, type_=type_, size=len(data or b""), linkname=linkname), data))
    bad = craft_archive(tmp_path / "hostile.eopkg", members)
    with pytest.raises(PackageError, match=message):
        installer.install_file(bad)
    ev = events.last("refused")
    assert ev["ok"] is False and ev["details"]["stage"] == "open"
    assert installer.store.current("digits").version == "1.0.0"
    assert installer.store.versions("digits") == ["1.0.0"]
    # nothing landed outside (or inside) the state dir
    for path in (tmp_path / "escaped.txt", tmp_path.parent / "escaped.txt",
                 installer.store.root.parent / "escaped.txt", Path("/tmp/edgeopt-abs-escaped.txt")):
        assert not path.exists()
    assert list(installer.store.staging_dir.iterdir()) == []


def test_unlisted_extra_member_refused(installer, events, make_package, craft_archive, tmp_path):
    members = _members_of(make_package("1.0.0"))
    members.append((_info("extra.sh", size=5), b"hello"))
    bad = craft_archive(tmp_path / "extra.eopkg", members)
    with pytest.raises(Exception, match=r"members not listed in the manifest: \['extra.sh'\]"):
        installer.install_file(bad)
    assert events.last("refused")["details"]["stage"] == "verify"
    assert installer.store.current("digits") is None


def test_duplicate_member_refused(installer, make_package, craft_archive, tmp_path):
    members = _members_of(make_package("1.0.0"))
    onnx = [m for m in members if m[0].name == "model.onnx"][0]
    bad = craft_archive(tmp_path / "dup.eopkg", members + [onnx])
    with pytest.raises(PackageError, match="duplicate member 'model.onnx'"):
        installer.install_file(bad)


def test_oversize_member_refused(installer, events, make_package):
    small = Installer(installer.store, installer.config, on_event=events, capabilities=installer.capabilities,
                      max_extract_bytes=100_000)
    with pytest.raises(PackageError, match=r"member 'model.onnx' is 231682 bytes, over the 100000-byte limit"):
        small.install_file(make_package("1.0.0"))
    assert events.last("refused")["details"]["stage"] == "open"
    assert small.store.current("digits") is None


def test_manifest_pointing_outside_the_package_refused(installer, events, make_package, tmp_path, agent_keys):
    import json

    from edgeopt.sdk.package import Manifest, load_private_key, write_package

    pkg = make_package("1.0.0")
    with tarfile.open(pkg) as tar:
        manifest = Manifest.model_validate(json.loads(tar.extractfile("manifest.json").read()))
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                 if m.name not in ("manifest.json", "manifest.sig")}
    # a validly signed manifest whose model_file is not one of its files (it would be read outside)
    evil = manifest.model_copy(update={"model_file": "../../../etc/passwd"})
    out = write_package(tmp_path / "evil.eopkg", evil, files, load_private_key(agent_keys.trusted_private))
    assert out.model_file == "../../../etc/passwd"
    with pytest.raises(PackageError, match=r"manifest model_file '../../../etc/passwd' is not one of the package's files"):
        installer.install_file(tmp_path / "evil.eopkg")
    assert events.last("refused")["details"]["stage"] == "verify"
