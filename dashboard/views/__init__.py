"""Server-rendered pages, one blueprint per area, plus what they share: the request's database session,
error pages, template filters.

Error handling is split by URL: anything under ``/api/`` answers JSON ``{"error", "message"}``; pages
redirect to the login form on 401 and render ``error.html`` otherwise.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from flask import Flask, abort, current_app, flash, g, redirect, render_template, request, url_for
from flask_wtf.csrf import CSRFError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

log = logging.getLogger(__name__)


def init_db_session(app: Flask) -> None:
    """One engine per app; one session per request, closed at teardown."""
    from ..db import database_url, make_engine, session_factory

    engine = make_engine(database_url(app.config["DATABASE_URL"]))
    app.extensions["edgeopt_engine"] = engine
    app.extensions["edgeopt_sessionmaker"] = session_factory(engine)

    @app.teardown_appcontext
    def _close_session(_exc):
        db = g.pop("db", None)
        if db is not None:
            db.close()


def get_db() -> Session:
    """The database session of the current request (created on first use)."""
    if "db" not in g:
        g.db = current_app.extensions["edgeopt_sessionmaker"]()
    return g.db


def wants_json() -> bool:
    return request.path.startswith(("/api/", "/dl/"))


def json_error(status: int, error: str, message: str):
    from flask import jsonify

    resp = jsonify(error=error, message=message)
    resp.status_code = status
    return resp


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(CSRFError)
    def _csrf(exc: CSRFError):
        message = f"the form was refused: {exc.description} (reload the page and submit again)"
        if wants_json():
            return json_error(400, "csrf", message)
        return render_template("error.html", code=400, title="Form refused", message=message), 400

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = exc.code or 500
        if wants_json():
            if code == 401:
                reason = g.get("auth_error") or ("log in, or send an API token as 'Authorization: Bearer <token>'")
                return json_error(401, "unauthorized", f"authentication required: {reason}")
            return json_error(code, exc.name.lower().replace(" ", "_"), exc.description or exc.name)
        if code == 401:
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?") if request.method == "GET" else None))
        return render_template("error.html", code=code, title=exc.name, message=exc.description), code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if current_app.testing:
            raise exc  # tests see the real traceback
        log.exception("unhandled error on %s %s", request.method, request.path)
        message = "an unexpected error happened on the server; it was logged"
        if wants_json():
            return json_error(500, "internal_error", message)
        return render_template("error.html", code=500, title="Server error", message=message), 500

    @app.template_filter("ts")
    def _fmt_ts(value: datetime | None) -> str:
        if value is None:
            return "—"
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    @app.template_filter("ago")
    def _fmt_ago(value: datetime | None) -> str:
        if value is None:
            return "never"
        secs = (datetime.now(timezone.utc) - value).total_seconds()
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if secs >= size:
                return f"{int(secs // size)} {unit} ago"
        return f"{max(0, int(secs))} s ago"

    @app.template_filter("ms")
    def _fmt_ms(value: float | None) -> str:
        return "—" if value is None else (f"{value:.1f} ms" if value >= 1 else f"{value:.3f} ms")

    @app.template_filter("bytes")
    def _fmt_bytes(value: float | None) -> str:
        if value is None:
            return "—"
        for unit in ("B", "KiB", "MiB", "GiB"):
            if value < 1024:
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
        return f"{value:.1f} TiB"

    @app.context_processor
    def _helpers():
        from flask_login import current_user

        from ..security import has_role

        return {"can": lambda role: has_role(current_user, role)}


# Primary keys are INTEGER columns (int4 on PostgreSQL): a larger id cannot exist, and sending one to the
# database overflows (PostgreSQL "integer out of range", SQLite OverflowError) instead of finding nothing.
MAX_ID = 2**31 - 1


class BoundedIntConverter(IntegerConverter):
    """``<int:...>`` limited to :data:`MAX_ID`: a larger number does not match the route (404)."""

    def __init__(self, map, *args, **kwargs):  # noqa: A002 - werkzeug's parameter name
        kwargs.setdefault("max", MAX_ID)
        super().__init__(map, *args, **kwargs)


def int_arg(name: str, default: int | None = None, lo: int = 1, hi: int = MAX_ID) -> int | None:
    """A whole-number query parameter in ``lo..hi``; 400 with a message naming it otherwise.

    (``request.args.get(name, type=int)`` silently ignores a bad value and passes any size through.)
    """
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        abort(400, description=f"{name} must be a whole number, found {raw[:40]!r}")
    if not lo <= value <= hi:
        abort(400, description=f"{name} must be between {lo} and {hi}, found {raw[:40]}")
    return value


def _nul_in_json(doc) -> bool:
    # Iterative walk: a document nested as deep as the parser allows must not overflow the stack here.
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def check_request_input():
    """Before every request: refuse NUL characters and unparseably deep JSON with a 400.

    PostgreSQL text cannot hold NUL (psycopg raises DataError), so a NUL anywhere in the path, the query,
    a form or a JSON body would otherwise end as a 500 deep inside a query. Checked once here, for every
    route, instead of in each view.
    """
    if "\x00" in request.path:
        abort(400, description="the URL path contains a NUL character (\\x00), which is not allowed")
    for where, multi in (("query parameter", request.args), ("form field", request.form)):
        for key, value in multi.items(multi=True):
            if "\x00" in key or "\x00" in value:
                abort(400, description=f"{where} {key.replace(chr(0), '?')[:40]!r} contains a NUL character "
                                       "(\\x00), which is not allowed")
    if request.is_json and request.content_length != 0:
        try:
            doc = request.get_json(silent=True)
        except RecursionError:
            abort(400, description="the JSON body is nested too deeply")
        if _nul_in_json(doc):
            abort(400, description="a JSON string in the body contains a NUL character (\\u0000), which is not allowed")
    return None


def register_input_checks(app: Flask) -> None:
    """The bounded ``int`` converter (before any route is added) and :func:`check_request_input`."""
    app.url_map.converters["int"] = BoundedIntConverter
    app.before_request(check_request_input)


def flash_error(message: str) -> None:
    flash(message, "error")


def back(default_endpoint: str, **values):
    """Redirect to the page the form came from when it is ours, else to ``default_endpoint``."""
    ref = request.form.get("next") or ""
    if ref.startswith("/") and not ref.startswith("//"):
        return redirect(ref)
    return redirect(url_for(default_endpoint, **values))
