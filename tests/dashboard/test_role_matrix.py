"""Every route × every method × every kind of caller, against one table of who may run what.

``MATRIX`` is the table: for each (method, rule) of the Flask ``url_map``, the lowest role whose requests
reach the handler ("public": anyone, even without logging in). A route or method without a row, or a row
without a route, fails :func:`test_every_route_has_a_row`; so a new endpoint cannot ship without someone
deciding who may call it.

Callers: anonymous, a browser session of each role, an API token of each role. Each one gets a CSRF token
first (from the login page, like a browser), so a refusal seen here comes from the login or role check,
never from CSRF (which has its own tests in test_auth.py).

"The handler ran" is observed directly, not guessed from the status: a profile hook records whether the
code of the endpoint's innermost function (under ``requires_role``'s wrapper) was entered. So:

- allowed: the handler ran, and the answer is not 401/403 nor a redirect to the login page (it may be 400
  or 404: the URLs name ids that do not exist, so nothing is changed);
- denied: the handler did not run, and the answer is a 401/403 (JSON ``{"error", "message"}`` under
  ``/api/``; the error page for pages) or, for an anonymous page request, a redirect whose target is
  the login page (with ``next`` set to the page for a GET).

HEAD follows the GET row (Flask runs the GET handler for it). OPTIONS never runs a handler: it needs a
login like everything else that is not public, and logged-in callers get the ``Allow`` header.
"""
from __future__ import annotations

import inspect
import re
import sys
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from dashboard_web_fixtures import api_token, app, bearer, csrf_token, login, trusted_keys  # noqa: F401

ROLE_ORDER = ("public", "viewer", "operator", "admin")

# (method, rule) -> the lowest role that may run the handler.
MATRIX: dict[tuple[str, str], str] = {
    # pages: public
    ("GET", "/login"): "public",
    ("POST", "/login"): "public",
    ("GET", "/healthz"): "public",
    ("GET", "/static/<path:filename>"): "public",
    ("GET", "/dl/<token>"): "public",  # the signed token in the URL is the authorization
    # pages: anyone logged in
    ("GET", "/"): "viewer",
    ("GET", "/fleet"): "viewer",
    ("GET", "/devices"): "viewer",
    ("GET", "/devices/<device_id>"): "viewer",
    ("GET", "/devices/<device_id>/profile"): "viewer",
    ("GET", "/devices/<device_id>/profile/<int:event_id>/trace.json"): "viewer",
    ("GET", "/packages"): "viewer",
    ("GET", "/packages/<int:package_id>"): "viewer",
    ("GET", "/packages/<int:package_id>/file"): "viewer",
    ("GET", "/deployments"): "viewer",
    ("GET", "/deployments/<deployment_id>"): "viewer",
    ("GET", "/alerts"): "viewer",
    ("GET", "/tokens"): "viewer",
    ("POST", "/tokens"): "viewer",  # one's own tokens
    ("POST", "/tokens/<int:token_id>/revoke"): "viewer",  # one's own (admins: any) token
    ("POST", "/logout"): "viewer",
    # pages: operators
    ("POST", "/packages"): "operator",
    ("POST", "/devices/<device_id>/profile"): "operator",
    ("GET", "/deployments/new"): "operator",
    ("POST", "/deployments"): "operator",
    ("POST", "/deployments/<deployment_id>/abort"): "operator",
    ("POST", "/deployments/<deployment_id>/rollback"): "operator",
    ("POST", "/alerts/rules"): "operator",
    ("POST", "/alerts/rules/<int:rule_id>"): "operator",
    # pages: admins
    ("GET", "/admin/users"): "admin",
    ("POST", "/admin/users"): "admin",
    ("POST", "/admin/users/<int:user_id>"): "admin",
    # API: anyone logged in
    ("GET", "/api/v1/openapi.json"): "viewer",
    ("GET", "/api/v1/me"): "viewer",
    ("GET", "/api/v1/fleet"): "viewer",
    ("GET", "/api/v1/fleet/series"): "viewer",
    ("GET", "/api/v1/groups"): "viewer",
    ("GET", "/api/v1/devices"): "viewer",
    ("GET", "/api/v1/devices/<device_id>"): "viewer",
    ("GET", "/api/v1/devices/<device_id>/events"): "viewer",
    ("GET", "/api/v1/devices/<device_id>/series"): "viewer",
    ("GET", "/api/v1/devices/<device_id>/profiles"): "viewer",
    ("GET", "/api/v1/packages"): "viewer",
    ("GET", "/api/v1/packages/<int:package_id>"): "viewer",
    ("GET", "/api/v1/packages/<int:package_id>/file"): "viewer",
    ("GET", "/api/v1/deployments"): "viewer",
    ("GET", "/api/v1/deployments/<deployment_id>"): "viewer",
    ("GET", "/api/v1/deployments/<deployment_id>/latency"): "viewer",
    ("GET", "/api/v1/alerts"): "viewer",
    ("GET", "/api/v1/alert-rules"): "viewer",
    ("GET", "/api/v1/ingest/counters"): "viewer",
    ("GET", "/api/v1/tokens"): "viewer",
    ("POST", "/api/v1/tokens"): "viewer",
    ("DELETE", "/api/v1/tokens/<int:token_id>"): "viewer",
    # API: operators
    ("POST", "/api/v1/packages"): "operator",
    ("POST", "/api/v1/devices/<device_id>/profiles"): "operator",
    ("POST", "/api/v1/deployments"): "operator",
    ("POST", "/api/v1/deployments/<deployment_id>/abort"): "operator",
    ("POST", "/api/v1/deployments/<deployment_id>/rollback"): "operator",
    ("POST", "/api/v1/alert-rules"): "operator",
    ("PATCH", "/api/v1/alert-rules/<int:rule_id>"): "operator",
    ("DELETE", "/api/v1/alert-rules/<int:rule_id>"): "operator",
    # API: admins
    ("GET", "/api/v1/users"): "admin",
    ("POST", "/api/v1/users"): "admin",
    ("PATCH", "/api/v1/users/<int:user_id>"): "admin",
}

