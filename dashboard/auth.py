"""Who is asking: session login (flask-login) for people, Bearer API tokens for scripts.

The whole app is closed by default: :func:`require_login` runs before every request and lets through
only the endpoints in :data:`PUBLIC_ENDPOINTS` (login, static assets, health, signed package downloads).
Requests authenticated by an API token skip CSRF (a token is not sent automatically by a browser, so a
forged cross-site request cannot carry it); requests authenticated by the session cookie must carry the
CSRF token on every unsafe method, forms and API alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask, g, request
from flask_login import LoginManager, UserMixin, current_user
from sqlalchemy import select

from .security import hash_token

log = logging.getLogger(__name__)

PUBLIC_ENDPOINTS = frozenset({"auth.login", "static", "healthz", "packages_download.download"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please log in to see this page."
# "basic": a session used from another IP/user agent loses its "fresh" mark. ("strong" would also
# ignore a valid Bearer token sent together with any leftover session cookie.)
login_manager.session_protection = "basic"


@dataclass
class CurrentUser(UserMixin):
    """The logged-in user, detached from any database session (safe to keep on ``g`` all request)."""

    id: int
    username: str
    role: str
    via_token: bool = False
    token_id: int | None = None

    def get_id(self) -> str:
        return str(self.id)

    @classmethod
    def from_row(cls, user, **extra) -> "CurrentUser":
        return cls(id=user.id, username=user.username, role=user.role, **extra)


@login_manager.user_loader
def _load_user(user_id: str):
    from .models import User
    from .views import get_db

    from flask import request

    if request.headers.get("Authorization", "").lower().startswith("bearer "):
        return None  # an explicit token wins over a session cookie sent along (see _load_user_from_token)
    try:
        uid = int(user_id)
    except ValueError:
        return None
    user = get_db().get(User, uid)
    if user is None or not user.active:
        return None
    return CurrentUser.from_row(user)


@login_manager.request_loader
def _load_user_from_token(req):
    """``Authorization: Bearer <token>``: look the token's hash up; revoked tokens and users fail."""
    from .models import ApiToken, User, utcnow
    from .views import get_db

    header = req.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    db = get_db()
    row = db.execute(
        select(ApiToken, User).join(User, ApiToken.user_id == User.id)
        .where(ApiToken.token_hash == hash_token(value.strip()))
    ).first()
    if row is None:
        g.auth_error = "the API token is not valid"
        return None
    token, user = row
    if token.revoked or not user.active:
        g.auth_error = "the API token was revoked or its user is disabled"
        return None
    now = utcnow()
    # Record use at most once a minute: a script polling the API should not write on every call.
    if token.last_used is None or (now - token.last_used).total_seconds() > 60:
        token.last_used = now
        db.commit()
    return CurrentUser.from_row(user, via_token=True, token_id=token.id)


def authenticated_by_token() -> bool:
    return bool(current_user.is_authenticated and getattr(current_user, "via_token", False))


def require_login():
    """Before every request: 401 unless the endpoint is public or someone is authenticated."""
    from flask import abort

    if request.endpoint in PUBLIC_ENDPOINTS or request.endpoint is None:
        return None
    if not current_user.is_authenticated:
        abort(401)
    return None


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    app.before_request(require_login)
