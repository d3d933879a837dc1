"""Who am I, users (admins) and API tokens."""
from __future__ import annotations

from flask import abort, request
from flask_login import current_user
from sqlalchemy import select

from edgeopt.sdk.errors import InputError

from ..auth import end_all_sessions
from ..models import ApiToken, User
from ..security import ROLES, hash_password, new_token, requires_role
from ..views import get_db
from . import bp, ok
from .serialize import iso


def _user(u: User) -> dict:
    return {"id": u.id, "username": u.username, "role": u.role, "active": u.active,
            "created_at": iso(u.created_at), "last_login": iso(u.last_login)}


def _token(t: ApiToken) -> dict:
    return {"id": t.id, "name": t.name, "user_id": t.user_id, "created_at": iso(t.created_at),
            "last_used": iso(t.last_used), "revoked": t.revoked}


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InputError("send a JSON object")
    return body


@bp.get("/me")
def me():
    return ok({"id": current_user.id, "username": current_user.username, "role": current_user.role,
               "via_token": current_user.via_token})


@bp.get("/users")
@requires_role("admin")
def users():
    return ok({"users": [_user(u) for u in get_db().scalars(select(User).order_by(User.username))]})


@bp.post("/users")
@requires_role("admin")
def create_user():
    body = _body()
    username, password, role = body.get("username"), body.get("password"), body.get("role", "viewer")
    if not isinstance(username, str) or not username.strip() or not isinstance(password, str):
        raise InputError("username and password are required")
    if role not in ROLES:
        raise InputError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    try:
        digest = hash_password(password)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    db = get_db()
    if db.scalar(select(User).where(User.username == username)) is not None:
        raise InputError(f"user {username!r} already exists")
    user = User(username=username, password_hash=digest, role=role)
    db.add(user)
    db.commit()
    return ok(_user(user), 201)


@bp.patch("/users/<int:user_id>")
@requires_role("admin")
def update_user(user_id: int):
    body = _body()
    db = get_db()
    user = db.get(User, user_id) or abort(404, description=f"no user with id {user_id}")
    if "role" in body:
        if body["role"] not in ROLES:
            raise InputError(f"unknown role {body['role']!r}; expected one of {', '.join(ROLES)}")
        if user.id == current_user.id and body["role"] != "admin":
            raise InputError("you cannot remove your own admin role")
        user.role = body["role"]
    if "active" in body:
        if user.id == current_user.id:
            raise InputError("you cannot disable yourself")
        user.active = bool(body["active"])
        if not user.active:
            end_all_sessions(db, user.id)
    if "password" in body:
        try:
            user.password_hash = hash_password(str(body["password"]))
        except ValueError as exc:
            raise InputError(str(exc)) from None
        # A new password ends every browser session of the user: whoever knew the old one is logged out.
        end_all_sessions(db, user.id)
    db.commit()
    return ok(_user(user))


@bp.get("/tokens")
def tokens():
    q = select(ApiToken).order_by(ApiToken.created_at.desc())
    if current_user.role != "admin":
        q = q.where(ApiToken.user_id == current_user.id)
    return ok({"tokens": [_token(t) for t in get_db().scalars(q)]})


@bp.post("/tokens")
def create_token():
    """A new token for the caller; its text is in this answer only."""
    name = str(_body().get("name") or "").strip()
    if not name:
        raise InputError("a token needs a name")
    plain, digest = new_token()
    db = get_db()
    tok = ApiToken(user_id=current_user.id, token_hash=digest, name=name[:128])
    db.add(tok)
    db.commit()
    return ok({**_token(tok), "token": plain}, 201)


@bp.delete("/tokens/<int:token_id>")
def revoke_token(token_id: int):
    db = get_db()
    tok = db.get(ApiToken, token_id)
    if tok is None or (tok.user_id != current_user.id and current_user.role != "admin"):
        abort(404, description=f"no token with id {token_id}")
    tok.revoked = True
    db.commit()
    return ok(_token(tok))
