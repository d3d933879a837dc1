"""Every remaining user-visible message of the web app, asserted once."""
from __future__ import annotations

import io

from sqlalchemy import select

from dashboard_web_fixtures import (api_token, app, bearer, client, db, login, make_package,  # noqa: F401
                                    page_token, seed_fleet, trusted_keys)


def test_json_body_messages(app, client):
    op, admin = bearer(api_token(app, "operator")), bearer(api_token(app, "admin"))
    cases = [
        ("post", "/api/v1/deployments", op, "not json",
         'send a JSON object: {"package_id": 1, "target": {"devices": ["edge-1"]}}'),
        ("post", "/api/v1/deployments", op, {"target": {"devices": ["a"]}},
         "package_id (integer) is required; stage_percent and failure_threshold are numbers"),
        ("post", "/api/v1/deployments", op, {"package_id": 1, "target": {"devices": "a"}},
         "target.devices must be a list of device ids"),
        ("post", "/api/v1/deployments", op, {"package_id": 1, "target": {"group": 3}},
         "target.group must be a name (string)"),
        ("post", "/api/v1/alert-rules", op, [1], "send a JSON object with the rule's fields"),
        ("post", "/api/v1/alert-rules", op, {"name": "a", "kind": "offline", "threshold_minutes": "soon"},
         "threshold_minutes must be a number, found 'soon'"),
        ("post", "/api/v1/alert-rules", op, {"name": "a", "kind": "p95_slo"},
         "a p95_slo rule needs threshold_ms (the model's p95 SLO)"),
        ("post", "/api/v1/tokens", op, {"name": " "}, "a token needs a name"),
        ("post", "/api/v1/users", admin, "x", "send a JSON object"),
        ("post", "/api/v1/users", admin, {"username": ""}, "username and password are required"),
    ]
    for method, url, headers, body, message in cases:
        kw = {"data": body, "content_type": "application/json"} if isinstance(body, str) else {"json": body}
        resp = getattr(client, method)(url, headers=headers, **kw)
        assert resp.status_code == 400, (url, body, resp.get_json())
        assert resp.get_json() == {"error": "invalid_input", "message": message}, (url, body)


def test_user_admin_messages(app, client, db):
    from edgeopt.dashboard.models import User

    admin = bearer(api_token(app, "admin"))
    me = db.scalar(select(User).where(User.username == "admin"))
    assert client.patch(f"/api/v1/users/{me.id}", json={"active": False}, headers=admin).get_json()["message"] == \
        "you cannot disable yourself"
    assert client.patch(f"/api/v1/users/{me.id}", json={"role": "viewer"}, headers=admin).get_json()["message"] == \
        "you cannot remove your own admin role"
    assert client.patch("/api/v1/users/999", json={}, headers=admin).get_json()["message"] == "no user with id 999"
    assert client.post("/api/v1/users", json={"username": "admin", "password": "long-enough"},
                       headers=admin).get_json()["message"] == "user 'admin' already exists"
    login(client, "admin")
    tok = page_token(client, "/admin/users")
    html = client.post(f"/admin/users/{me.id}", data={"active": "0", "csrf_token": tok},
                       follow_redirects=True).get_data(as_text=True)
    assert "you cannot disable yourself" in html
    html = client.post("/admin/users", data={"username": "admin", "password": "long-enough", "role": "viewer",
                                             "csrf_token": tok}, follow_redirects=True).get_data(as_text=True)
    assert "user &#39;admin&#39; already exists" in html
    html = client.post("/tokens", data={"name": "", "csrf_token": tok}, follow_redirects=True).get_data(as_text=True)
    assert "a token needs a name" in html
    assert client.delete("/api/v1/tokens/999", headers=admin).get_json()["message"] == "no token with id 999"