CALLERS = ["anonymous", "viewer-session", "operator-session", "admin-session",
           "viewer-token", "operator-token", "admin-token"]
MISSING_ID = 999_999  # no row has it: handlers answer 404 and change nothing


@pytest.fixture
def db_backend():
    # Role checks do not depend on the database: the SQLite variant is enough (this overrides the
    # conftest's parametrized fixture for this module only).
    return "sqlite"


def _routes(app) -> set[tuple[str, str]]:
    return {(m, r.rule) for r in app.url_map.iter_rules() for m in r.methods - {"HEAD", "OPTIONS"}}


def test_every_route_has_a_row(app):
    routes = _routes(app)
    missing = sorted(routes - MATRIX.keys())
    stale = sorted(MATRIX.keys() - routes)
    assert not missing, "routes without a row in MATRIX (decide who may call them): " + \
        ", ".join(f"{m} {r}" for m, r in missing)
    assert not stale, "MATRIX rows without a route: " + ", ".join(f"{m} {r}" for m, r in stale)
    assert all(v in ROLE_ORDER for v in MATRIX.values())


class HandlerProbe:
    """Records whether the innermost function of a view was entered during one request."""

    def __init__(self, view):
        self.code = inspect.unwrap(view).__code__
        self.ran = False

    def _hook(self, frame, event, _arg):
        if event == "call" and frame.f_code is self.code:
            self.ran = True

    def __enter__(self):
        self._old = sys.getprofile()
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._old)


def _url(app, rule) -> str:
    from edgeopt.dashboard.package_store import download_token

    values = {}
    for arg in rule.arguments:
        if arg == "token":  # a validly signed link to a package that does not exist: the handler's 404
            values[arg] = download_token(app.config["SECRET_KEY"], SimpleNamespace(id=MISSING_ID, sha256="0" * 64))
        elif arg == "filename":
            values[arg] = "style.css"
        elif re.search(rf"<int:{arg}>", rule.rule):
            values[arg] = MISSING_ID
        else:
            values[arg] = f"no-such-{arg}"
    with app.test_request_context():
        from flask import url_for

        return url_for(rule.endpoint, **values)


