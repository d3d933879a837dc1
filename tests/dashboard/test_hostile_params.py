"""Hostile parameters on every route give a 4xx, never a 500 (issue 9), on SQLite and PostgreSQL.

Seen before the fix: ``page=10^20`` overflowed the query's OFFSET (PostgreSQL "bigint out of range",
SQLite OverflowError), ids past INTEGER in ``/packages/<id>`` overflowed, and a NUL byte anywhere in a
path, query, form or JSON value made psycopg raise DataError: all 500s. The app runs with TESTING=True,
so an unhandled error raises in the test instead of hiding behind a 500 page.
"""
from __future__ import annotations

import pytest

from dashboard_web_fixtures import (PASSWORD, api_token, app, bearer, client, csrf_token, db, login,  # noqa: F401
                                    seed_fleet, trusted_keys)

HUGE = "1" + "0" * 20  # 10^20
NUL = "a\x00b"
# Every query parameter a page or API route reads.
QUERY_NAMES = ("page", "per_page", "q", "status", "profile", "group", "package", "sort", "order", "range",
               "model", "limit", "before_id", "slowest", "state", "package_id", "devices")


def _get_routes(app) -> list[tuple[str, list[str]]]:
    rules = [r for r in app.url_map.iter_rules() if "GET" in r.methods and r.endpoint != "static"]
    assert len(rules) > 20, "the route list looks incomplete"
    return [(r.rule, list(r.arguments)) for r in rules]


def _fill(rule: str, args: list[str], value: str) -> str:
    for a in args:
        rule = rule.replace(f"<int:{a}>", HUGE if value != NUL else "1").replace(f"<{a}>", value)
    return rule


def _check(resp, path: str) -> None:
    assert 400 <= resp.status_code < 500, (path, resp.status_code)
    if path.startswith("/api/"):
        body = resp.get_json()
        assert set(body) == {"error", "message"} and body["message"], (path, body)


def test_every_get_route_refuses_hostile_parameters(app, client):
    seed_fleet(app, n=2, minutes=5)
    headers = bearer(api_token(app, "admin"))
    checked = 0
    for rule, args in _get_routes(app):
        for value in (HUGE, NUL, "-" + HUGE):
            path = _fill(rule, args, value if args else "edge-000")
            if args:  # the hostile path parameter alone
                resp = client.get(path, headers=headers)
                assert resp.status_code < 500, (path, resp.status_code)
                if resp.status_code >= 400:
                    _check(resp, path)
            for name in QUERY_NAMES:
                resp = client.get(path if args else rule, query_string={name: value}, headers=headers)
                assert resp.status_code < 500, (path, name, resp.status_code)
                if resp.status_code >= 400:
                    _check(resp, path if args else rule)
                checked += 1
    assert checked > 1000


@pytest.mark.parametrize("query, message", [
    ({"page": HUGE}, f"page must be between 1 and 1000000, found {int(HUGE)}"),
    ({"page": "0"}, "page must be between 1 and 1000000, found 0"),
    ({"q": NUL}, "query parameter 'q' contains a NUL character (\\x00), which is not allowed"),
    ({"status": NUL}, "query parameter 'status' contains a NUL character (\\x00), which is not allowed"),
])
def test_device_list_api_answers_400_with_the_api_shape(app, client, query, message):
    resp = client.get("/api/v1/devices", query_string=query, headers=bearer(api_token(app, "viewer")))
    assert resp.status_code == 400
    assert resp.get_json()["message"] == message
    assert set(resp.get_json()) == {"error", "message"}


def test_device_list_page_answers_400(app, client):
    login(client, "viewer")
    resp = client.get("/devices", query_string={"page": HUGE})
    assert resp.status_code == 400 and "page must be between 1 and 1000000" in resp.get_data(as_text=True)
    resp = client.get("/devices", query_string={"q": NUL})
    assert resp.status_code == 400 and "contains a NUL character" in resp.get_data(as_text=True)


def test_events_before_id_past_integer_is_400(app, client):
    seed_fleet(app, n=1, minutes=2)
    resp = client.get("/api/v1/devices/edge-000/events", query_string={"before_id": HUGE},
                      headers=bearer(api_token(app, "viewer")))
    assert resp.status_code == 400
    assert resp.get_json() == {"error": "bad_request",
                               "message": f"before_id must be between 1 and 2147483647, found {HUGE}"}


def test_package_id_past_integer_is_404(app, client):
    resp = client.get(f"/api/v1/packages/{HUGE}", headers=bearer(api_token(app, "viewer")))
    assert resp.status_code == 404 and set(resp.get_json()) == {"error", "message"}


def test_device_id_with_nul_in_the_path_is_400(app, client):
    resp = client.get("/api/v1/devices/a%00b", headers=bearer(api_token(app, "viewer")))
    assert resp.status_code == 400
    assert resp.get_json()["message"] == "the URL path contains a NUL character (\\x00), which is not allowed"


def test_login_form_with_nul_is_400_not_500(client):
    page = client.get("/login")
    resp = client.post("/login", data={"username": "admin\x00", "password": PASSWORD,
                                       "csrf_token": csrf_token(page.get_data(as_text=True))})
    assert resp.status_code == 400


@pytest.mark.parametrize("body, message", [
    ('{"name": "r\\u0000", "kind": "offline", "threshold_minutes": 5}',
     "a JSON string in the body contains a NUL character (\\u0000), which is not allowed"),
    ('{"na\\u0000me": 1}', "a JSON string in the body contains a NUL character (\\u0000), which is not allowed"),
    ("[" * 100_000 + "]" * 100_000, "the JSON body is nested too deeply"),
])
def test_api_json_bodies_with_nul_or_deep_nesting_are_400(app, client, body, message):
    resp = client.post("/api/v1/alert-rules", data=body, content_type="application/json",
                       headers=bearer(api_token(app, "operator")))
    assert resp.status_code == 400, resp.get_data(as_text=True)[:300]
    assert resp.get_json()["message"] == message
