"""The application factory, what is public and what is not, cookies, headers, static assets, pages."""
from __future__ import annotations

import os
import re
import stat
from urllib.parse import parse_qs, urlsplit

from dashboard_web_fixtures import (app, client, db, login, runner, seed_fleet, trusted_keys)  # noqa: F401

PUBLIC = {"auth.login", "static", "healthz", "packages_download.download"}


def _fill(rule) -> str:
    url = rule.rule
    for arg in rule.arguments:
        url = re.sub(rf"<(?:[a-z]+:)?{arg}>", "1" if "int:" in url.split(arg)[0][-5:] else "x", url)
    return url


def test_healthz_is_public_and_checks_the_database(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "database": "ok", "ingest": {
        "status": "absent", "processes": 0, "healthy": 0, "stale": 0}}
    assert client.get("/healthz?ingest=required").status_code == 503  # no ingest process has reported


def test_nothing_but_login_static_health_and_downloads_without_auth(app, client):
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC:
            continue
        url = _fill(rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            resp = client.open(url, method=method)
            checked += 1
            if url.startswith("/api/"):
                # The API is exempt from the app-wide CSRF check (token callers), so the login check answers.
                assert resp.status_code == 401, (method, url, resp.status_code)
                body = resp.get_json()
                assert set(body) == {"error", "message"}, (url, body)
                assert body["error"] == "unauthorized", (url, body)
            elif method == "GET":
                assert resp.status_code == 302, (method, url, resp.status_code)
                loc = urlsplit(resp.headers["Location"])
                assert loc.path == "/login" and not loc.netloc, (url, resp.headers["Location"])
                assert parse_qs(loc.query)["next"] == [url], (url, resp.headers["Location"])
            else:
                # A form post without a session has no CSRF token: refused before anything else, on the
                # error page (never a redirect, which would hide whether it was refused).
                assert resp.status_code == 400, (method, url, resp.status_code)
                assert "Form refused" in resp.get_data(as_text=True), (method, url)
    assert checked > 40


def test_api_401_message_names_the_fix(client):
    body = client.get("/api/v1/fleet").get_json()
    assert body["error"] == "unauthorized"
    assert "Authorization: Bearer <token>" in body["message"]


def test_openapi_needs_login_too(client):
    assert client.get("/api/v1/openapi.json").status_code == 401
    login(client, "viewer")
    assert client.get("/api/v1/openapi.json").get_json()["openapi"].startswith("3.")


def test_secret_key_is_generated_once_and_kept(tmp_path, monkeypatch):
    from edgeopt.dashboard import create_app

    monkeypatch.delenv("EDGEOPT_SECRET_KEY", raising=False)
    cfg = {"INSTANCE_PATH": str(tmp_path / "inst"), "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    a, b = create_app(cfg), create_app(cfg)
    assert a.config["SECRET_KEY"] == b.config["SECRET_KEY"] and len(a.config["SECRET_KEY"]) == 64
    key_file = tmp_path / "inst" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    monkeypatch.setenv("EDGEOPT_SECRET_KEY", "from-env")
    assert create_app(cfg).config["SECRET_KEY"] == "from-env"
    for x in (a, b):
        x.extensions["edgeopt_engine"].dispose()


def test_config_from_environment(tmp_path, monkeypatch):
    from edgeopt.dashboard import create_app

    monkeypatch.setenv("EDGEOPT_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("EDGEOPT_BROKER_URL", "mqtt://broker.example:1884")
    monkeypatch.setenv("EDGEOPT_TRUSTED_KEYS", f"/k/a.pub{os.pathsep}/k/b.pub")
    monkeypatch.setenv("EDGEOPT_PACKAGE_DIR", str(tmp_path / "pkgs"))
    monkeypatch.setenv("EDGEOPT_SECURE_COOKIES", "1")
    a = create_app({"INSTANCE_PATH": str(tmp_path / "inst")})
    assert a.config["DATABASE_URL"].endswith("env.db")
    assert a.config["BROKER_URL"] == "mqtt://broker.example:1884"
    assert a.config["TRUSTED_KEYS"] == ["/k/a.pub", "/k/b.pub"]
    assert a.config["PACKAGE_DIR"] == str(tmp_path / "pkgs")
    assert a.config["SESSION_COOKIE_SECURE"] is True
    a.extensions["edgeopt_engine"].dispose()


def test_session_cookie_is_httponly_and_samesite(client):
    resp = login(client, "viewer")
    assert resp.status_code == 302
    cookie = next(v for k, v in resp.headers.items() if k == "Set-Cookie" and v.startswith("session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # off unless EDGEOPT_SECURE_COOKIES=1 (plain HTTP in a lab)


def test_security_headers(client):
    resp = client.get("/login")
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]


def test_scripts_are_served_by_the_app_not_a_cdn(app, client):
    login(client, "viewer")
    html = client.get("/fleet").get_data(as_text=True)
    srcs = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', html)
    assert srcs and all(s.startswith("/static/") for s in srcs), srcs
    for s in srcs:
        assert client.get(s).status_code == 200
    client.post("/logout", data={"csrf_token": re.search(r'content="([^"]+)"', html).group(1)})
    assert client.get("/static/charts.js").status_code == 200  # public, no login needed


def test_pages_render_for_a_viewer(app, client):
    seed_fleet(app, n=3, minutes=10)
    login(client, "viewer")
    for path, expect in [("/fleet", "Fleet latency"), ("/devices", "edge-002"), ("/devices/edge-001", "Event log"),
                         ("/packages", "No packages yet"), ("/deployments", "No deployments yet"),
                         ("/alerts", "No rules yet"), ("/tokens", "API tokens")]:
        resp = client.get(path)
        assert resp.status_code == 200, path
        assert expect in resp.get_data(as_text=True), path
    assert client.get("/").headers["Location"].endswith("/fleet")
    resp = client.get("/devices/nope")
    assert resp.status_code == 404 and "no device &#39;nope&#39;" in resp.get_data(as_text=True)


def test_fleet_page_shows_counts(app, client):
    seed_fleet(app, n=4, minutes=5)
    login(client, "viewer")
    html = client.get("/fleet").get_data(as_text=True)
    assert re.search(r'id="count-devices">4<', html)
    assert re.search(r'id="count-online">4<', html)


def test_evaluate_alerts_command(app, runner, db):
    from datetime import datetime, timedelta, timezone

    from edgeopt.dashboard.models import AlertRule, Device

    past = datetime.now(timezone.utc) - timedelta(hours=1)
    db.add_all([AlertRule(name="offline 10 min", kind="offline", threshold_minutes=10),
                Device(device_id="gone-1", status="offline", status_changed_at=past, last_seen=past)])
    db.commit()
    result = runner.invoke(args=["evaluate-alerts"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "alerts: 1 opened, 0 resolved"
    assert runner.invoke(args=["evaluate-alerts"]).output.strip() == "alerts: 0 opened, 0 resolved"
