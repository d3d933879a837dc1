"""Package upload (good, unsigned, wrong key, tampered, not a package), manifest page, downloads."""
from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from sqlalchemy import select

from dashboard_web_fixtures import (api_token, app, bearer, client, db, login, make_package,  # noqa: F401
                                    page_token, trusted_keys)


@pytest.fixture
def good_pkg(tmp_path, trusted_keys):
    return make_package(tmp_path / "digits-1.0.0.eopkg", trusted_keys["key"])


def _upload(client, path, token=None, name=None):
    data = {"file": (io.BytesIO(path.read_bytes()), name or path.name)}
    headers = bearer(token) if token else {}
    return client.post("/api/v1/packages", data=data, headers=headers, content_type="multipart/form-data")


def _stored(app):
    from pathlib import Path

    root = Path(app.config["PACKAGE_DIR"])
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_upload_good_package_via_page(app, client, good_pkg, db):
    from edgeopt.dashboard.models import Package

    login(client, "operator")
    tok = page_token(client, "/packages")
    resp = client.post("/packages", data={"file": (io.BytesIO(good_pkg.read_bytes()), good_pkg.name),
                                          "csrf_token": tok}, content_type="multipart/form-data",
                       follow_redirects=True)
    html = resp.get_data(as_text=True)
    assert "digits 1.0.0 (cpu) uploaded: signature and hashes verified" in html
    assert "Validation report" not in html  # this package carries none; the checks say so
    assert "no validation report in the manifest" in html
    pkg = db.scalar(select(Package))
    assert pkg.sha256 == hashlib.sha256(good_pkg.read_bytes()).hexdigest()
    assert pkg.runtime == "onnxruntime" and pkg.profile == "cpu" and pkg.manifest["name"] == "digits"
    assert _stored(app) == [f"{pkg.sha256}.eopkg"]


def test_upload_via_api_and_download(app, client, good_pkg):
    tok = api_token(app, "operator")
    resp = _upload(client, good_pkg, tok)
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert body["signer_key_id"] and body["manifest"]["model_file"] == "model.onnx"
    url = body["download_url"]
    assert url.startswith("http://dashboard.test/dl/")
    # The agent downloads without any session or token header.
    anon = app.test_client()
    data = anon.get(url.replace("http://dashboard.test", "")).data
    assert data == good_pkg.read_bytes()
    assert anon.get("/dl/not-a-valid-token").status_code == 403
    assert anon.get("/dl/not-a-valid-token").get_json()["message"] == "download link is not valid"
    # Logged-in download
    assert client.get(f"/api/v1/packages/{body['id']}/file", headers=bearer(tok)).data == good_pkg.read_bytes()
    detail = client.get(f"/api/v1/packages/{body['id']}", headers=bearer(tok)).get_json()
    assert {c["name"] for c in detail["checks"]} >= {"signature", "file hashes", "accuracy validation"}


def test_expired_download_link(app, good_pkg):
    from edgeopt.dashboard import package_store
    from edgeopt.sdk.errors import SecurityError

    with pytest.raises(SecurityError, match="download link is not valid"):
        package_store.resolve_download_token("k", "garbage", 60)
    import time

    from itsdangerous import TimestampSigner, URLSafeTimedSerializer

    class HourAgo(TimestampSigner):  # signs as if an hour ago, instead of sleeping past the max age
        def get_timestamp(self) -> int:
            return int(time.time()) - 3600

    tok = URLSafeTimedSerializer("k", salt=package_store.DOWNLOAD_SALT, signer=HourAgo).dumps({"id": 1, "sha256": "a"})
    assert package_store.resolve_download_token("k", tok, 7200) == (1, "a")  # within its max age: valid
    with pytest.raises(SecurityError, match="download link expired"):
        package_store.resolve_download_token("k", tok, 60)


def test_unsigned_package_is_refused(app, client, tmp_path):
    tok = api_token(app, "operator")
    path = make_package(tmp_path / "unsigned.eopkg", None)
    resp = _upload(client, path, tok)
    assert resp.status_code == 422
    assert resp.get_json() == {"error": "package_rejected", "message":
                               "package is not signed (no manifest.sig) (sign it with: edgeopt package ... --sign-key KEY)"}
    assert _stored(app) == []


def test_package_signed_by_another_key_is_refused(app, client, tmp_path, trusted_keys):
    tok = api_token(app, "operator")
    path = make_package(tmp_path / "other.eopkg", trusted_keys["other"])
    resp = _upload(client, path, tok)
    assert resp.status_code == 422
    assert "signature does not match any trusted key" in resp.get_json()["message"]
    assert _stored(app) == []


def _tamper(src, dst, member="model.onnx"):
    """Copy the archive with one byte of ``member`` changed (manifest and signature untouched)."""
    with tarfile.open(src, "r:*") as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == member:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def test_tampered_package_is_refused(app, client, good_pkg, tmp_path):
    tok = api_token(app, "operator")
    resp = _upload(client, _tamper(good_pkg, tmp_path / "tampered.eopkg"), tok)
    assert resp.status_code == 422
    assert resp.get_json()["message"] == ("tampered.eopkg: model.onnx does not match its sha256 in the manifest "
                                          "(file was changed after signing)")
    assert _stored(app) == []


