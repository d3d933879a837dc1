"""The .eopkg container: signing, verification and defensive reading (no ML runtime needed)."""
import io
import json
import tarfile

import pytest

from edgeopt.sdk.errors import PackageError, SecurityError
from edgeopt.sdk.package import (Manifest, PackageReader, SourceModel, TensorSpec, generate_keypair,
                                 load_private_key, load_public_key, write_package)
from edgeopt.sdk.profile import load_profile


def _manifest(version="1.0.0"):
    return Manifest(name="toy", version=version, profile=load_profile("cpu").to_dict(), runtime="onnxruntime",
                    runtime_version="x", device="CPUExecutionProvider", precision="fp32", model_file="model.onnx",
                    inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 4])],
                    outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 2])],
                    source_model=SourceModel(filename="toy.onnx", format="onnx", sha256="0" * 64))


@pytest.fixture()
def signed(tmp_path, keypair):
    out = tmp_path / "toy.eopkg"
    write_package(out, _manifest(), {"model.onnx": b"fake-model-bytes", "golden.npz": b"g"},
                  private_key=load_private_key(keypair[0]))
    return out


def test_sign_and_verify(signed, keypair):
    with PackageReader(signed) as pkg:
        signer = pkg.verify([load_public_key(keypair[1])])
        assert len(signer) == 16
        assert set(pkg.manifest.files) == {"model.onnx", "golden.npz"}


def test_other_key_is_refused(signed, tmp_path):
    _, other_pub = generate_keypair(tmp_path / "other")
    with PackageReader(signed) as pkg, pytest.raises(SecurityError, match="does not match any trusted key"):
        pkg.verify([load_public_key(other_pub)])


def _rewrite(src, dst, mutate):
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            data = mutate(m.name, data)
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_tampered_artifact_is_refused(signed, keypair, tmp_path):
    bad = tmp_path / "bad.eopkg"
    _rewrite(signed, bad, lambda n, d: b"evil-model-bytes" if n == "model.onnx" else d)
    with PackageReader(bad) as pkg, pytest.raises(SecurityError, match="model.onnx does not match its sha256"):
        pkg.verify([load_public_key(keypair[1])])


def test_tampered_manifest_breaks_signature(signed, keypair, tmp_path):
    bad = tmp_path / "bad.eopkg"

    def bump(n, d):
        if n != "manifest.json":
            return d
        doc = json.loads(d)
        doc["version"] = "9.0.0"
        return json.dumps(doc).encode()

    _rewrite(signed, bad, bump)
    with PackageReader(bad) as pkg, pytest.raises(SecurityError, match="signature does not match"):
        pkg.verify([load_public_key(keypair[1])])


def test_unsigned_refused_unless_allowed(tmp_path, keypair):
    out = tmp_path / "u.eopkg"
    write_package(out, _manifest(), {"model.onnx": b"m"})
    with PackageReader(out) as pkg:
        with pytest.raises(SecurityError, match="not signed"):
            pkg.verify([load_public_key(keypair[1])])
        assert pkg.verify(None, allow_unsigned=True) is None


@pytest.mark.parametrize("name,kind,msg", [
    ("../evil", tarfile.REGTYPE, "unsafe path"),
    ("/etc/evil", tarfile.REGTYPE, "unsafe path"),
    ("link", tarfile.SYMTYPE, "link member"),
    ("hard", tarfile.LNKTYPE, "link member"),
    ("dev", tarfile.CHRTYPE, "not a regular file"),
])
def test_hostile_members_are_refused(tmp_path, signed, name, kind, msg):
    bad = tmp_path / "hostile.eopkg"
    with tarfile.open(signed) as tin, tarfile.open(bad, "w:gz") as tout:
        for m in tin.getmembers():
            tout.addfile(m, tin.extractfile(m))
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            info.linkname = "/etc/passwd"
        tout.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    with pytest.raises(PackageError, match=msg):
        PackageReader(bad).open()


def test_truncated_and_garbage_files(tmp_path, signed):
    cut = tmp_path / "cut.eopkg"
    cut.write_bytes(signed.read_bytes()[: signed.stat().st_size // 2])
    with pytest.raises(PackageError, match="not a valid .eopkg archive|truncated or corrupt"):
        with PackageReader(cut) as pkg:
            pkg.verify_hashes()
    junk = tmp_path / "junk.eopkg"
    junk.write_text("hello")
    with pytest.raises(PackageError, match="not a valid .eopkg archive"):
        PackageReader(junk).open()


def test_oversize_member_refused(signed):
    with pytest.raises(PackageError, match="over the 4-byte limit"):
        PackageReader(signed, max_member_bytes=4).open()


def test_write_is_atomic_on_failure(tmp_path, keypair, monkeypatch):
    """A failure in the middle of writing the archive leaves neither the output nor a temp file."""
    out = tmp_path / "never.eopkg"
    real_addfile = tarfile.TarFile.addfile
    calls = []

    def failing_addfile(self, info, fileobj=None):
        calls.append(info.name)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_addfile(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", failing_addfile)
    with pytest.raises(OSError, match="disk full"):
        write_package(out, _manifest(), {"model.onnx": b"m", "golden.npz": b"g"},
                      private_key=load_private_key(keypair[0]))
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_unsupported_major_and_bad_version(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        Manifest.model_validate({**_manifest().model_dump(), "format_version": "2.0"})
    with pytest.raises(ValueError, match="not a PEP 440"):
        Manifest.model_validate({**_manifest().model_dump(), "version": "latest"})


def test_extract_refuses_existing_target(signed, tmp_path):
    dest = tmp_path / "x"
    with PackageReader(signed) as pkg:
        pkg.extract_to(dest)
        assert (dest / "model.onnx").read_bytes() == b"fake-model-bytes"
        with pytest.raises(FileExistsError):
            pkg.extract_to(dest)
