"""edgeopt dashboard: Flask + SQLAlchemy fleet dashboard."""
from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

__all__ = ["create_app"]


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _secret_key(instance: Path) -> str:
    """EDGEOPT_SECRET_KEY, or a random key generated once and kept in the instance folder.

    Persisting it keeps sessions and signed download URLs valid across restarts and across several
    web workers started from the same instance folder.
    """
    env = os.environ.get("EDGEOPT_SECRET_KEY")
    if env:
        return env
    path = instance / "secret_key"
    if path.is_file():
        return path.read_text().strip()
    instance.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    # Several workers may start at once on a fresh instance folder: write a complete temp file and link it
    # into place, so exactly one key wins and nobody ever reads a half-written one.
    tmp = instance / f".secret_key.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
        log.info("generated a new secret key in %s", path)
    except FileExistsError:
        key = path.read_text().strip()  # another worker won the race; use its key
    finally:
        tmp.unlink(missing_ok=True)
    return key


def default_config(instance: Path) -> dict[str, Any]:
    """Settings read from the environment (see docs/dashboard-web.md for the list)."""
    from . import ratelimit

    keys = os.environ.get("EDGEOPT_TRUSTED_KEYS", "")
    return {
        "DATABASE_URL": os.environ.get("EDGEOPT_DATABASE_URL") or f"sqlite:///{instance / 'edgeopt.db'}",
        # The dashboard's own broker account (it may only publish commands); mqtts:// with the CA below.
        "BROKER_URL": os.environ.get("EDGEOPT_BROKER_URL", "mqtt://127.0.0.1:1883"),
        "BROKER_CA_FILE": os.environ.get("EDGEOPT_BROKER_CA") or None,
        # Seconds a signed command stays valid (EDGEOPT_COMMAND_TTL_S; key: EDGEOPT_COMMAND_KEY).
        "COMMAND_TTL_S": None,
        "FLEET": os.environ.get("EDGEOPT_FLEET", "default"),
        # Public keys (PEM files) whose signatures the package upload accepts; ':' or ',' separated.
        "TRUSTED_KEYS": [p for p in keys.replace(",", os.pathsep).split(os.pathsep) if p.strip()],
        "PACKAGE_DIR": os.environ.get("EDGEOPT_PACKAGE_DIR") or str(instance / "packages"),
        # Base URL the agents reach this server on; download links in deploy commands start with it.
        "PUBLIC_URL": os.environ.get("EDGEOPT_PUBLIC_URL", ""),
        "DOWNLOAD_URL_MAX_AGE": int(os.environ.get("EDGEOPT_DOWNLOAD_URL_MAX_AGE", str(7 * 86400))),
        "MAX_CONTENT_LENGTH": int(os.environ.get("EDGEOPT_MAX_UPLOAD_MB", "2048")) * 1024 * 1024,
        "DEPLOY_TIMEOUT_S": float(os.environ.get("EDGEOPT_DEPLOY_TIMEOUT_S", "900")),
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_SECURE": _env_bool("EDGEOPT_SECURE_COOKIES"),
        "REMEMBER_COOKIE_HTTPONLY": True,
        "REMEMBER_COOKIE_SAMESITE": "Lax",
        "REMEMBER_COOKIE_SECURE": _env_bool("EDGEOPT_SECURE_COOKIES"),
        "WTF_CSRF_TIME_LIMIT": None,  # tied to the session instead: a long-open page still submits
        # A login session (and its remember-me cookie) ends after this long, or at logout/password change.
        "REMEMBER_COOKIE_DURATION": timedelta(days=int(os.environ.get("EDGEOPT_SESSION_DAYS", "30"))),
        # Failed-login limits (limits' syntax) and where they are counted; the default, the dashboard's own
        # database, is shared by every worker (see ratelimit.py).
        "RATELIMIT_STORAGE_URI": os.environ.get("EDGEOPT_RATELIMIT_STORAGE_URI", "edgeopt+db://"),
        "LOGIN_LIMIT_PER_IP": os.environ.get("EDGEOPT_LOGIN_LIMIT_PER_IP", ratelimit.DEFAULT_PER_IP),
        "LOGIN_LIMIT_PER_USER": os.environ.get("EDGEOPT_LOGIN_LIMIT_PER_USER", ratelimit.DEFAULT_PER_USER),
        # Number of reverse proxies in front of the app whose X-Forwarded-For is trusted (0: none). Behind a
        # proxy, without it every client has the proxy's address and shares one per-IP login limit.
        "TRUSTED_PROXIES": int(os.environ.get("EDGEOPT_TRUSTED_PROXIES", "0")),
        "JSON_SORT_KEYS": False,
    }


