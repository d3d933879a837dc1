"""The JSON API: every page's twin, errors as {"error", "message"}, OpenAPI, alert rules and alerts."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from dashboard_web_fixtures import (api_token, app, bearer, client, db, ingest, seed_fleet, trusted_keys)  # noqa: F401


@pytest.fixture
def viewer(app):
    return bearer(api_token(app, "viewer"))


@pytest.fixture
def operator(app):
    return bearer(api_token(app, "operator"))


def test_openapi_lists_every_api_route(app, client, viewer):
    doc = client.get("/api/v1/openapi.json", headers=viewer).get_json()
    listed = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1") and rule.endpoint != "api.openapi":
            path = rule.rule.replace("<int:", "{").replace("<", "{").replace(">", "}")
            for m in rule.methods - {"HEAD", "OPTIONS"}:
                assert (path, m) in listed, (path, m)
    op = doc["paths"]["/api/v1/deployments"]["post"]
    assert "operator" in op["description"] and op["requestBody"]["content"]["application/json"]["schema"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_fleet_summary_and_series(app, client, viewer):
    devices = seed_fleet(app, n=3, minutes=20)
    s = client.get("/api/v1/fleet", headers=viewer).get_json()
    assert (s["devices"], s["online"], s["offline"]) == (3, 3, 0)
    assert s["profiles"] == [{"profile": "cpu", "devices": 3}]
    assert s["package_versions"] == [{"name": "digits", "version": "1.0.0", "devices": 3}]
    # Slowest first: the simulated medians grow with the device number.
    assert [d["device_id"] for d in s["slowest"]] == ["edge-002", "edge-001", "edge-000"]
    series = client.get("/api/v1/fleet/series?range=1h", headers=viewer).get_json()
    assert series["range"] == "1h" and len(series["points"]) >= 15
    p = series["points"][-2]
    assert p["p50"] < p["p95"] < p["p99"] and p["requests"] > 0
    assert len(devices) == 3


def test_device_list_search_filter_sort_page(app, client, viewer):
    seed_fleet(app, n=5, minutes=2)
    r = client.get("/api/v1/devices?per_page=2&page=2&sort=device_id&order=desc", headers=viewer).get_json()
    assert r["total"] == 5 and r["pages"] == 3
    assert [d["device_id"] for d in r["items"]] == ["edge-002", "edge-001"]
    r = client.get("/api/v1/devices?q=EDGE-00&status=online&profile=cpu&group=line-1&package=digits@1.0.0",
                   headers=viewer).get_json()
    assert r["total"] == 5
    assert client.get("/api/v1/devices?package=digits@9", headers=viewer).get_json()["total"] == 0
    assert client.get("/api/v1/devices?q=004", headers=viewer).get_json()["items"][0]["device_id"] == "edge-004"


def test_device_detail_series_and_events(app, client, viewer):
    seed_fleet(app, n=1, minutes=10)
    d = client.get("/api/v1/devices/edge-000", headers=viewer).get_json()
    assert d["status"] == "online" and d["capabilities"]["cpu_flags"] == ["avx2"]
    assert d["packages"][0]["name"] == "digits"
    s = client.get("/api/v1/devices/edge-000/series?range=1h", headers=viewer).get_json()
    assert s["resolution"] == "raw" and len(s["points"]) == 20
    assert all(p["p95"] is not None and p["cpu_percent"] is not None for p in s["points"])
    assert sum(s["batch_sizes"].values()) == sum(p["requests"] for p in s["points"])
    s24 = client.get("/api/v1/devices/edge-000/series?range=24h", headers=viewer).get_json()
    # 24 h reads the 1-minute rollups (3-minute steps at most 500 points): same requests as the raw rows.
    assert s24["resolution"] == "1m" and s24["step_s"] == 180 and len(s24["points"]) >= 3
    assert sum(p["requests"] for p in s24["points"]) == sum(p["requests"] for p in s["points"])
    ev = client.get("/api/v1/devices/edge-000/events", headers=viewer).get_json()
    assert ev["device_id"] == "edge-000"
    assert [(e["kind"], e["ok"]) for e in ev["events"]] == [("online", True)]  # the birth, logged by the ingest


def test_chart_data_as_csv(app, client, viewer):
    """Every chart's data is downloadable: the series endpoints answer format=csv, same points as JSON."""
    import csv
    import io

    seed_fleet(app, n=2, minutes=10)
    for url in ("/api/v1/devices/edge-001/series?range=1h", "/api/v1/fleet/series?range=1h"):
        js = client.get(url, headers=viewer).get_json()
        resp = client.get(url + "&format=csv", headers=viewer)
        assert resp.status_code == 200 and resp.mimetype == "text/csv"
        assert resp.headers["Content-Disposition"].startswith("attachment; filename=")
        rows = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))
        assert len(rows) == len(js["points"]) > 0
        for row, p in zip(rows, js["points"]):
            # (t moves by the milliseconds between the two requests: a range ends at "now")
            assert row["t"].endswith("Z") and float(row["p95"]) == p["p95"] and int(row["requests"]) == p["requests"]
    assert "cpu_percent" in rows[0] or "devices" in rows[0]