def test_page_form_messages(app, client, tmp_path, trusted_keys):
    seed_fleet(app, n=1, minutes=1)
    login(client, "operator")
    tok = page_token(client, "/alerts")
    html = client.post("/alerts/rules", data={"name": "x", "kind": "offline", "csrf_token": tok},
                       follow_redirects=True).get_data(as_text=True)
    assert ("rule not saved: an offline rule needs threshold_minutes (how long offline before alerting)") in html
    html = client.post("/alerts/rules", data={"name": "x", "kind": "offline", "threshold_minutes": "5",
                                              "csrf_token": tok}, follow_redirects=True).get_data(as_text=True)
    html = client.post("/alerts/rules", data={"name": "x", "kind": "offline", "threshold_minutes": "5",
                                              "csrf_token": tok}, follow_redirects=True).get_data(as_text=True)
    assert "rule not saved: a rule named &#39;x&#39; already exists" in html
    html = client.post("/alerts/rules/1", data={"threshold_minutes": "-3", "csrf_token": tok},
                       follow_redirects=True).get_data(as_text=True)
    assert "rule not saved: threshold_minutes must be above 0, found -3" in html
    html = client.post("/alerts/rules/1", data={"threshold_minutes": "7", "csrf_token": tok},
                       follow_redirects=True).get_data(as_text=True)
    assert "rule &#39;x&#39; updated" in html
    html = client.post("/alerts/rules/1", data={"delete": "1", "csrf_token": tok},
                       follow_redirects=True).get_data(as_text=True)
    assert "rule &#39;x&#39; deleted" in html
    html = client.post("/deployments", data={"csrf_token": tok, "package_id": "x", "target_kind": "devices",
                                             "devices": "edge-000"}, follow_redirects=True).get_data(as_text=True)
    assert "deployment not started: package, stage percentage and failure threshold must be numbers" in html
    html = client.post("/deployments", data={"csrf_token": tok, "package_id": "1", "target_kind": "tag", "tag": ""},
                       follow_redirects=True).get_data(as_text=True)
    assert "deployment not started: choose a tag" in html
    html = client.post("/deployments", data={"csrf_token": tok, "package_id": "1", "target_kind": "moon"},
                       follow_redirects=True).get_data(as_text=True)
    assert "deployment not started: unknown target kind &#39;moon&#39;; expected devices, group or tag" in html
    html = client.post("/deployments", data={"csrf_token": tok, "package_id": "1", "target_kind": "devices",
                                             "devices": ""}, follow_redirects=True).get_data(as_text=True)
    assert "deployment not started: no package with id 1" in html
    html = client.post("/packages", data={"csrf_token": tok}, follow_redirects=True).get_data(as_text=True)
    assert "choose a .eopkg file" in html


def test_download_of_a_deleted_package(app, client, tmp_path, trusted_keys, db):
    from edgeopt.dashboard.models import Package

    path = make_package(tmp_path / "p.eopkg", trusted_keys["key"])
    op = bearer(api_token(app, "operator"))
    body = client.post("/api/v1/packages", data={"file": (io.BytesIO(path.read_bytes()), "p.eopkg")}, headers=op,
                       content_type="multipart/form-data").get_json()
    db.delete(db.get(Package, body["id"]))
    db.commit()
    resp = app.test_client().get(body["download_url"].replace("http://dashboard.test", ""))
    assert resp.status_code == 404
    assert resp.get_json()["message"] == "the package of this link no longer exists"


def test_broken_trusted_key_setting(app, client, tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    app.config["TRUSTED_KEYS"] = [str(bad)]
    app.extensions.pop("edgeopt_trusted_keys", None)
    resp = client.post("/api/v1/packages", data={"file": (io.BytesIO(b"x"), "x.eopkg")},
                       headers=bearer(api_token(app, "operator")), content_type="multipart/form-data")
    assert resp.status_code == 500
    assert resp.get_json()["error"] == "config_error"
    assert resp.get_json()["message"].startswith(f"EDGEOPT_TRUSTED_KEYS: {bad} is not a PEM public key")
