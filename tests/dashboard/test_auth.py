"""Login, roles, API tokens and CSRF."""
from __future__ import annotations

import re

from sqlalchemy import select

from dashboard_web_fixtures import (PASSWORD, api_token, app, bearer, client, csrf_token, db, login,  # noqa: F401
                                    page_token, trusted_keys)


def test_login_with_wrong_password_is_refused(client):
    resp = login(client, "viewer", "wrong-password")
    assert resp.status_code == 401
    assert "wrong username or password" in resp.get_data(as_text=True)
    assert client.get("/fleet").status_code == 302


def test_unknown_user_gets_the_same_message(client):
    resp = login(client, "nobody", PASSWORD)
    assert resp.status_code == 401 and "wrong username or password" in resp.get_data(as_text=True)


def test_login_then_pages_then_logout(client):
    resp = login(client, "viewer")
    assert resp.status_code == 302 and resp.headers["Location"] == "/fleet"
    assert client.get("/fleet").status_code == 200
    token = page_token(client)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/fleet").status_code == 302


def test_login_redirects_only_to_local_pages(client):
    page = client.get("/login?next=/devices")
    tok = csrf_token(page.get_data(as_text=True))
    resp = client.post("/login?next=/devices", data={"username": "viewer", "password": PASSWORD, "csrf_token": tok})
    assert resp.headers["Location"] == "/devices"
    client.post("/logout", data={"csrf_token": page_token(client)})
    tok = csrf_token(client.get("/login").get_data(as_text=True))
    resp = client.post("/login?next=//evil.example/x", data={"username": "viewer", "password": PASSWORD,
                                                              "csrf_token": tok})
    assert resp.headers["Location"] == "/fleet"


def test_disabled_user_cannot_log_in(app, client, db):
    from edgeopt.dashboard.models import User

    user = db.scalar(select(User).where(User.username == "viewer"))
    user.active = False
    db.commit()
    assert login(client, "viewer").status_code == 401


def test_password_is_stored_hashed(db):
    from edgeopt.dashboard.models import User

    user = db.scalar(select(User).where(User.username == "admin"))
    assert PASSWORD not in user.password_hash and user.password_hash.startswith(("scrypt:", "pbkdf2:"))


def test_form_without_csrf_token_is_refused(client, db):
    from edgeopt.dashboard.models import AlertRule

    login(client, "operator")
    resp = client.post("/alerts/rules", data={"name": "r1", "kind": "offline", "threshold_minutes": "5"})
    assert resp.status_code == 400
    assert "The CSRF token is missing" in resp.get_data(as_text=True)
    assert db.scalar(select(AlertRule)) is None
    resp = client.post("/alerts/rules", data={"name": "r1", "kind": "offline", "threshold_minutes": "5",
                                              "csrf_token": "forged"})
    assert resp.status_code == 400 and "The CSRF token is invalid" in resp.get_data(as_text=True)
    resp = client.post("/alerts/rules", data={"name": "r1", "kind": "offline", "threshold_minutes": "5",
                                              "csrf_token": page_token(client, "/alerts")})
    assert resp.status_code == 302
    assert db.scalar(select(AlertRule)).name == "r1"


def test_logout_needs_csrf(client):
    login(client, "viewer")
    assert client.post("/logout").status_code == 400
    assert client.get("/fleet").status_code == 200


def test_roles_on_pages(client):
    login(client, "viewer")
    assert client.get("/admin/users").status_code == 403
    assert client.get("/deployments/new").status_code == 403
    tok = page_token(client)
    resp = client.post("/alerts/rules", data={"name": "x", "kind": "offline", "threshold_minutes": "5",
                                              "csrf_token": tok})
    assert resp.status_code == 403
    assert "this needs the operator role; you are viewer" in resp.get_data(as_text=True)
    client.post("/logout", data={"csrf_token": tok})
    login(client, "operator")
    assert client.get("/deployments/new").status_code == 200
    assert client.get("/admin/users").status_code == 403
    client.post("/logout", data={"csrf_token": page_token(client)})
    login(client, "admin")
    assert client.get("/admin/users").status_code == 200