@pytest.mark.parametrize("url, status, error, message", [
    ("/api/v1/devices/edge-000/series?format=xlsx", 400, "invalid_input",
     "unknown format 'xlsx'; expected one of json, csv"),
    ("/api/v1/devices/nope", 404, "not_found", "no device 'nope'"),
    ("/api/v1/devices/nope/series", 404, "not_found", "no device 'nope'"),
    ("/api/v1/devices/edge-000/series?range=2y", 400, "invalid_input",
     "unknown range '2y'; expected one of 1h, 6h, 24h, 7d, 30d"),
    ("/api/v1/devices?sort=color", 400, "invalid_input",
     "unknown sort key 'color'; expected one of device_id, status, profile, last_seen, p95, agent_version"),
    ("/api/v1/devices?page=zero", 400, "invalid_input", "page and per_page must be whole numbers"),
    ("/api/v1/devices?status=sleeping", 400, "invalid_input", "status must be online or offline, found 'sleeping'"),
    ("/api/v1/packages/42", 404, "not_found", "no package with id 42"),
    ("/api/v1/deployments/abc", 404, "not_found", "no deployment 'abc'"),
    ("/api/v1/alerts?state=maybe", 400, "invalid_input", "state must be open, resolved or all, found 'maybe'"),
    ("/api/v1/no-such-thing", 404, "not_found", None),
])
def test_api_errors_are_json(app, client, viewer, url, status, error, message):
    seed_fleet(app, n=1, minutes=1)
    resp = client.get(url, headers=viewer)
    assert resp.status_code == status
    body = resp.get_json()
    assert set(body) == {"error", "message"} and body["error"] == error
    if message:
        assert body["message"] == message


def test_method_not_allowed_is_json(client, viewer):
    resp = client.put("/api/v1/fleet", headers=viewer)
    assert resp.status_code == 405 and resp.get_json()["error"] == "method_not_allowed"


def test_alert_rules_crud_and_validation(client, operator):
    bad = [({"name": "x", "kind": "bogus"}, "unknown alert kind 'bogus'; expected one of offline, p95_slo, install_failure, placement"),
           ({"name": "x", "kind": "offline"}, "an offline rule needs threshold_minutes (how long offline before alerting)"),
           ({"name": "x", "kind": "p95_slo", "threshold_ms": -1}, "threshold_ms must be above 0, found -1"),
           ({"kind": "offline", "threshold_minutes": 1}, "rule name is required (at most 128 characters)")]
    for body, message in bad:
        resp = client.post("/api/v1/alert-rules", json=body, headers=operator)
        assert resp.status_code == 400 and resp.get_json()["message"] == message
    rule = client.post("/api/v1/alert-rules", json={"name": "slo", "kind": "p95_slo", "model": "digits",
                                                     "threshold_ms": 20}, headers=operator).get_json()
    resp = client.patch(f"/api/v1/alert-rules/{rule['id']}", json={"threshold_ms": 25, "enabled": False},
                        headers=operator)
    assert resp.get_json()["threshold_ms"] == 25 and resp.get_json()["enabled"] is False
    assert client.get("/api/v1/alert-rules", headers=operator).get_json()["rules"][0]["name"] == "slo"
    assert client.delete(f"/api/v1/alert-rules/{rule['id']}", headers=operator).get_json() == {"deleted": rule["id"]}
    assert client.get("/api/v1/alert-rules", headers=operator).get_json()["rules"] == []


def test_placement_alert_opens_on_a_mismatch_and_resolves_on_a_clean_install(app, client, operator):
    """The agent's placement check (event ``placement`` ok=False, or an install whose details say the
    placement did not match) opens a placement alert; a later install that matches resolves it."""
    from edgeopt.dashboard.alerting import evaluate
    from edgeopt.dashboard.simulate import SimDevice
    from edgeopt.sdk.telemetry import EventPayload

    devices = seed_fleet(app, n=2, minutes=1)
    assert client.post("/api/v1/alert-rules", json={"name": "placement", "kind": "placement"},
                       headers=operator).status_code == 201
    d: SimDevice = devices[0]
    msg = "5 compute layers ran in bf16, the package is fp32 (/0/Conv/WithoutBiases, ...)"

    def send(**kw):
        ev = EventPayload(device_id=d.device_id, session_id=d.session_id, seq=d.next_seq(), model="digits", **kw)
        ingest(app.extensions["edgeopt_engine"], [(d.topic("events"), ev.to_json())])
        with app.extensions["edgeopt_sessionmaker"]() as s:
            return evaluate(s)

    send(event="placement", ok=False, version="1.1.0", message=msg, details={"ok": False})
    assert send(event="install", ok=True, version="1.1.0",
                details={"placement": {"ok": False, "message": msg}})["resolved"] == 0
    alerts = client.get("/api/v1/alerts", headers=operator).get_json()["alerts"]
    assert [(a["rule"], a["device_id"]) for a in alerts] == [("placement", d.device_id)]
    assert alerts[0]["message"] == f"{d.device_id}: digits 1.1.0 does not run as its package says: {msg}"
    assert send(event="install", ok=True, version="1.2.0",
                details={"placement": {"ok": True, "message": "all 20 nodes on CPU"}})["resolved"] == 1


