"""The OpenAPI 3 description of ``/api/v1``, built from the app's own URL map so it never drifts from
the routes: every API endpoint is listed with its methods, path parameters, documented query
parameters, summary (the view's docstring), security and error shape."""
from __future__ import annotations

import re

from flask import current_app

from . import bp, ok

QUERY = {
    "api.fleet_series": ["range", "model", "group", "profile", "format"],
    "api.device_series": ["range", "model", "format"],
    "api.devices": ["q", "status", "profile", "group", "package", "sort", "order", "page", "per_page"],
    "api.device_events": ["limit", "before_id"],
    "api.alerts": ["state"],
    "api.fleet": ["slowest"],
    "api.deployment_latency": ["window", "format"],
}
QUERY_DOC = {
    "range": "1h, 6h, 24h (default), 7d or 30d", "q": "device id contains (case-insensitive)",
    "status": "online or offline", "package": "name or name@version",
    "sort": "device_id, status, profile, last_seen, p95 or agent_version", "order": "asc or desc",
    "state": "open (default), resolved or all",
    "window": "15m, 1h (default), 6h or 24h before and after each device's switch",
    "format": "json (default) or csv (the chart's points, one row each)",
}
BODIES = {
    "api.create_deployment": {"type": "object", "required": ["package_id", "target"], "properties": {
        "package_id": {"type": "integer"},
        "target": {"type": "object", "description": '{"devices": [ids]} or {"group": name} or {"tag": name}'},
        "stage_percent": {"type": "integer", "minimum": 1, "maximum": 100, "default": 100},
        "failure_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.2}}},
    "api.create_alert_rule": {"type": "object", "required": ["name", "kind"], "properties": {
        "name": {"type": "string"}, "kind": {"type": "string", "enum": ["offline", "p95_slo", "install_failure", "placement"]},
        "model": {"type": "string"}, "threshold_minutes": {"type": "number"}, "threshold_ms": {"type": "number"},
        "enabled": {"type": "boolean"}}},
    "api.create_user": {"type": "object", "required": ["username", "password"], "properties": {
        "username": {"type": "string"}, "password": {"type": "string", "minLength": 8},
        "role": {"type": "string", "enum": ["viewer", "operator", "admin"]}}},
    "api.request_device_profile": {"type": "object", "required": ["model"], "properties": {
        "model": {"type": "string"}, "runs": {"type": "integer", "minimum": 1, "maximum": 200, "default": 30}}},
    "api.create_token": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
}


def build_document() -> dict:
    paths: dict = {}
    for rule in sorted(current_app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.rule.startswith("/api/v1") or rule.endpoint == "api.openapi":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        view = current_app.view_functions[rule.endpoint]
        doc = (view.__doc__ or rule.endpoint.split(".", 1)[1].replace("_", " ")).strip()
        role = getattr(view, "required_role", "viewer")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            params = [{"name": a, "in": "path", "required": True, "schema": {"type": "string"}}
                      for a in sorted(rule.arguments)]
            params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"},
                        "description": QUERY_DOC.get(q, "")} for q in QUERY.get(rule.endpoint, [])]
            op = {"operationId": rule.endpoint.split(".", 1)[1] + ("" if method in ("GET", "POST") else f"_{method.lower()}"),
                  "summary": doc.splitlines()[0], "description": doc + f"\n\nNeeds the {role} role.",
                  "parameters": params,
                  "responses": {"200": {"description": "OK", "content": {"application/json": {}}},
                                "401": {"$ref": "#/components/responses/Error"},
                                "403": {"$ref": "#/components/responses/Error"},
                                "404": {"$ref": "#/components/responses/Error"},
                                "400": {"$ref": "#/components/responses/Error"}}}
            if rule.endpoint in BODIES:
                op["requestBody"] = {"required": True,
                                     "content": {"application/json": {"schema": BODIES[rule.endpoint]}}}
            if rule.endpoint == "api.upload_package":
                op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}}}
                op["responses"]["422"] = {"$ref": "#/components/responses/Error"}
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "edgeopt dashboard API", "version": "1",
                 "description": "JSON twin of every dashboard page. Errors are {\"error\", \"message\"}."},
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}, {"cookieAuth": []}],
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "API token from 'edgeopt-dashboard create-token' or the tokens page"},
                "cookieAuth": {"type": "apiKey", "in": "cookie", "name": "session",
                               "description": "browser session; unsafe methods also need X-CSRFToken"}},
            "schemas": {"Error": {"type": "object", "required": ["error", "message"],
                                  "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}},
            "responses": {"Error": {"description": "Error", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Error"}}}}},
        },
        "paths": paths,
    }


@bp.get("/openapi.json")
def openapi():
    """This document."""
    return ok(build_document())