def test_not_a_package_is_refused_on_the_page(app, client, tmp_path):
    login(client, "operator")
    tok = page_token(client, "/packages")
    resp = client.post("/packages", data={"file": (io.BytesIO(b"hello, not a tar"), "junk.eopkg"), "csrf_token": tok},
                       content_type="multipart/form-data", follow_redirects=True)
    html = resp.get_data(as_text=True)
    assert "upload refused: junk.eopkg: not a valid .eopkg archive" in html
    assert _stored(app) == []


def test_empty_upload_and_missing_file(app, client, tmp_path):
    tok = api_token(app, "operator")
    empty = tmp_path / "empty.eopkg"
    empty.write_bytes(b"")
    resp = _upload(client, empty, tok)
    assert resp.status_code == 422 and resp.get_json()["message"] == "empty.eopkg: the uploaded file is empty"
    resp = client.post("/api/v1/packages", headers=bearer(tok), data={}, content_type="multipart/form-data")
    assert resp.status_code == 400
    assert resp.get_json()["message"] == "no file: send the package as multipart form field 'file'"


def test_duplicate_and_conflicting_versions(app, client, good_pkg, tmp_path, trusted_keys):
    tok = api_token(app, "operator")
    assert _upload(client, good_pkg, tok).status_code == 201
    resp = _upload(client, good_pkg, tok)
    assert resp.status_code == 400
    assert resp.get_json()["message"] == "digits-1.0.0.eopkg: this exact file is already uploaded as digits 1.0.0 (cpu)"
    other = make_package(tmp_path / "again.eopkg", trusted_keys["key"])  # same name/version, new created_at
    resp = _upload(client, other, tok)
    assert resp.status_code == 400
    assert "digits 1.0.0 for profile cpu already exists with different content" in resp.get_json()["message"]
    assert len(_stored(app)) == 1


def test_viewer_cannot_upload(app, client, good_pkg):
    resp = _upload(client, good_pkg, api_token(app, "viewer"))
    assert resp.status_code == 403


def test_no_trusted_keys_configured(app, client, good_pkg):
    app.config["TRUSTED_KEYS"] = []
    app.extensions.pop("edgeopt_trusted_keys", None)
    resp = _upload(client, good_pkg, api_token(app, "operator"))
    assert resp.status_code == 422
    assert resp.get_json()["message"].startswith("no trusted signing keys are configured")


def test_package_page_shows_manifest_and_reports(app, client, tmp_path, trusted_keys, db):
    from edgeopt.sdk.package import BenchmarkReport, LatencyStats, MetricResult, OutputFigures, ValidationReport, \
        read_manifest

    path = make_package(tmp_path / "rep.eopkg", trusted_keys["key"], version="2.0.0")
    # Same package with reports: rebuild with validation and benchmark filled in.
    m = read_manifest(path)
    stats = dict(p50_ms=1.2, p90_ms=1.5, p99_ms=2.0, mean_ms=1.3, throughput_ips=800.0, iterations=100)
    m = m.model_copy(update={"version": "2.0.1",
                             "validation": ValidationReport(
                                 samples=64, max_abs_error=0.01, min_cosine=0.998, mean_cosine=0.999,
                                 top1_agreement=0.984, passed=True, task="detect",
                                 task_reason="model metadata says task='detect' (Ultralytics export)",
                                 metric=MetricResult(name="mAP@0.5 vs fp32", fp32=1.0, optimized=0.9691, drop=0.0309,
                                                     bound=0.95, rule="min", passed=True),
                                 checks=[MetricResult(name="mAP@0.5 vs fp32", fp32=1.0, optimized=0.9691, drop=0.0309,
                                                      bound=0.95, rule="min", passed=True)],
                                 outputs=[OutputFigures(name="output0", min_cosine=0.9948, mean_cosine=0.999,
                                                        min_snr_db=21.5, max_abs_error=3.2)]),
                             "benchmark": BenchmarkReport(batch_size=1, fp32=LatencyStats(**stats),
                                                          optimized=LatencyStats(**dict(stats, p50_ms=0.6)),
                                                          speedup=2.0, host_proxy=True, target_device="CPU")})
    from edgeopt.sdk.package import write_package
    from dashboard_web_fixtures import ROOT

    out = tmp_path / "rep2.eopkg"
    write_package(out, m, {"model.onnx": ROOT / "tests/assets/digits/digits_cnn.onnx"}, private_key=trusted_keys["key"])
    tok = api_token(app, "operator")
    pid = _upload(client, out, tok).get_json()["id"]
    login(client, "viewer")
    html = client.get(f"/packages/{pid}").get_data(as_text=True)
    assert "Validation report" in html and "98.40 %" in html
    assert "detect" in html and "mAP@0.5 vs fp32" in html and "0.9691 (budget ≥ 0.95)" in html
    assert "output0" in html and "SNR 21.5 dB" in html
    assert "Benchmark report" in html and "2.00×" in html and "host proxy" in html
    assert "/dl/" in html and '"model_file": "model.onnx"' in html
