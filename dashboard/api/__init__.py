"""The JSON API under ``/api/v1``: one twin per page, errors as ``{"error": ..., "message": ...}``.

Scripts authenticate with ``Authorization: Bearer <token>`` (no CSRF: a browser never adds that header
by itself). Browser pages call the same API with their session cookie; for those, unsafe methods must
carry the CSRF token in an ``X-CSRFToken`` header. The OpenAPI 3 description is ``/api/v1/openapi.json``.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from edgeopt.sdk.errors import (ConfigError, EdgeoptError, PackageError, SecurityError, UnavailableError)

from ..auth import SAFE_METHODS, authenticated_by_token
from ..views import json_error

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.before_request
def _csrf_for_sessions():
    from flask import request

    if request.method not in SAFE_METHODS and not authenticated_by_token():
        current_app.extensions["edgeopt_csrf"].protect()


@bp.errorhandler(EdgeoptError)
def _edgeopt_error(exc: EdgeoptError):
    from ..views import get_db

    get_db().rollback()
    if isinstance(exc, ConfigError) and "EDGEOPT_" in exc.message:
        return json_error(500, "config_error", exc.one_line())
    if isinstance(exc, SecurityError):
        return json_error(422, "package_rejected", exc.one_line())
    if isinstance(exc, PackageError):
        return json_error(422, "invalid_package", exc.one_line())
    if isinstance(exc, UnavailableError):
        return json_error(503, "unavailable", exc.one_line())
    return json_error(400, "invalid_input", exc.one_line())


def ok(payload, status: int = 200):
    resp = jsonify(payload)
    resp.status_code = status
    return resp


from . import alerts, deployments, fleet, openapi, packages, profiles, users  # noqa: E402,F401  (register routes)
