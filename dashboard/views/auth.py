"""Login, logout, users (admins) and API tokens (everyone for their own; admins for all)."""
from __future__ import annotations

import logging
from urllib.parse import urlparse

from flask import (Blueprint, abort, current_app, flash, make_response, redirect, render_template, request, session,
                   url_for)
from flask_login import current_user, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from wtforms import BooleanField, PasswordField, SelectField, StringField
from wtforms.validators import DataRequired, Length, Regexp

from ..auth import end_all_sessions, end_session, start_session
from ..security import MIN_PASSWORD_LENGTH, ROLES, check_password, hash_password, new_token, requires_role
from . import get_db

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__)


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired()])
    remember = BooleanField("Keep me logged in")


class UserForm(FlaskForm):
    username = StringField("Username", validators=[
        DataRequired(), Length(max=64),
        Regexp(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$", message="letters, digits, '.', '_', '@' or '-' only")])
    password = PasswordField("Password", validators=[
        DataRequired(), Length(min=MIN_PASSWORD_LENGTH, message=f"at least {MIN_PASSWORD_LENGTH} characters")])
    role = SelectField("Role", choices=list(ROLES), default="viewer")


class TokenForm(FlaskForm):
    name = StringField("Token name", validators=[DataRequired(), Length(max=128)])


class ActionForm(FlaskForm):
    """A form with only the CSRF token: buttons that change something (revoke, disable, abort)."""


def _safe_next(target: str | None) -> str:
    # Only same-site relative paths: an open redirect after login is a phishing aid.
    if target and target.startswith("/") and not target.startswith("//") and not urlparse(target).netloc:
        return target
    return url_for("fleet.overview")


@bp.route("/login", methods=["GET", "POST"])
def login():
    from ..models import User, utcnow

    form = LoginForm()
    if form.validate_on_submit():
        db = get_db()
        guard = current_app.extensions["edgeopt_login_guard"]
        ip, username = request.remote_addr or "?", form.username.data
        wait = guard.blocked(ip, username)
        if wait is not None:
            # Refused before the password is checked: a right guess made now would not be recognised.
            log.warning("login for %r from %s refused: too many failed attempts", username, ip)
            flash(f"too many failed logins; try again in {wait} s", "error")
            resp = make_response(render_template("login.html", form=form), 429)
            resp.headers["Retry-After"] = str(wait)
            return resp
        user = db.scalar(select(User).where(User.username == username))
        # The hash is always checked (a dummy one for unknown users), so an unknown or disabled user takes
        # as long as a wrong password: the answer time does not tell which usernames exist.
        password_ok = check_password(user.password_hash if user is not None else None, form.password.data)
        if user is None or not user.active or not password_ok:
            guard.failed(ip, username)
            log.info("failed login for %r from %s", username, ip)
            flash("wrong username or password", "error")
            return render_template("login.html", form=form), 401
        user.last_login = utcnow()
        db.commit()
        session.clear()  # a fresh session on login: no fixation of an earlier session id's data
        login_user(start_session(db, user), remember=form.remember.data)
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", form=form)


@bp.post("/logout")
def logout():
    end_session(get_db(), getattr(current_user, "session_token", None))
    logout_user()
    session.clear()
    flash("logged out", "success")
    return redirect(url_for("auth.login"))


@bp.get("/admin/users")
@requires_role("admin")
def users():
    from ..models import ApiToken, User

    db = get_db()
    rows = db.scalars(select(User).order_by(User.username)).all()
    token_counts = dict(db.execute(select(ApiToken.user_id, func.count()).where(ApiToken.revoked.is_(False))
                                   .group_by(ApiToken.user_id)).all())
    return render_template("users.html", users=rows, token_counts=token_counts, form=UserForm(),
                           action=ActionForm(), roles=ROLES)


@bp.post("/admin/users")
@requires_role("admin")
def create_user():
    from ..models import User

    form = UserForm()
    db = get_db()
    if not form.validate_on_submit():
        for field, errors in form.errors.items():
            flash(f"{field}: {'; '.join(errors)}", "error")
        return redirect(url_for("auth.users"))
    if db.scalar(select(User).where(User.username == form.username.data)) is not None:
        flash(f"user {form.username.data!r} already exists", "error")
        return redirect(url_for("auth.users"))
    db.add(User(username=form.username.data, password_hash=hash_password(form.password.data), role=form.role.data))
    db.commit()
    log.info("user %s created user %s (%s)", current_user.username, form.username.data, form.role.data)
    flash(f"user {form.username.data} created with role {form.role.data}", "success")
    return redirect(url_for("auth.users"))


@bp.post("/admin/users/<int:user_id>")
@requires_role("admin")
def update_user(user_id: int):
    from ..models import User

    form = ActionForm()
    if not form.validate_on_submit():
        abort(400)
    db = get_db()
    user = db.get(User, user_id) or abort(404, description=f"no user with id {user_id}")
    role = request.form.get("role")
    if role:
        if role not in ROLES:
            abort(400, description=f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if user.id == current_user.id and role != "admin":
            flash("you cannot remove your own admin role", "error")
            return redirect(url_for("auth.users"))
        user.role = role
    if "active" in request.form:
        if user.id == current_user.id:
            flash("you cannot disable yourself", "error")
            return redirect(url_for("auth.users"))
        user.active = request.form["active"] == "1"
        if not user.active:
            end_all_sessions(db, user.id)
    db.commit()
    flash(f"user {user.username} updated", "success")
    return redirect(url_for("auth.users"))


@bp.get("/tokens")
def tokens(new_token_text: str | None = None):
    from ..models import ApiToken, User

    db = get_db()
    q = select(ApiToken, User.username).join(User, ApiToken.user_id == User.id).order_by(ApiToken.created_at.desc())
    if current_user.role != "admin":
        q = q.where(ApiToken.user_id == current_user.id)
    return render_template("tokens.html", tokens=db.execute(q).all(), form=TokenForm(), action=ActionForm(),
                           new_token=new_token_text)


@bp.post("/tokens")
def create_token():
    from ..models import ApiToken

    form = TokenForm()
    if not form.validate_on_submit():
        flash("a token needs a name", "error")
        return redirect(url_for("auth.tokens"))
    plain, digest = new_token()
    db = get_db()
    db.add(ApiToken(user_id=current_user.id, token_hash=digest, name=form.name.data))
    db.commit()
    # Shown once in this response and never again: only the hash is kept.
    return tokens(new_token_text=plain)


@bp.post("/tokens/<int:token_id>/revoke")
def revoke_token(token_id: int):
    from ..models import ApiToken

    form = ActionForm()
    if not form.validate_on_submit():
        abort(400)
    db = get_db()
    token = db.get(ApiToken, token_id)
    if token is None or (token.user_id != current_user.id and current_user.role != "admin"):
        abort(404, description=f"no token with id {token_id}")
    token.revoked = True
    db.commit()
    flash(f"token {token.name!r} revoked", "success")
    return redirect(url_for("auth.tokens"))