def test_admin_creates_and_disables_users(client, db):
    from edgeopt.dashboard.models import User

    login(client, "admin")
    tok = page_token(client, "/admin/users")
    resp = client.post("/admin/users", data={"username": "carol", "password": "short", "role": "operator",
                                             "csrf_token": tok}, follow_redirects=True)
    assert "password: at least 8 characters" in resp.get_data(as_text=True)
    resp = client.post("/admin/users", data={"username": "carol", "password": "long-enough-pw", "role": "operator",
                                             "csrf_token": tok}, follow_redirects=True)
    assert "user carol created with role operator" in resp.get_data(as_text=True)
    carol = db.scalar(select(User).where(User.username == "carol"))
    assert carol.role == "operator"
    resp = client.post(f"/admin/users/{carol.id}", data={"active": "0", "csrf_token": tok}, follow_redirects=True)
    assert "user carol updated" in resp.get_data(as_text=True)
    me = db.scalar(select(User).where(User.username == "admin"))
    resp = client.post(f"/admin/users/{me.id}", data={"role": "viewer", "csrf_token": tok}, follow_redirects=True)
    assert "you cannot remove your own admin role" in resp.get_data(as_text=True)
    db.expire_all()
    assert db.get(User, carol.id).active is False


def test_token_page_shows_a_new_token_once_and_stores_its_hash(client, db):
    from edgeopt.dashboard.models import ApiToken
    from edgeopt.dashboard.security import hash_token

    login(client, "operator")
    html = client.post("/tokens", data={"name": "ci", "csrf_token": page_token(client, "/tokens")}).get_data(as_text=True)
    plain = re.search(r'<code id="new-token">([^<]+)</code>', html).group(1)
    row = db.scalar(select(ApiToken))
    assert row.token_hash == hash_token(plain) and plain not in row.token_hash
    assert plain not in client.get("/tokens").get_data(as_text=True)
    client.post("/logout", data={"csrf_token": page_token(client)})
    assert client.get("/api/v1/me", headers=bearer(plain)).get_json()["username"] == "operator"


def test_api_token_auth(app, client):
    tok = api_token(app, "viewer")
    me = client.get("/api/v1/me", headers=bearer(tok)).get_json()
    assert me == {"id": me["id"], "username": "viewer", "role": "viewer", "via_token": True}
    resp = client.get("/api/v1/me", headers=bearer("eot_not-a-token"))
    assert resp.status_code == 401
    assert resp.get_json() == {"error": "unauthorized",
                               "message": "authentication required: the API token is not valid"}


def test_revoked_token_is_refused(app, client):
    tok = api_token(app, "operator")
    tokens = client.get("/api/v1/tokens", headers=bearer(tok)).get_json()["tokens"]
    assert client.delete(f"/api/v1/tokens/{tokens[0]['id']}", headers=bearer(tok)).get_json()["revoked"] is True
    resp = client.get("/api/v1/me", headers=bearer(tok))
    assert resp.status_code == 401
    assert "the API token was revoked or its user is disabled" in resp.get_json()["message"]


def test_roles_on_the_api(app, client):
    viewer, operator, admin = (api_token(app, u) for u in ("viewer", "operator", "admin"))
    rule = {"name": "slow", "kind": "p95_slo", "threshold_ms": 50}
    resp = client.post("/api/v1/alert-rules", json=rule, headers=bearer(viewer))
    assert resp.status_code == 403
    assert resp.get_json() == {"error": "forbidden", "message": "this needs the operator role; you are viewer"}
    assert client.post("/api/v1/alert-rules", json=rule, headers=bearer(operator)).status_code == 201
    assert client.get("/api/v1/users", headers=bearer(operator)).status_code == 403
    resp = client.post("/api/v1/users", json={"username": "dave", "password": "long-enough-pw", "role": "viewer"},
                       headers=bearer(admin))
    assert resp.status_code == 201 and resp.get_json()["role"] == "viewer"


def test_token_requests_skip_csrf_but_session_requests_need_it(app, client):
    tok = api_token(app, "operator")
    rule = {"name": "r", "kind": "offline", "threshold_minutes": 5}
    assert client.post("/api/v1/alert-rules", json=rule, headers=bearer(tok)).status_code == 201
    login(client, "operator")
    resp = client.post("/api/v1/alert-rules", json=dict(rule, name="r2"))
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "csrf"
    assert "The CSRF token is missing" in resp.get_json()["message"]
    resp = client.post("/api/v1/alert-rules", json=dict(rule, name="r2"), headers={"X-CSRFToken": page_token(client)})
    assert resp.status_code == 201