def create_app(config: Mapping[str, Any] | None = None):
    """Build the Flask application (flaskr-style factory).

    ``config`` overrides the environment-derived settings (tests pass ``DATABASE_URL``, ``TESTING``...).
    The database schema is not created here: run ``edgeopt-dashboard init-db`` (tests use the fixtures).
    """
    from flask import Flask, jsonify
    from flask_wtf.csrf import CSRFProtect

    from . import auth
    from .api import bp as api_bp
    from .views import init_db_session, register_error_handlers, register_input_checks
    from .views.alerts import bp as alerts_bp
    from .views.auth import bp as auth_bp
    from .views.deployments import bp as deployments_bp
    from .views.devices import bp as devices_bp
    from .views.profiles import bp as profiles_bp
    from .views.fleet import bp as fleet_bp
    from .views.packages import bp as packages_bp, download_bp

    from .db import data_dir

    # The instance folder (secret key, default SQLite file, packages) is the data helper's data dir
    # (EDGEOPT_DATA_DIR), so the CLI, the ingest and the web process agree on where things live.
    instance_path = (config or {}).get("INSTANCE_PATH") or os.environ.get("EDGEOPT_INSTANCE_DIR") or str(data_dir())
    app = Flask(__name__, instance_path=str(Path(instance_path).resolve()), instance_relative_config=True)
    instance = Path(app.instance_path)
    settings = default_config(instance)
    if config:
        settings.update(config)
    if "SECRET_KEY" not in settings:
        settings["SECRET_KEY"] = _secret_key(instance)
    app.config.from_mapping(settings)
    if app.config["TRUSTED_PROXIES"] > 0:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=app.config["TRUSTED_PROXIES"], x_proto=1)

    csrf = CSRFProtect(app)
    # Token-authenticated API calls are exempt; session-authenticated API calls are checked in the
    # API blueprint's before_request (see api/__init__.py), so the exemption never covers a browser.
    csrf.exempt(api_bp)
    app.extensions["edgeopt_csrf"] = csrf

    init_db_session(app)
    # Before auth and the routes: the bounded <int:> converter must exist when the routes are added, and
    # hostile input (NUL, deep JSON) is refused before any view or user lookup sends it to the database.
    register_input_checks(app)
    auth.init_app(app)

    for bp in (auth_bp, fleet_bp, devices_bp, profiles_bp, packages_bp, download_bp, deployments_bp, alerts_bp,
               api_bp):
        app.register_blueprint(bp)
    register_error_handlers(app)

    @app.get("/healthz")
    def healthz():
        """Liveness, database reachability and the ingest processes' own health reports; no authentication
        (load balancers call it). 503 when the database is unreachable, or, with ``?ingest=required``,
        when the ingest is not fully healthy (or absent); otherwise 200 with ``status`` "ok" or "degraded"."""
        from datetime import datetime, timezone

        from flask import request
        from sqlalchemy import text

        from .ingest_health import summary
        from .views import get_db

        try:
            get_db().execute(text("SELECT 1"))
            ingest = summary(get_db(), datetime.now(timezone.utc))
        except Exception as exc:  # noqa: BLE001 - any database failure means "not healthy"
            log.warning("health check: database unreachable: %s", exc)
            return jsonify(status="error", database="unreachable"), 503
        # No ingest process has ever reported (a web-only install): not a fault of the web app.
        status = "ok" if ingest["status"] in ("ok", "absent") else "degraded"
        code = 503 if request.args.get("ingest") == "required" and ingest["status"] != "ok" else 200
        return jsonify(status=status, database="ok", ingest=ingest), code

    @app.cli.command("evaluate-alerts")
    def evaluate_alerts_cmd():
        """Evaluate the alert rules once (the ingest process does it every 30 s)."""
        import click

        from .alerting import evaluate
        from .views import get_db

        result = evaluate(get_db())
        click.echo(f"alerts: {result['opened']} opened, {result['resolved']} resolved")

    @app.after_request
    def _security_headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        # Everything is served by the app itself, so the policy can forbid every other origin.
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
            "frame-ancestors 'none'")
        return resp

    return app
