"""Login hardening (issue 9): rate limits, no user enumeration by timing, sessions that really end.

Seen before: no limit on failed logins; 108 ms for a real user's wrong password against 6 ms for an
unknown user (no hash computed); a session cookie copied before logout or a password change still
worked afterwards (Flask's cookie session holds the user id and nothing on the server could revoke it).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from conftest import free_port, wait_port
from dashboard_web_fixtures import (PASSWORD, api_token, app, bearer, client, csrf_token, db, login,  # noqa: F401
                                    page_token, trusted_keys)


def _login_from(client, username, password=PASSWORD, ip="198.51.100.7", remember=False):
    page = client.get("/login", environ_base={"REMOTE_ADDR": ip})
    data = {"username": username, "password": password, "csrf_token": csrf_token(page.get_data(as_text=True))}
    if remember:
        data["remember"] = "y"
    return client.post("/login", data=data, environ_base={"REMOTE_ADDR": ip})


# --------------------------------------------------------------------------- rate limits


def test_five_failures_for_a_user_block_even_the_right_password(client):
    for _ in range(5):
        assert _login_from(client, "admin", "wrong-password").status_code == 401
    resp = _login_from(client, "admin", PASSWORD)
    assert resp.status_code == 429
    assert "too many failed logins; try again in" in resp.get_data(as_text=True)
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert client.get("/fleet").status_code == 302  # not logged in
    # other users are not locked out by it
    assert _login_from(client, "viewer", PASSWORD, ip="198.51.100.8").status_code == 302


def test_the_limit_lifts_when_its_window_ends(app, client):
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update

    from edgeopt.dashboard.models import RateLimitCounter

    for _ in range(5):
        _login_from(client, "admin", "wrong-password")
    assert _login_from(client, "admin", PASSWORD).status_code == 429
    # The end of the window, without waiting for it: every counter's expiry moved into the past.
    with app.extensions["edgeopt_sessionmaker"]() as s:
        s.execute(update(RateLimitCounter).values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
        s.commit()
    assert _login_from(client, "admin", PASSWORD).status_code == 302
    # and a new failure starts a new window from one
    assert _login_from(client, "admin", "wrong-password").status_code == 401
    with app.extensions["edgeopt_sessionmaker"]() as s:
        live = s.scalars(select(RateLimitCounter.hits).where(
            RateLimitCounter.expires_at > datetime.now(timezone.utc))).all()
    assert live and set(live) == {1}


def test_username_case_does_not_dodge_the_per_user_limit(client):
    for name in ("admin", "Admin", "ADMIN", "aDmin", "admiN"):
        assert _login_from(client, name, "wrong-password").status_code == 401
    assert _login_from(client, "admin", PASSWORD).status_code == 429


def test_one_address_guessing_many_usernames_is_blocked(client):
    for i in range(20):
        assert _login_from(client, f"user{i}", "wrong-password", ip="203.0.113.9").status_code == 401
    assert _login_from(client, "viewer", PASSWORD, ip="203.0.113.9").status_code == 429
    # another address is not affected
    assert _login_from(client, "viewer", PASSWORD, ip="203.0.113.10").status_code == 302


def test_successful_logins_do_not_use_up_the_limit(client):
    for _ in range(8):
        assert _login_from(client, "operator").status_code == 302
        client.post("/logout", data={"csrf_token": page_token(client)})


def _serve(db_url: str, instance: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, EDGEOPT_DATABASE_URL=db_url, EDGEOPT_INSTANCE_DIR=str(instance),
               EDGEOPT_SECRET_KEY="shared-test-secret")
    proc = subprocess.Popen([sys.executable, "-c", "from edgeopt.dashboard.cli import main; main()", "serve",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, timeout=60)
    except TimeoutError:
        proc.kill()
        raise AssertionError(proc.communicate()[1].decode()[-2000:]) from None
    return proc, f"http://127.0.0.1:{port}"


def _http_login(base: str, username: str, password: str) -> int:
    import re

    import requests

    s = requests.Session()
    page = s.get(base + "/login", timeout=30).text
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    return s.post(base + "/login", data={"username": username, "password": password, "csrf_token": token},
                  allow_redirects=False, timeout=30).status_code


def test_two_worker_processes_share_the_count(app, db_url, tmp_path):
    """Two real `edgeopt-dashboard serve` processes on one database: failures on either count for both."""
    workers = [_serve(db_url, tmp_path / "instance") for _ in range(2)]
    try:
        (_, a), (_, b) = workers
        for base in (a, b, a, b, a):
            assert _http_login(base, "operator", "wrong-password") == 401
        assert _http_login(b, "operator", PASSWORD) == 429
        assert _http_login(a, "operator", PASSWORD) == 429
        assert _http_login(a, "viewer", PASSWORD) == 302
    finally:
        for proc, _ in workers:
            proc.terminate()
            proc.wait(10)


# --------------------------------------------------------------------------- unknown users


@pytest.fixture
def scrypt_calls(monkeypatch):
    """Every hashlib.scrypt call (werkzeug's password hash) as its (n, r, p) cost parameters."""
    calls = []
    real = hashlib.scrypt

    def spy(password, *, salt, n, r, p, maxmem=0, dklen=64):
        calls.append((n, r, p))
        return real(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)

    monkeypatch.setattr(hashlib, "scrypt", spy)
    return calls


@pytest.mark.parametrize("username", ["nobody", "disabled"])
def test_unknown_or_disabled_user_costs_one_full_password_hash(client, db, scrypt_calls, username):
    """No timing assertion: the work done is compared instead (the same hash, with the same cost)."""
    from edgeopt.dashboard.models import User
    from edgeopt.dashboard.security import hash_password

    db.add(User(username="disabled", role="viewer", password_hash=hash_password(PASSWORD), active=False))
    db.commit()
    scrypt_calls.clear()
    _login_from(client, "admin", "wrong-password")  # a real user, wrong password
    real_user = list(scrypt_calls)
    scrypt_calls.clear()
    resp = _login_from(client, username, "wrong-password", ip="198.51.100.99")
    assert resp.status_code == 401
    assert len(real_user) == 1 and scrypt_calls == real_user


# --------------------------------------------------------------------------- sessions end for good


def _cookies(client) -> dict[str, str]:
    return {name: client.get_cookie(name).value for name in ("session", "remember_token")
            if client.get_cookie(name) is not None}


def _replay(app, cookies: dict[str, str]):
    other = app.test_client()
    for name, value in cookies.items():
        other.set_cookie(name, value)
    return other


def test_a_cookie_copied_before_logout_is_dead_after_it(app, client):
    assert _login_from(client, "viewer").status_code == 302
    stolen = _cookies(client)
    assert _replay(app, stolen).get("/api/v1/me").status_code == 200
    client.post("/logout", data={"csrf_token": page_token(client)})
    thief = _replay(app, stolen)
    assert thief.get("/api/v1/me").status_code == 401
    assert thief.get("/fleet").status_code == 302


def test_remember_me_cookie_alone_is_dead_after_logout(app, client):
    assert _login_from(client, "viewer", remember=True).status_code == 302
    remember = {"remember_token": _cookies(client)["remember_token"]}
    assert _replay(app, remember).get("/api/v1/me").status_code == 200
    client.post("/logout", data={"csrf_token": page_token(client)})
    assert _replay(app, remember).get("/api/v1/me").status_code == 401


def test_logout_ends_only_that_session(app, client):
    other = app.test_client()
    assert _login_from(client, "viewer").status_code == 302
    assert _login_from(other, "viewer", ip="198.51.100.20").status_code == 302
    client.post("/logout", data={"csrf_token": page_token(client)})
    assert other.get("/api/v1/me").status_code == 200


def test_password_change_ends_every_session_of_the_user(app, client):
    laptop, phone = app.test_client(), app.test_client()
    assert _login_from(laptop, "operator").status_code == 302
    assert _login_from(phone, "operator", ip="198.51.100.21", remember=True).status_code == 302
    stolen = _cookies(phone)
    from edgeopt.dashboard.models import User

    with app.extensions["edgeopt_sessionmaker"]() as s:
        uid = s.scalar(select(User.id).where(User.username == "operator"))
    resp = client.patch(f"/api/v1/users/{uid}", json={"password": "a-brand-new-password"},
                        headers=bearer(api_token(app, "admin")))
    assert resp.status_code == 200
    assert laptop.get("/api/v1/me").status_code == 401
    assert phone.get("/api/v1/me").status_code == 401
    assert _replay(app, stolen).get("/api/v1/me").status_code == 401
    assert _replay(app, {"remember_token": stolen["remember_token"]}).get("/api/v1/me").status_code == 401
    assert _login_from(laptop, "operator", "a-brand-new-password").status_code == 302


def test_cli_password_change_ends_sessions(app, client, db_url):
    assert _login_from(client, "viewer").status_code == 302
    out = subprocess.run([sys.executable, "-c", "from edgeopt.dashboard.cli import main; main()", "create-user",
                          "viewer", "--update", "--password", "another-password", "--database-url", db_url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert client.get("/api/v1/me").status_code == 401


def test_disabling_a_user_ends_their_sessions(app, client):
    assert _login_from(client, "viewer").status_code == 302
    admin = app.test_client()
    assert _login_from(admin, "admin", ip="198.51.100.30").status_code == 302
    from edgeopt.dashboard.models import User

    with app.extensions["edgeopt_sessionmaker"]() as s:
        uid = s.scalar(select(User.id).where(User.username == "viewer"))
        from edgeopt.dashboard.models import LoginSession

        assert s.scalar(select(LoginSession.id).where(LoginSession.user_id == uid)) is not None
    admin.post(f"/admin/users/{uid}", data={"active": "0", "csrf_token": page_token(admin, "/admin/users")})
    assert client.get("/api/v1/me").status_code == 401
    with app.extensions["edgeopt_sessionmaker"]() as s:
        assert s.scalar(select(LoginSession.id).where(LoginSession.user_id == uid)) is None
