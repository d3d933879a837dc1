"""The dashboard refuses a correctly signed package whose manifest names a file outside it (issue 9)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

from dashboard_web_fixtures import (api_token, app, bearer, client, db, login, page_token,  # noqa: F401
                                    trusted_keys)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk"))
from test_verify_references import crafted_package  # noqa: E402


def _stored(app) -> list[str]:
    root = Path(app.config["PACKAGE_DIR"])
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_api_upload_refuses_model_file_outside_the_package(app, client, trusted_keys, tmp_path):
    pkg = crafted_package(tmp_path / "evil.eopkg", trusted_keys["key"], model_file="../../../../etc/passwd")
    resp = client.post("/api/v1/packages", data={"file": (io.BytesIO(pkg.read_bytes()), "evil.eopkg")},
                       headers=bearer(api_token(app, "operator")), content_type="multipart/form-data")
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert resp.get_json() == {"error": "invalid_package", "message": (
        "evil.eopkg: manifest model_file '../../../../etc/passwd' is not one of the package's files "
        "(golden.npz, model.onnx); refused (a manifest may only name files inside its own package)")}
    assert _stored(app) == []


def test_page_upload_refuses_golden_file_outside_the_package(app, client, trusted_keys, tmp_path):
    pkg = crafted_package(tmp_path / "evil.eopkg", trusted_keys["key"], golden_file="../golden.npz")
    login(client, "operator")
    resp = client.post("/packages", data={"file": (io.BytesIO(pkg.read_bytes()), "evil.eopkg"),
                                          "csrf_token": page_token(client, "/packages")},
                       content_type="multipart/form-data", follow_redirects=True)
    html = resp.get_data(as_text=True)
    assert ("upload refused: evil.eopkg: manifest golden.file &#39;../golden.npz&#39; is not one of the "
            "package&#39;s files") in html
    assert _stored(app) == []
