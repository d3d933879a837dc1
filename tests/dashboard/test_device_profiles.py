"""Device profiles on the dashboard: the profile event shown on the page and API, the trace served with a
bound, and the `profile` command refused for a model the device does not have. (The whole flow with a real
agent and Chromium is tests/integration/test_profile_e2e.py.)"""
from __future__ import annotations

import base64
import gzip
import json

from dashboard_web_fixtures import (api_token, app, bearer, client, db, ingest, seed_fleet, trusted_keys)  # noqa: F401


def _send_profile(app, dev, trace: bytes | None, **extra):
    from edgeopt.sdk.telemetry import EventPayload

    details = {"profile": {"runtime": "onnxruntime", "runs": 5, "layer_sum_ms": 0.07, "device": "CPU",
                           "top_layers": [{"name": "/0/Conv_token_1", "op_type": "QLinearConv", "precision": "int8",
                                           "median_us": 11.0, "share": 0.2, "source_nodes": ["/0/Conv"]}]},
               "comparison": {"baseline_total_ms": 0.06, "total_ms": 0.07, "slower": ["/0/Conv"], "faster": [],
                              "precision_changed": [], "silent_precision": []}, **extra}
    if trace is not None:
        details["trace_gz_b64"] = base64.b64encode(gzip.compress(trace)).decode()
    ev = EventPayload(device_id=dev.device_id, session_id=dev.session_id, seq=dev.next_seq(), event="profile",
                      model="digits", version="1.0.0", message="profile", details=details)
    ingest(app.extensions["edgeopt_engine"], [(dev.topic("events"), ev.to_json())])


def test_profile_page_api_and_trace(app, client):
    devices = seed_fleet(app, n=1, minutes=1)
    dev = devices[0]
    viewer = bearer(api_token(app, "viewer"))
    assert client.get(f"/api/v1/devices/{dev.device_id}/profiles", headers=viewer).get_json()["profiles"] == []
    trace = json.dumps({"traceEvents": [{"name": "/0/Conv_token_1", "ph": "X", "ts": 0, "dur": 11}]}).encode()
    _send_profile(app, dev, trace)
    doc = client.get(f"/api/v1/devices/{dev.device_id}/profiles", headers=viewer).get_json()
    (prof,) = doc["profiles"]
    assert prof["has_trace"] and prof["profile"]["top_layers"][0]["op_type"] == "QLinearConv"
    resp = client.get(f"/devices/{dev.device_id}/profile/{prof['id']}/trace.json", headers=viewer)
    assert resp.status_code == 200 and resp.data == trace
    assert "attachment" in resp.headers["Content-Disposition"]
    assert client.get(f"/devices/{dev.device_id}/profile/999999/trace.json", headers=viewer).status_code == 404


def test_a_gzip_bomb_trace_is_refused(app, client):
    dev = seed_fleet(app, n=1, minutes=1)[0]
    viewer = bearer(api_token(app, "viewer"))
    _send_profile(app, dev, None, trace_gz_b64=base64.b64encode(gzip.compress(b"\0" * (70 * 1024 * 1024))).decode())
    prof = client.get(f"/api/v1/devices/{dev.device_id}/profiles", headers=viewer).get_json()["profiles"][0]
    resp = client.get(f"/api/v1/devices/{dev.device_id}/profiles", headers=viewer)
    assert resp.status_code == 200
    resp = client.get(f"/devices/{dev.device_id}/profile/{prof['id']}/trace.json", headers=viewer)
    assert resp.status_code == 404 and b"inflates to more than 67108864 bytes" in resp.data


def test_profile_command_for_a_model_the_device_lacks_is_refused(app, client):
    dev = seed_fleet(app, n=1, minutes=1)[0]
    operator = bearer(api_token(app, "operator"))
    resp = client.post(f"/api/v1/devices/{dev.device_id}/profiles", json={"model": "nope"}, headers=operator)
    assert resp.status_code == 400 and resp.get_json()["message"].startswith(
        f"model 'nope' is not installed on {dev.device_id} (installed: ")
    resp = client.post(f"/api/v1/devices/{dev.device_id}/profiles", json={"model": "digits", "runs": 0},
                       headers=operator)
    assert resp.status_code == 400 and resp.get_json()["message"] == "runs must be between 1 and 200, found 0"
    resp = client.post(f"/api/v1/devices/{dev.device_id}/profiles", json=["x"], headers=operator)
    assert resp.status_code == 400 and "send a JSON object" in resp.get_json()["message"]