def _client_for(app, caller: str):
    """A test client logged in as ``caller``, its CSRF token and extra headers."""
    client = app.test_client()
    headers = {}
    if caller.endswith("-session"):
        resp = login(client, caller.split("-")[0])
        assert resp.status_code == 302 and urlsplit(resp.headers["Location"]).path == "/fleet", resp.status_code
        token = csrf_token(client.get("/fleet").get_data(as_text=True))
    else:
        # Anonymous callers and scripts hold a CSRF token too (from the login page), so that a refusal
        # here is the role check's, never CSRF's.
        token = csrf_token(client.get("/login").get_data(as_text=True))
        if caller.endswith("-token"):
            headers = bearer(api_token(app, caller.split("-")[0]))
    return client, token, headers


def _request(client, url: str, method: str, token: str, headers: dict):
    if url.startswith("/api/"):
        body = {"json": {}} if method in ("POST", "PATCH") else {}
        return client.open(url, method=method, headers={**headers, "X-CSRFToken": token}, **body)
    data = {"csrf_token": token} if method == "POST" else None
    return client.open(url, method=method, headers=headers, data=data)


def _is_login_redirect(resp) -> bool:
    return resp.status_code in (301, 302, 303, 307, 308) and urlsplit(resp.headers["Location"]).path == "/login"


def _allowed(caller: str, needed: str) -> bool:
    if needed == "public":
        return True
    if caller == "anonymous":
        return False
    return ROLE_ORDER.index(caller.split("-")[0]) >= ROLE_ORDER.index(needed)


def _check_denied(caller, method, url, resp, where):
    if url.startswith("/api/"):
        assert resp.status_code in (401, 403), where
        if method != "HEAD":  # no body
            assert resp.get_json()["error"] == ("unauthorized" if resp.status_code == 401 else "forbidden"), where
    elif caller == "anonymous":
        assert _is_login_redirect(resp), where
        nxt = parse_qs(urlsplit(resp.headers["Location"]).query).get("next")
        assert nxt == ([url] if method == "GET" else None), f"{where}: login redirect's next is {nxt}"
    else:
        assert resp.status_code == 403, where
        assert method == "HEAD" or "this needs the" in resp.get_data(as_text=True), where


@pytest.mark.parametrize("caller", CALLERS)
def test_role_matrix(app, caller):
    client, token, headers = _client_for(app, caller)
    rules = sorted(app.url_map.iter_rules(), key=lambda r: (r.endpoint == "auth.logout", r.rule))  # logout last
    checked = {"allowed": 0, "denied": 0}
    for rule in rules:
        url = _url(app, rule)
        for method in sorted(rule.methods - {"OPTIONS"}):
            needed = MATRIX[("GET" if method == "HEAD" else method, rule.rule)]
            with HandlerProbe(app.view_functions[rule.endpoint]) as probe:
                resp = _request(client, url, method, token, headers)
            where = f"{caller} {method} {url} (table: {needed}) -> {resp.status_code}"
            if _allowed(caller, needed):
                assert probe.ran, f"{where}: the handler did not run"
                assert resp.status_code not in (401, 403), where
                # logging out ends on the login page: that redirect is the handler's answer
                assert rule.rule == "/logout" or not _is_login_redirect(resp), where
                checked["allowed"] += 1
            else:
                assert not probe.ran, f"{where}: the handler ran for a caller the table refuses"
                _check_denied(caller, method, url, resp, where)
                checked["denied"] += 1
            if method == "GET" and rule.endpoint != "auth.logout":
                _check_options(client, url, headers, needed, caller, rule)
    assert sum(checked.values()) >= len(MATRIX)
    if caller == "anonymous":
        public = [m for (m, _), v in MATRIX.items() if v == "public"]
        assert checked["allowed"] == len(public) + public.count("GET")  # HEAD runs the public GETs too
    assert checked["denied"] > 0 or caller.startswith("admin")


def _check_options(client, url, headers, needed, caller, rule):
    with HandlerProbe(client.application.view_functions[rule.endpoint]) as probe:
        resp = client.open(url, method="OPTIONS", headers=headers)
    assert not probe.ran, f"OPTIONS {url} ran the handler"
    if needed == "public" or caller != "anonymous":
        assert resp.status_code == 200 and "GET" in resp.headers["Allow"], (caller, url, resp.status_code)
    elif url.startswith("/api/"):
        assert resp.status_code == 401, (url, resp.status_code)
    else:
        assert _is_login_redirect(resp), (url, resp.status_code)
