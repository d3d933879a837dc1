"""dashboard/security.py on its own, fast and exact: passwords, tokens, role ranks and ``requires_role``
(on a minimal Flask app with flask-login, so 401 and 403 come from the real decorator)."""
from __future__ import annotations

import hashlib
import re

import pytest
from flask import Flask
from flask_login import LoginManager, UserMixin, login_user

from edgeopt.dashboard import security
from edgeopt.dashboard.security import (ROLES, check_password, has_role, hash_password, hash_token, new_token,
                                        requires_role, role_rank, tokens_equal)


def test_roles_are_ordered_viewer_operator_admin():
    assert ROLES == ("viewer", "operator", "admin")
    assert [role_rank(r) for r in ("viewer", "operator", "admin")] == [0, 1, 2]
    assert role_rank("root") == -1 and role_rank(None) == -1 and role_rank("") == -1


class _User:
    def __init__(self, role, authenticated=True):
        self.role, self.is_authenticated = role, authenticated


@pytest.mark.parametrize("role, wanted, ok", [
    ("viewer", "viewer", True), ("viewer", "operator", False), ("viewer", "admin", False),
    ("operator", "viewer", True), ("operator", "operator", True), ("operator", "admin", False),
    ("admin", "viewer", True), ("admin", "operator", True), ("admin", "admin", True),
    ("superuser", "viewer", False), (None, "viewer", False),
])
def test_has_role_is_rank_at_least(role, wanted, ok):
    assert has_role(_User(role), wanted) is ok


def test_has_role_needs_an_authenticated_user():
    assert has_role(None, "viewer") is False
    assert has_role(_User("admin", authenticated=False), "viewer") is False
    assert has_role(object(), "viewer") is False  # no is_authenticated at all

    class RoleOnly:  # a role but no is_authenticated: not logged in
        role = "admin"

    assert has_role(RoleOnly(), "viewer") is False


def test_password_hash_round_trip_and_minimum_length():
    h = hash_password("long enough")
    assert h != "long enough" and check_password(h, "long enough") and not check_password(h, "long enougH")
    assert hash_password("12345678")  # exactly the minimum
    with pytest.raises(ValueError, match=r"^password must be at least 8 characters, got 7$"):
        hash_password("1234567")
    assert hash_password("same pass") != hash_password("same pass")  # salted


def test_unknown_user_still_checks_a_hash_and_fails():
    calls = []
    real = security.check_password_hash

    def spy(stored, password):
        calls.append(stored)
        return real(stored, password)

    security.check_password_hash, saved = spy, security.check_password_hash
    try:
        assert check_password(None, "whatever") is False
        assert check_password("", "whatever") is False
    finally:
        security.check_password_hash = saved
    assert calls == [security._dummy_hash()] * 2  # the dummy hash: as slow as a real user's check
    assert real(security._dummy_hash(), "x") is False


def test_tokens_are_random_prefixed_and_stored_as_sha256():
    plain, digest = new_token()
    assert re.fullmatch(r"eot_[A-Za-z0-9_-]{43}", plain)
    assert digest == hashlib.sha256(plain.encode()).hexdigest() == hash_token(plain)
    assert new_token()[0] != plain
    assert tokens_equal("abc", "abc") and not tokens_equal("abc", "abd") and not tokens_equal("abc", "ab")


@pytest.fixture
def role_app():
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", TESTING=True)
    lm = LoginManager(app)
    users = {r: type("U", (UserMixin,), {"id": r, "role": r})() for r in ROLES}
    lm.user_loader(users.get)

    @app.get("/login/<role>")
    def _login(role):
        login_user(users[role])
        return "ok"

    @app.get("/op")
    @requires_role("operator")
    def op():
        """the view's own docstring"""
        return "ran"

    return app


def test_requires_role_401_403_and_runs_the_view(role_app):
    c = role_app.test_client()
    assert c.get("/op").status_code == 401
    c.get("/login/viewer")
    resp = c.get("/op")
    assert resp.status_code == 403
    assert "<p>this needs the operator role; you are viewer</p>" in resp.get_data(as_text=True)
    for role in ("operator", "admin"):
        c.get(f"/login/{role}")
        resp = c.get("/op")
        assert (resp.status_code, resp.get_data(as_text=True)) == (200, "ran")
    view = role_app.view_functions["op"]
    assert view.required_role == "operator" and view.__name__ == "op" and view.__doc__ == "the view's own docstring"


def test_requires_role_refuses_an_unknown_role():
    with pytest.raises(ValueError, match=r"^unknown role 'root'; expected one of viewer, operator, admin$"):
        requires_role("root")