def test_alerts_open_and_resolve(app, client, operator, db):
    """offline > N min, p95 over the model's SLO (from merged histograms), failed install."""
    from edgeopt.dashboard.alerting import evaluate
    from edgeopt.dashboard.models import Device
    from edgeopt.dashboard.simulate import SimDevice
    from edgeopt.sdk.telemetry import EventPayload
    from sqlalchemy import select

    devices = seed_fleet(app, n=3, minutes=3)
    for body in ({"name": "offline 10 min", "kind": "offline", "threshold_minutes": 10},
                 {"name": "digits SLO", "kind": "p95_slo", "model": "digits", "threshold_ms": 6.0},
                 {"name": "installs", "kind": "install_failure"}):
        assert client.post("/api/v1/alert-rules", json=body, headers=operator).status_code == 201
    # edge-000 went offline an hour ago.
    dev = db.scalar(select(Device).where(Device.device_id == "edge-000"))
    dev.status, dev.status_changed_at = "offline", datetime.now(timezone.utc) - timedelta(hours=1)
    db.commit()
    # edge-001 reports a failed self-test.
    d1: SimDevice = devices[1]
    ev = EventPayload(device_id=d1.device_id, session_id=d1.session_id, seq=d1.next_seq(), event="self_test", ok=False,
                      model="digits", version="1.1.0", message="cosine 0.41 below 0.99")
    ingest(app.extensions["edgeopt_engine"], [(d1.topic("events"), ev.to_json())])
    with app.extensions["edgeopt_sessionmaker"]() as s:
        evaluate(s)
    alerts = client.get("/api/v1/alerts", headers=operator).get_json()["alerts"]
    by_rule = {}
    for a in alerts:
        by_rule.setdefault(a["rule"], []).append(a)
    assert [a["device_id"] for a in by_rule["offline 10 min"]] == ["edge-000"]
    assert "offline for 60 min (limit 10 min)" in by_rule["offline 10 min"][0]["message"]
    assert [a["device_id"] for a in by_rule["installs"]] == ["edge-001"]
    assert by_rule["installs"][0]["message"] == "edge-001: self_test of digits 1.1.0 failed: cosine 0.41 below 0.99"
    # The simulated p95 of a lognormal(median m, sigma 0.5) is m*e^(1.645*0.5) = 2.27 m: edge-000
    # (m=2 -> ~4.5 ms) keeps the 6 ms SLO, edge-001 (m=6 -> ~14 ms) and edge-002 (m=18) break it.
    slo = {a["device_id"]: a["value"] for a in by_rule["digits SLO"]}
    assert sorted(slo) == ["edge-001", "edge-002"]
    assert slo["edge-001"] == pytest.approx(6.0 * np.exp(1.645 * 0.5), rel=0.35)
    # The device returns and installs fine: both alerts resolve.
    dev.status = "online"
    db.commit()
    ok = EventPayload(device_id=d1.device_id, session_id=d1.session_id, seq=d1.next_seq(), event="switch", ok=True,
                      model="digits", version="1.0.0")
    ingest(app.extensions["edgeopt_engine"], [(d1.topic("events"), ok.to_json())])
    with app.extensions["edgeopt_sessionmaker"]() as s:
        assert evaluate(s)["resolved"] == 2
    resolved = client.get("/api/v1/alerts?state=resolved", headers=operator).get_json()["alerts"]
    assert {a["rule"] for a in resolved} == {"offline 10 min", "installs"}


def test_users_api(client, app):
    admin = bearer(api_token(app, "admin"))
    resp = client.post("/api/v1/users", json={"username": "eve", "password": "short"}, headers=admin)
    assert resp.get_json()["message"] == "password must be at least 8 characters, got 5"
    resp = client.post("/api/v1/users", json={"username": "eve", "password": "long-enough", "role": "root"},
                       headers=admin)
    assert resp.get_json()["message"] == "unknown role 'root'; expected one of viewer, operator, admin"
    eve = client.post("/api/v1/users", json={"username": "eve", "password": "long-enough", "role": "operator"},
                      headers=admin).get_json()
    assert client.patch(f"/api/v1/users/{eve['id']}", json={"active": False}, headers=admin).get_json()["active"] is False
    names = [u["username"] for u in client.get("/api/v1/users", headers=admin).get_json()["users"]]
    assert names == ["admin", "eve", "operator", "viewer"]
    tok = client.post("/api/v1/tokens", json={"name": "script"}, headers=admin).get_json()
    assert tok["token"].startswith("eot_") and client.get("/api/v1/me", headers=bearer(tok["token"])).status_code == 200
