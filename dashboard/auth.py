"""Who is asking: session login (flask-login) for people, Bearer API tokens for scripts.

The whole app is closed by default: :func:`require_login` runs before every request and lets through
only the endpoints in :data:`PUBLIC_ENDPOINTS` (login, static assets, health, signed package downloads).
Requests authenticated by an API token skip CSRF (a token is not sent automatically by a browser, so a
forged cross-site request cannot carry it); requests authenticated by the session cookie must carry the
CSRF token on every unsafe method, forms and API alike.

Browser logins are server-side sessions (:class:`~.models.LoginSession`): the cookie holds a random token
whose hash is looked up on every request, so logout, a password change or disabling the user ends the
session for good, copies of the cookie included. Failed logins are rate limited (``ratelimit.py``).
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from flask import Flask, current_app, g, request
from flask_login import LoginManager, UserMixin, current_user
from sqlalchemy import delete, select

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
    session_token: str | None = None  # the login session's token (see models.LoginSession)

    def get_id(self) -> str:
        # What flask-login keeps in the session and remember-me cookies: the server-side login session's
        # token, not the user id, so ending that session (logout, password change) ends the cookie too.
        return self.session_token or ""

    @classmethod
    def from_row(cls, user, **extra) -> "CurrentUser":
        return cls(id=user.id, username=user.username, role=user.role, **extra)


@login_manager.user_loader
def _load_user(session_token: str):
    """The user of a login session cookie: its token must name a live server-side session."""
    from .models import LoginSession, User, utcnow
    from .views import get_db

    if request.headers.get("Authorization", "").lower().startswith("bearer "):
        return None  # an explicit token wins over a session cookie sent along (see _load_user_from_token)
    if not session_token or len(session_token) > 128:
        return None  # cookies from before login sessions existed carried the user id: log in again
    row = get_db().execute(
        select(LoginSession, User).join(User, LoginSession.user_id == User.id)
        .where(LoginSession.token_hash == hash_token(session_token))).first()
    if row is None:
        return None
    login_session, user = row
    if not user.active or utcnow() - login_session.created_at > current_app.config["REMEMBER_COOKIE_DURATION"]:
        return None
    return CurrentUser.from_row(user, session_token=session_token)


def start_session(db, user) -> CurrentUser:
    """A new server-side login session for ``user`` (committed); log it in with ``login_user``."""
    from .models import LoginSession, utcnow

    plain = secrets.token_urlsafe(32)
    db.add(LoginSession(user_id=user.id, token_hash=hash_token(plain)))
    # Sessions older than the longest a cookie may live can never be used again: drop them.
    db.execute(delete(LoginSession).where(LoginSession.user_id == user.id,
                                          LoginSession.created_at < utcnow() - current_app.config["REMEMBER_COOKIE_DURATION"]))
    db.commit()
    return CurrentUser.from_row(user, session_token=plain)


def end_session(db, session_token: str | None) -> None:
    """Forget one login session (logout): its cookie, and any copy of it, no longer logs anyone in."""
    from .models import LoginSession

    if session_token:
        db.execute(delete(LoginSession).where(LoginSession.token_hash == hash_token(session_token)))
        db.commit()


def end_all_sessions(db, user_id: int) -> int:
    """Forget every login session of a user (password change, disabled user). Does not commit."""
    from .models import LoginSession

    return db.execute(delete(LoginSession).where(LoginSession.user_id == user_id)).rowcount


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
    from .ratelimit import make_guard
    from .security import warm_up

    login_manager.init_app(app)
    app.before_request(require_login)
    app.extensions["edgeopt_login_guard"] = make_guard(
        app.config["RATELIMIT_STORAGE_URI"], app.extensions["edgeopt_engine"],
        app.config["LOGIN_LIMIT_PER_IP"], app.config["LOGIN_LIMIT_PER_USER"])
    warm_up()
