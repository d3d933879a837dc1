"""Passwords, API tokens and roles.

Passwords are hashed with werkzeug's salted scrypt/pbkdf2 (``generate_password_hash``). API tokens are
random 256-bit strings shown once; only their sha256 is stored, so a database leak does not leak tokens
(a fast hash is fine here: the token has full entropy, unlike a password). Roles are ordered
viewer < operator < admin: viewers read, operators deploy and edit alert rules, admins manage users
and tokens.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from typing import Callable, TypeVar

from werkzeug.security import check_password_hash, generate_password_hash

ROLES: tuple[str, ...] = ("viewer", "operator", "admin")
TOKEN_PREFIX = "eot_"
MIN_PASSWORD_LENGTH = 8

F = TypeVar("F", bound=Callable)


def hash_password(password: str) -> str:
    """A salted password hash suitable for storing."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must be at least {MIN_PASSWORD_LENGTH} characters, got {len(password)}")
    return generate_password_hash(password)


@functools.cache
def _dummy_hash() -> str:
    # A hash of a random password with the same method and cost as real ones: checking against it
    # costs what checking a real user's password costs.
    return generate_password_hash(secrets.token_urlsafe(16))


def warm_up() -> None:
    """Compute the dummy hash now (app start), so the first unknown-user login is not the slow one."""
    _dummy_hash()


def check_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches the stored hash (constant-time compare inside werkzeug).

    Without a stored hash (unknown user) it still runs one full hash against a dummy and answers False:
    answering at once would tell an attacker which usernames exist (6 ms against 108 ms, measured).
    """
    if not stored_hash:
        check_password_hash(_dummy_hash(), password)
        return False
    return check_password_hash(stored_hash, password)


def new_token() -> tuple[str, str]:
    """A new API token: (plain text to show once, hash to store)."""
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return plain, hash_token(plain)


def hash_token(plain: str) -> str:
    """The stored form of an API token: sha256 hex of its text."""
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def role_rank(role: str | None) -> int:
    """Position of a role in :data:`ROLES`; -1 for unknown roles (they get nothing)."""
    try:
        return ROLES.index(role or "")
    except ValueError:
        return -1


def has_role(user, role: str) -> bool:
    """Whether ``user`` (a flask-login user, possibly anonymous) holds ``role`` or a higher one."""
    if user is None or not getattr(user, "is_authenticated", False):
        return False
    return role_rank(getattr(user, "role", None)) >= role_rank(role)


def requires_role(role: str) -> Callable[[F], F]:
    """Decorator for views and API endpoints: 401 when not logged in, 403 when the role is too low.

    Pages and the API share it; the app's error handlers turn the abort into a login redirect or a
    JSON ``{"error", "message"}`` body depending on the URL.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            from flask import abort
            from flask_login import current_user

            if not current_user.is_authenticated:
                abort(401)
            if not has_role(current_user, role):
                abort(403, description=f"this needs the {role} role; you are {current_user.role}")
            return view(*args, **kwargs)

        wrapped.required_role = role  # type: ignore[attr-defined]
        return wrapped  # type: ignore[return-value]

    return decorate
