"""Exact, fast tests of `sdk/package.py`: each limit at its boundary, each refusal's message, each branch.

These are the tests that kill the mutants of the package module (docs/mutation.md); the format's round trip
and the CLI's use of it are tested in test_package_format.py and test_package_errors.py.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import stat
import tarfile

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeopt.sdk import package as P
from edgeopt.sdk.errors import ExitCode, PackageError, SecurityError
from edgeopt.sdk.package import (FileEntry, GoldenSpec, Manifest, PackageReader, SourceModel, TensorSpec,
                                 check_file_references, generate_keypair, key_id, load_private_key,
                                 load_public_key, parse_manifest, read_manifest, sha256_file, sign_manifest,
                                 verify_signature, write_package)

GIB = 1024**3
# A read loop that never ends (a mutant of it) fails here in a minute, not pytest's five.
pytestmark = pytest.mark.timeout(60)


def _manifest(**update) -> Manifest:
    doc = dict(name="toy", version="1.0.0", profile={"name": "cpu"}, runtime="onnxruntime", runtime_version="x",
               device="CPU", precision="fp32", model_file="model.onnx",
               inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 4])],
               outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 2])],
               source_model=SourceModel(filename="toy.onnx", format="onnx", sha256="0" * 64))
    doc.update(update)
    return Manifest(**doc)


def _tar(path, members, mode="w"):
    """A raw archive of (name, bytes) or (TarInfo, bytes) members, in that order."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _manifest_member(manifest: Manifest, files: dict[str, bytes]) -> tuple[str, bytes]:
    """manifest.json listing ``files`` with their true hashes and sizes."""
    entries = {n: FileEntry(sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for n, d in files.items()}
    return "manifest.json", manifest.model_copy(update={"files": entries}).to_json_bytes()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("unit-keys")
    priv, pub = generate_keypair(out)
    other_priv, other_pub = generate_keypair(out, name="other")
    return {"priv": load_private_key(priv), "pub": load_public_key(pub), "other_priv": load_private_key(other_priv),
            "other_pub": load_public_key(other_pub), "priv_path": priv, "pub_path": pub}


# --------------------------------------------------------------------------- the manifest model


def test_manifest_defaults_and_format_version():
    m = _manifest()
    assert m.format_version == "1.1" == P.FORMAT_VERSION
    assert parse_manifest(m.to_json_bytes()).format_version == "1.1"
    assert Manifest.model_validate({**m.model_dump(), "format_version": "1.0"}).format_version == "1.0"
    assert Manifest.model_validate({**m.model_dump(), "format_version": "1.7"}).format_version == "1.7"
    assert m.profile_name == "cpu"
    assert _manifest(profile={}).profile_name == "?"
    assert str(m.parsed_version) == "1.0.0" and m.parsed_version < _manifest(version="1.10.0").parsed_version


@pytest.mark.parametrize("value,message", [
    ("2.0", "package format 2.0 is not supported (this edgeopt reads 1.x)"),
    ("0.9", "package format 0.9 is not supported (this edgeopt reads 1.x)"),
    ("one.0", "format_version must look like '1.0', found 'one.0'"),
])
def test_format_version_refusals(value, message):
    with pytest.raises(PackageError) as err:
        parse_manifest(json.dumps({**_manifest().model_dump(mode="json"), "format_version": value}).encode(), "p.eopkg")
    assert str(err.value) == f"p.eopkg: invalid manifest at format_version: Value error, {message}"


def test_version_must_parse():
    with pytest.raises(PackageError) as err:
        parse_manifest(json.dumps({**_manifest().model_dump(mode="json"), "version": "latest"}).encode())
    assert str(err.value) == ("manifest: invalid manifest at version: Value error, version 'latest' is not a "
                              "PEP 440 / semantic version such as 1.2.0")


def test_file_entry_bounds():
    FileEntry(sha256="a" * 64, size=0)  # an empty file is a file
    for bad in ({"sha256": "A" * 64, "size": 1}, {"sha256": "a" * 63, "size": 1}, {"sha256": "a" * 64, "size": -1}):
        with pytest.raises(ValueError):
            FileEntry(**bad)


def test_field_defaults_readers_rely_on():
    calib = P.CalibrationInfo(source="random")
    assert (calib.sha256, calib.samples, calib.meaningful) == (None, 0, True)
    metric = P.MetricResult(name="top-1 agreement", fp32=1.0, optimized=0.9, drop=0.1)
    assert (metric.bound, metric.rule, metric.passed) == (None, "", True)
    report = P.ValidationReport(samples=1, max_abs_error=0.0, min_cosine=1.0, mean_cosine=1.0, passed=True)
    assert (report.top1_agreement, report.task, report.task_reason, report.metric, report.sensitivity_basis) == \
        (None, "generic", "", None, "")
    assert GoldenSpec(count=1, atol=0, rtol=0, min_cosine=1).file == "golden.npz"
    assert TensorSpec(name="x", dtype="float32", shape=[1]).layout is None
    m = _manifest()
    assert (m.calibration, m.validation, m.benchmark, m.golden) == (None, None, None, None)
    assert m.created_at.utcoffset().total_seconds() == 0


REQUIRED = {
    P.TensorSpec: {"name", "dtype", "shape"},
    P.FileEntry: {"sha256", "size"},
    P.SourceModel: {"filename", "format", "sha256"},
    P.CalibrationInfo: {"source"},
    P.LayerError: {"layer", "error"},
    P.MetricResult: {"name", "fp32", "optimized", "drop"},
    P.OutputFigures: {"name", "min_cosine", "mean_cosine", "min_snr_db", "max_abs_error"},
    P.ValidationReport: {"samples", "max_abs_error", "min_cosine", "mean_cosine", "passed"},
    P.LatencyStats: {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_ips", "iterations"},
    P.BenchmarkReport: {"batch_size", "fp32", "optimized", "speedup", "host_proxy", "target_device"},
    P.GoldenSpec: {"count", "atol", "rtol", "min_cosine"},
    P.Manifest: {"name", "version", "profile", "runtime", "runtime_version", "device", "precision", "model_file",
                 "inputs", "outputs", "source_model"},
}


@pytest.mark.parametrize("model", list(REQUIRED), ids=lambda c: c.__name__)
def test_required_fields_of_the_manifest_contract(model):
    with pytest.raises(ValueError) as err:
        model.model_validate({})
    missing = {e["loc"][0] for e in err.value.errors() if e["type"] == "missing"}
    assert missing == REQUIRED[model]


def test_list_and_dict_fields_default_to_empty():
    report = P.ValidationReport(samples=1, max_abs_error=0.0, min_cosine=1.0, mean_cosine=1.0, passed=True)
    assert (report.checks, report.figures, report.outputs, report.budget, report.failures, report.notes,
            report.sensitive_layers, report.float_layers) == ([], {}, [], {}, [], [], [], [])
    m = _manifest()
    assert (m.files, m.preprocessing, m.toolchain, m.decisions, m.runtime_options) == ({}, {}, {}, [], {})
    stats = P.LatencyStats(p50_ms=1, p90_ms=1, p99_ms=1, mean_ms=1, throughput_ips=1, iterations=1)
    assert stats.runtime is None
    bench = P.BenchmarkReport(batch_size=1, fp32=stats, optimized=stats, speedup=1.0, host_proxy=False,
                              target_device="CPU")
    assert (bench.machine, bench.threads, bench.note) == ({}, None, "")
    # TensorSpec shapes hold numbers and names of dynamic dimensions
    assert TensorSpec(name="x", dtype="float32", shape=[1, "batch"]).shape == [1, "batch"]


def test_manifest_name_pattern():
    _manifest(name="a" * 128)
    _manifest(name="Model_1.v2-x")
    for bad in ("a" * 129, "-lead", ".hidden", "a/b", "", "a b"):
        with pytest.raises(ValueError):
            _manifest(name=bad)


def test_unknown_fields_are_ignored_by_readers():
    doc = {**_manifest().model_dump(mode="json"), "added_in_1_1": {"x": 1}}
    assert not hasattr(parse_manifest(json.dumps(doc).encode()), "added_in_1_1")


def test_to_json_bytes_is_sorted_and_indented():
    text = _manifest().to_json_bytes().decode("utf-8")
    doc = json.loads(text)
    assert list(doc) == sorted(doc)
    assert text.splitlines()[1].startswith('  "') and not text.splitlines()[1].startswith('   ')


# --------------------------------------------------------------------------- keys and signatures


def test_sha256_file_reads_every_chunk(tmp_path):
    data = os.urandom((1 << 20) * 2 + 17)  # more than two default chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f", chunk=7) == hashlib.sha256(data).hexdigest()


def test_generate_keypair_files_modes_and_refusal(tmp_path):
    priv, pub = generate_keypair(tmp_path / "new" / "keys")
    assert (priv.name, pub.name) == ("edgeopt.key", "edgeopt.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert key_id(load_private_key(priv).public_key()) == key_id(load_public_key(pub))
    with pytest.raises(PackageError) as err:
        generate_keypair(tmp_path / "new" / "keys")
    assert str(err.value) == f"{priv} already exists"
    assert err.value.hint == "pass --force to replace it, or choose another --out"
    old = pub.read_bytes()
    generate_keypair(tmp_path / "new" / "keys", overwrite=True)
    assert pub.read_bytes() != old
    assert sorted(p.name for p in (tmp_path / "new" / "keys").iterdir()) == ["edgeopt.key", "edgeopt.pub"]


def test_generate_keypair_refuses_when_only_the_public_key_exists(tmp_path):
    (tmp_path / "edgeopt.pub").write_text("x")
    with pytest.raises(PackageError, match="edgeopt.pub already exists"):
        generate_keypair(tmp_path)
    assert not (tmp_path / "edgeopt.key").exists()


def test_load_private_key_errors(tmp_path):
    with pytest.raises(PackageError) as err:
        load_private_key(tmp_path / "none.key")
    assert str(err.value) == f"signing key {tmp_path / 'none.key'} not found"
    assert err.value.hint == "create one with: edgeopt keygen --out keys/"
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(PackageError, match=rf"^{re.escape(str(tmp_path / 'junk.key'))} is not an unencrypted PEM "
                                           r"private key: "):
        load_private_key(tmp_path / "junk.key")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    with pytest.raises(PackageError) as err:
        load_private_key(tmp_path / "ec.key")
    assert str(err.value) == f"{tmp_path / 'ec.key'} is not an Ed25519 key"
    assert err.value.hint == "create one with: edgeopt keygen"
    (tmp_path / "enc.key").write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(PackageError, match="enc.key is not an unencrypted PEM private key: "):
        load_private_key(tmp_path / "enc.key")


def test_load_public_key_errors(tmp_path, keys):
    with pytest.raises(PackageError) as err:
        load_public_key(tmp_path / "none.pub")
    assert str(err.value) == f"public key {tmp_path / 'none.pub'} not found"
    with pytest.raises(PackageError, match=r"^public key is not a PEM public key: "):
        load_public_key(b"garbage")
    (tmp_path / "g.pub").write_text("garbage")
    with pytest.raises(PackageError, match=rf"^{re.escape(str(tmp_path / 'g.pub'))} is not a PEM public key: "):
        load_public_key(tmp_path / "g.pub")
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(PackageError) as err:
        load_public_key(ec_pub)
    assert str(err.value) == "public key is not an Ed25519 public key"
    assert key_id(load_public_key(keys["pub_path"].read_bytes())) == key_id(keys["pub"])
    assert key_id(load_public_key(str(keys["pub_path"]))) == key_id(keys["pub"])


def test_key_id_is_the_first_16_hex_digits_of_the_raw_key(keys):
    raw = keys["pub"].public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(keys["pub"]) == hashlib.sha256(raw).hexdigest()[:16]


def test_sign_manifest_document(keys):
    doc = json.loads(sign_manifest(b"bytes", keys["priv"]))
    assert set(doc) == {"alg", "key_id", "signature"}
    assert doc["alg"] == "ed25519" and doc["key_id"] == key_id(keys["pub"])
    keys["pub"].verify(base64.b64decode(doc["signature"]), b"bytes")


def test_verify_signature_refusals(keys):
    good = sign_manifest(b"m", keys["priv"])
    with pytest.raises(SecurityError) as err:
        verify_signature(b"m", None, [keys["pub"]])
    assert str(err.value) == "package is not signed (no manifest.sig)"
    assert err.value.hint == "sign it with: edgeopt package ... --sign-key KEY"
    assert err.value.exit_code == ExitCode.SECURITY
    with pytest.raises(SecurityError) as err:
        verify_signature(b"m", json.dumps({"alg": "rsa", "signature": ""}).encode(), [keys["pub"]])
    assert str(err.value) == "unsupported signature algorithm 'rsa'; expected 'ed25519'"
    with pytest.raises(SecurityError) as err:
        verify_signature(b"m", json.dumps({"signature": ""}).encode(), [keys["pub"]])
    assert str(err.value) == "unsupported signature algorithm None; expected 'ed25519'"
    doc = json.loads(good)
    for bad in (b"not json", b"[1]", json.dumps({"alg": "ed25519"}).encode(),
                json.dumps({**doc, "signature": "!!" + doc["signature"]}).encode()):
        with pytest.raises(SecurityError) as err:
            verify_signature(b"m", bad, [keys["pub"]])
        assert str(err.value) == "manifest.sig is malformed"
    with pytest.raises(SecurityError) as err:
        verify_signature(b"m", good, [])
    assert str(err.value) == "no trusted public key given" and err.value.hint == "pass --public-key FILE"


def test_verify_signature_tries_every_trusted_key(keys):
    good = sign_manifest(b"m", keys["priv"])
    assert verify_signature(b"m", good, [keys["other_pub"], keys["pub"]]) == key_id(keys["pub"])
    assert verify_signature(b"m", good, iter([keys["pub"]])) == key_id(keys["pub"])
    with pytest.raises(SecurityError) as err:
        verify_signature(b"changed", good, [keys["other_pub"], keys["pub"]])
    assert str(err.value) == (f"signature does not match any trusted key (signed by key {key_id(keys['pub'])}, "
                              f"trusted: {key_id(keys['other_pub'])}, {key_id(keys['pub'])})")
    assert err.value.hint == "the package was signed with another key, or its manifest was changed"
    no_id = json.dumps({k: v for k, v in json.loads(good).items() if k != "key_id"}).encode()
    with pytest.raises(SecurityError, match=r"signed by key \?, trusted"):
        verify_signature(b"m", no_id, [keys["other_pub"]])


# --------------------------------------------------------------------------- writing


def test_write_package_layout(tmp_path, keys):
    src = tmp_path / "model.bin"
    src.write_bytes(b"weights" * 100)
    out = tmp_path / "deep" / "dir" / "p.eopkg"
    written = write_package(out, _manifest(), {"z.bin": bytearray(b"zz"), "model.onnx": src, "a/b.npz": b""},
                            private_key=keys["priv"])
    assert written.files == {
        "z.bin": FileEntry(sha256=hashlib.sha256(b"zz").hexdigest(), size=2),
        "model.onnx": FileEntry(sha256=hashlib.sha256(b"weights" * 100).hexdigest(), size=700),
        "a/b.npz": FileEntry(sha256=hashlib.sha256(b"").hexdigest(), size=0)}
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 & ~umask
    with tarfile.open(out, "r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["manifest.json", "manifest.sig", "a/b.npz", "model.onnx", "z.bin"]
        assert all(m.mode == 0o644 and m.isfile() for m in members)
        assert tar.extractfile("manifest.json").read() == written.to_json_bytes()
        assert tar.extractfile("model.onnx").read() == b"weights" * 100
        assert tar.extractfile("z.bin").read() == b"zz"
        assert members[3].mtime == int(written.created_at.timestamp())
    assert [p.name for p in out.parent.iterdir()] == ["p.eopkg"]


def test_write_package_unsigned_has_no_signature_member(tmp_path):
    out = tmp_path / "u.eopkg"
    write_package(out, _manifest(), {"model.onnx": b"m"})
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["manifest.json", "model.onnx"]


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sig"])
def test_write_package_reserved_names(tmp_path, name):
    with pytest.raises(PackageError) as err:
        write_package(tmp_path / "r.eopkg", _manifest(), {name: b"x"})
    assert str(err.value) == f"artifact name {name!r} is reserved"
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_mode_and_cleanup(tmp_path, monkeypatch):
    P._atomic_write(tmp_path / "f", b"data", mode=0o600)
    assert (tmp_path / "f").read_bytes() == b"data" and stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600
    P._atomic_write(tmp_path / "g", b"data")
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o644

    def refuse(*a):
        raise OSError("no replace")

    monkeypatch.setattr(P.os, "replace", refuse)
    with pytest.raises(OSError, match="no replace"):
        P._atomic_write(tmp_path / "h", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "g"]


def test_umask_is_read_without_changing_it():
    before = os.umask(0o027)
    try:
        assert P._umask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(before)


# --------------------------------------------------------------------------- member names


@pytest.mark.parametrize("name", ["model.onnx", "golden/a.npz", "a/./b", "a/b:c", "a..b", ".hidden"])
def test_safe_member_names(name):
    P._check_member_name(name)


@pytest.mark.parametrize("name,why", [
    ("", "absolute paths are refused"),
    ("/etc/passwd", "absolute paths are refused"),
    ("a\\b", "absolute paths are refused"),
    ("C:/x", "absolute paths are refused"),
    ("c:x", "absolute paths are refused"),
    ("..", "'..' and empty components are refused"),
    ("a/../b", "'..' and empty components are refused"),
    ("a/..", "'..' and empty components are refused"),
    ("a//b", "'..' and empty components are refused"),
    ("a/", "'..' and empty components are refused"),
    ("./a", "'..' and empty components are refused"),
])
def test_unsafe_member_names(name, why):
    with pytest.raises(PackageError) as err:
        P._check_member_name(name)
    assert str(err.value) == f"unsafe path in package: {name!r} ({why})"


def test_check_file_references():
    files = {"model.onnx": FileEntry(sha256="a" * 64, size=1), "golden.npz": FileEntry(sha256="a" * 64, size=1)}
    golden = GoldenSpec(count=1, atol=0, rtol=0, min_cosine=1)
    check_file_references(_manifest(files=files, golden=golden))
    with pytest.raises(PackageError) as err:
        check_file_references(_manifest(files=files, model_file="../../etc/passwd"), "p.eopkg")
    assert str(err.value) == ("p.eopkg: manifest model_file '../../etc/passwd' is not one of the package's files "
                              "(golden.npz, model.onnx); refused")
    assert err.value.hint == "a manifest may only name files inside its own package"
    with pytest.raises(PackageError) as err:
        check_file_references(_manifest(files={}))
    assert str(err.value) == "manifest: manifest model_file 'model.onnx' is not one of the package's files (none); refused"
    with pytest.raises(PackageError, match=r"^manifest: manifest golden.file 'other.npz' is not one of"):
        check_file_references(_manifest(files=files, golden=golden.model_copy(update={"file": "other.npz"})))
    with pytest.raises(PackageError, match=r"unsafe path in package: '../x'"):
        check_file_references(_manifest(files={**files, "../x": FileEntry(sha256="a" * 64, size=1)}))


# --------------------------------------------------------------------------- reading


def test_reader_missing_file_and_garbage(tmp_path):
    with pytest.raises(PackageError) as err:
        PackageReader(tmp_path / "none.eopkg").open()
    assert str(err.value) == f"{tmp_path / 'none.eopkg'}: package file not found"
    with pytest.raises(PackageError, match="package file not found"):
        PackageReader(tmp_path).open()  # a folder is not a package file
    (tmp_path / "junk.eopkg").write_bytes(b"hello")
    with pytest.raises(PackageError) as err:
        PackageReader(tmp_path / "junk.eopkg").open()
    assert str(err.value) == f"{tmp_path / 'junk.eopkg'}: not a valid .eopkg archive (not a tar archive)"
    assert err.value.hint == "the file may be truncated or not a package"


def test_reader_truncated_gzip_names_the_error(tmp_path):
    good = tmp_path / "g.eopkg"
    write_package(good, _manifest(), {"model.onnx": os.urandom(50_000)})
    cut = tmp_path / "cut.eopkg"
    cut.write_bytes(good.read_bytes()[:-30_000])
    with pytest.raises(PackageError, match=r"cut.eopkg: not a valid .eopkg archive \((ReadError|EOFError|error): "):
        PackageReader(cut).open()


def test_reader_member_checks(tmp_path):
    m = _manifest()
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    cases = [
        ([_manifest_member(m, {}), (link, b"")], "link member 'evil' refused (packages hold plain files only)"),
        ([_manifest_member(m, {}), (fifo, b"")], "member 'pipe' is not a regular file (type b'6'); refused"),
        ([_manifest_member(m, {"a": b"1"}), ("a", b"1"), ("a", b"1")], "duplicate member 'a'"),
        ([("model.onnx", b"m")], "no manifest.json at the archive root; not an edgeopt package"),
        ([("sub/manifest.json", b"{}")], "no manifest.json at the archive root; not an edgeopt package"),
    ]
    for i, (members, message) in enumerate(cases):
        path = _tar(tmp_path / f"c{i}.eopkg", members)
        with pytest.raises(PackageError) as err:
            PackageReader(path).open()
        assert str(err.value) == f"{path}: {message}"


def test_reader_limits_at_their_boundary(tmp_path):
    m = _manifest()
    files = {"model.onnx": b"x" * 100, "b.bin": b"y" * 60}
    members = [_manifest_member(m, files), *files.items()]
    path = _tar(tmp_path / "p.eopkg", members)
    manifest_size = len(members[0][1])
    biggest = max(100, manifest_size)
    total = manifest_size + 160
    with PackageReader(path, max_member_bytes=biggest, max_total_bytes=total) as pkg:
        pkg.verify(None, allow_unsigned=True)
    with pytest.raises(PackageError) as err:
        PackageReader(path, max_member_bytes=biggest - 1).open()
    big_name = "model.onnx" if biggest == 100 else "manifest.json"
    assert str(err.value) == f"{path}: member {big_name!r} is {biggest} bytes, over the {biggest - 1}-byte limit"
    with pytest.raises(PackageError) as err:
        PackageReader(path, max_total_bytes=total - 1).open()
    assert str(err.value) == f"{path}: package content is over the {total - 1}-byte limit"


def _sparse_tar(path, sizes: dict[str, int]):
    """An uncompressed tar whose members have the given sizes; their content is a hole in a sparse file."""
    with open(path, "wb") as fh:
        for name, size in sizes.items():
            info = tarfile.TarInfo(name)
            info.size = size
            fh.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            fh.seek(fh.tell() + size + (-size % tarfile.BLOCKSIZE))
        fh.write(b"\0" * tarfile.BLOCKSIZE * 2)
    return path


def test_default_member_limit_is_4_gib(tmp_path):
    """The default limits at their boundary, on sparse archives (no content is ever read or written)."""
    assert PackageReader(tmp_path).max_member_bytes == 4 * GIB
    with pytest.raises(PackageError, match="no manifest.json at the archive root"):
        PackageReader(_sparse_tar(tmp_path / "ok.tar", {"m.bin": 4 * GIB})).open()
    path = _sparse_tar(tmp_path / "big.tar", {"m.bin": 4 * GIB + 1})
    with pytest.raises(PackageError) as err:
        PackageReader(path).open()
    assert str(err.value) == f"{path}: member 'm.bin' is {4 * GIB + 1} bytes, over the {4 * GIB}-byte limit"


def test_default_total_limit_is_8_gib(tmp_path):
    assert PackageReader(tmp_path).max_total_bytes == 8 * GIB
    with pytest.raises(PackageError, match="no manifest.json at the archive root"):
        PackageReader(_sparse_tar(tmp_path / "ok.tar", {"a": 4 * GIB, "b": 4 * GIB})).open()
    path = _sparse_tar(tmp_path / "big.tar", {"a": 4 * GIB, "b": 4 * GIB, "c": 1})
    with pytest.raises(PackageError) as err:
        PackageReader(path).open()
    assert str(err.value) == f"{path}: package content is over the {8 * GIB}-byte limit"


def test_manifest_size_limit_is_16_mib(tmp_path):
    head = _manifest().to_json_bytes()
    limit = 16 * 1024 * 1024
    exact = _tar(tmp_path / "exact.eopkg", [("manifest.json", head + b" " * (limit - len(head)))], mode="w:gz")
    with PackageReader(exact) as pkg:
        assert pkg.manifest.name == "toy"
    over = _tar(tmp_path / "over.eopkg", [("manifest.json", head + b" " * (limit + 1 - len(head)))], mode="w:gz")
    with pytest.raises(PackageError) as err:
        PackageReader(over).open()
    assert str(err.value) == f"{over}: manifest.json is too large"


def test_reader_reads_signature_and_names(tmp_path, keys):
    out = tmp_path / "s.eopkg"
    write_package(out, _manifest(), {"model.onnx": b"m"}, private_key=keys["priv"])
    with PackageReader(out) as pkg:
        assert pkg.names == ["manifest.json", "manifest.sig", "model.onnx"]
        assert json.loads(pkg.signature_bytes)["key_id"] == key_id(keys["pub"])
        assert pkg.read("model.onnx") == b"m"
        with pytest.raises(PackageError) as err:
            pkg.read("other")
        assert str(err.value) == f"{out}: member 'other' not found"
        with pytest.raises(PackageError) as err:
            list(pkg._stream("other"))
        assert str(err.value) == f"{out}: member 'other' not found"
        assert b"".join(pkg._stream("model.onnx", chunk=1)) == b"m"
    unsigned = tmp_path / "u.eopkg"
    write_package(unsigned, _manifest(), {"model.onnx": b"m"})
    with PackageReader(unsigned) as pkg:
        assert pkg.signature_bytes is None
    assert read_manifest(unsigned).name == "toy"


def test_reader_misuse_and_corrupt_member(tmp_path):
    path = tmp_path / "u.eopkg"
    write_package(path, _manifest(), {"model.onnx": b"m"})
    pkg = PackageReader(path)
    with pytest.raises(AssertionError, match="^package is not open$"):
        pkg.read("model.onnx")
    with pytest.raises(AssertionError, match="^package is not open$"):
        list(pkg._stream("model.onnx"))

    class Corrupt:
        def read(self, *size):
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    with PackageReader(path) as pkg:
        pkg._tar.extractfile = lambda member: Corrupt()
        for read in (lambda: pkg.read("model.onnx"), lambda: list(pkg._stream("model.onnx"))):
            with pytest.raises(PackageError) as err:
                read()
            assert str(err.value) == (f"{path}: cannot read 'model.onnx': truncated or corrupt (Compressed file ended "
                                      "before the end-of-stream marker was reached)")


def test_reader_close_is_idempotent(tmp_path):
    path = tmp_path / "u.eopkg"
    write_package(path, _manifest(), {"model.onnx": b"m"})
    pkg = PackageReader(path)
    pkg.open()
    pkg.close()
    assert pkg._tar is None
    pkg.close()


def test_verify_hashes_unlisted_missing_and_changed(tmp_path):
    m = _manifest()
    cases = [
        ([_manifest_member(m, {"model.onnx": b"m"}), ("model.onnx", b"m"), ("extra", b"e")],
         SecurityError, "members not listed in the manifest: ['extra']"),
        ([_manifest_member(m, {"model.onnx": b"m", "gone.bin": b"g"}), ("model.onnx", b"m")],
         PackageError, "files listed in the manifest are missing: ['gone.bin']"),
        ([_manifest_member(m, {"model.onnx": b"m"}), ("model.onnx", b"M")],
         SecurityError, "model.onnx does not match its sha256 in the manifest (file was changed after signing)"),
    ]
    # the listed size is wrong while the hash is right: still refused
    wrong_size = m.model_copy(update={"files": {"model.onnx": FileEntry(sha256=hashlib.sha256(b"m").hexdigest(),
                                                                       size=2)}})
    cases.append(([("manifest.json", wrong_size.to_json_bytes()), ("model.onnx", b"m")],
                  SecurityError, "model.onnx does not match its sha256 in the manifest (file was changed after signing)"))
    for i, (members, exc, message) in enumerate(cases):
        path = _tar(tmp_path / f"h{i}.eopkg", members)
        with PackageReader(path) as pkg, pytest.raises(exc) as err:
            pkg.verify_hashes()
        assert type(err.value) is exc and str(err.value) == f"{path}: {message}"


def test_verify_hashes_of_a_member_larger_than_one_read(tmp_path):
    big = bytes(range(256)) * (6 * 1024 + 7)  # a little over 1.5 MiB: two reads of the 1 MiB stream
    path = tmp_path / "big.eopkg"
    write_package(path, _manifest(), {"model.onnx": big})
    with PackageReader(path) as pkg:
        pkg.verify(None, allow_unsigned=True)
        assert b"".join(pkg._stream("model.onnx")) == big


def test_verify_checks_signature_hashes_and_references(tmp_path, keys):
    out = tmp_path / "s.eopkg"
    write_package(out, _manifest(), {"model.onnx": b"m"}, private_key=keys["priv"])
    with PackageReader(out) as pkg:
        assert pkg.verify([keys["pub"]]) == key_id(keys["pub"])
        # keys given: the signature is checked even when unsigned packages are allowed
        with pytest.raises(SecurityError, match="does not match any trusted key"):
            pkg.verify([keys["other_pub"]], allow_unsigned=True)
        with pytest.raises(SecurityError, match="no trusted public key given"):
            pkg.verify([])
        assert pkg.verify(None, allow_unsigned=True) is None
    # a signed manifest that names a file outside the package
    bad = tmp_path / "ref.eopkg"
    write_package(bad, _manifest(model_file="../model.onnx"), {"x.bin": b"m"}, private_key=keys["priv"])
    with PackageReader(bad) as pkg, pytest.raises(PackageError, match="manifest model_file '../model.onnx' is not one"):
        pkg.verify([keys["pub"]])


def test_extract_to(tmp_path, keys):
    out = tmp_path / "s.eopkg"
    write_package(out, _manifest(), {"model.onnx": b"m" * 3, "golden/g.npz": b"g", "x/y/z.bin": b"z"},
                  private_key=keys["priv"])
    with PackageReader(out) as pkg:
        dest = pkg.extract_to(tmp_path / "a" / "b")
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileExistsError):  # even an empty folder: the target must be new
            pkg.extract_to(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    assert dest == tmp_path / "a" / "b"
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert found == ["golden/g.npz", "manifest.json", "manifest.sig", "model.onnx", "x/y/z.bin"]
    assert (dest / "model.onnx").read_bytes() == b"mmm"
    assert stat.S_IMODE((dest / "model.onnx").stat().st_mode) == 0o644 & ~P._umask()
    unsigned = tmp_path / "u.eopkg"
    write_package(unsigned, _manifest(), {"model.onnx": b"m"})
    with PackageReader(unsigned) as pkg:
        dest = pkg.extract_to(tmp_path / "u")
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "model.onnx"]


def test_extract_never_writes_through_a_link(tmp_path, monkeypatch):
    out = tmp_path / "s.eopkg"
    write_package(out, _manifest(), {"model.onnx": b"m", "sub/x.bin": b"x"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real_mkdir = P.Path.mkdir

    def mkdir_and_plant(self, *a, **kw):  # the target folder turns out to hold a link "sub" to elsewhere
        real_mkdir(self, *a, **kw)
        if self.name == "dest" and not (self / "sub").is_symlink():
            (self / "sub").symlink_to(elsewhere)

    monkeypatch.setattr(P.Path, "mkdir", mkdir_and_plant)
    with PackageReader(out) as pkg, pytest.raises(PackageError) as err:
        pkg.extract_to(tmp_path / "dest")
    assert str(err.value) == f"{out}: member 'sub/x.bin' would land outside the target folder"
    assert list(elsewhere.iterdir()) == []


def test_parse_manifest_errors():
    with pytest.raises(PackageError, match=r"^src: manifest.json is not valid JSON \(Expecting value"):
        parse_manifest(b"nope", "src")
    with pytest.raises(PackageError, match=r"^src: manifest.json is not valid JSON \("):
        parse_manifest(b"\xff\xfe{", "src")
    with pytest.raises(PackageError) as err:
        parse_manifest(b"[1, 2]", "src")
    assert str(err.value) == "src: manifest.json must be a JSON object"
    doc = _manifest().model_dump(mode="json")
    doc["inputs"][0]["shape"] = [1.5]
    del doc["runtime"]
    with pytest.raises(PackageError) as err:
        parse_manifest(json.dumps(doc).encode())
    assert str(err.value).startswith("manifest: invalid manifest at runtime: Field required")
    doc = _manifest().model_dump(mode="json")
    del doc["inputs"][0]["dtype"]
    with pytest.raises(PackageError) as err:
        parse_manifest(json.dumps(doc).encode(), "p")
    assert str(err.value) == "p: invalid manifest at inputs.0.dtype: Field required"
    assert err.value.exit_code == ExitCode.INPUT
