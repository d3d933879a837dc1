"""Deployments with a real Mosquitto: commands seen by a plain paho subscriber, agent results written
through the real ingest code (and, end to end, through the real ingest process), staged rollout,
automatic stop, timeouts, abort, rollback, broker unreachable."""
from __future__ import annotations

import io
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from dashboard_web_fixtures import (api_token, app, bearer, client, db, ingest, login, make_package,  # noqa: F401
                                    page_token, seed_fleet, trusted_keys)

from edgeopt.sdk import topics
from edgeopt.sdk.telemetry import CommandPayload, CommandResultPayload, DeployArgs, SignedCommand


def decode(raw: bytes) -> CommandPayload:
    """The command inside a signed message (its signature is checked in test_commands_are_signed...)."""
    return CommandPayload.model_validate_json(SignedCommand.model_validate_json(raw).body)


def signer_of(app):
    """The app's command signer (the key in its instance folder), as the ingest process loads it."""
    from pathlib import Path

    from edgeopt.dashboard.command_signing import load_signer

    return load_signer(Path(app.instance_path))


class Subscriber:
    """A plain paho MQTT 5 client collecting every command sent to any device."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, CommandPayload]] = []
        self.raw: list[bytes] = []
        self.cv = threading.Condition()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.subscription("cmd"), qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10), "subscription not acknowledged"

    def _on_message(self, client, userdata, msg):
        with self.cv:
            self.raw.append(bytes(msg.payload))
            self.messages.append((msg.topic, decode(msg.payload)))
            self.cv.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[str, CommandPayload]]:
        deadline = time.monotonic() + timeout
        with self.cv:
            while len(self.messages) < n and time.monotonic() < deadline:
                self.cv.wait(deadline - time.monotonic())
            return list(self.messages)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker_app(app, mqtt_broker, tmp_path, trusted_keys):
    app.config["BROKER_URL"] = mqtt_broker.url
    seed_fleet(app, n=4, minutes=1)
    tok = api_token(app, "operator")
    path = make_package(tmp_path / "digits.eopkg", trusted_keys["key"], version="1.1.0")
    c = app.test_client()
    resp = c.post("/api/v1/packages", data={"file": (io.BytesIO(path.read_bytes()), path.name)},
                  headers=bearer(tok), content_type="multipart/form-data")
    assert resp.status_code == 201, resp.get_json()
    app.config["_pkg"] = resp.get_json()
    app.config["_token"] = tok
    return app


@pytest.fixture
def sub(mqtt_broker):
    s = Subscriber(mqtt_broker.port)
    yield s
    s.close()


_seq = [1000]


def agent_result(app, device_id: str, cmd: CommandPayload, status: str, message: str = "", fleet: str = "test"):
    """The agent's answer, written through the real ingest code path (parse + batch writer)."""
    _seq[0] += 1
    p = CommandResultPayload(device_id=device_id, session_id="agent-sess", seq=_seq[0], command_id=cmd.id,
                             command=cmd.command, ok=status in ("accepted", "succeeded"), status=status,
                             message=message, deployment_id=cmd.deployment_id)
    ingest(app.extensions["edgeopt_engine"], [(topics.topic(fleet, device_id, "cmd/result"), p.to_json())])


def tick(app, now=None, **kw):
    from edgeopt.dashboard.deployments import tick as do_tick
    from edgeopt.dashboard.mqtt_publish import mqtt_publisher

    with app.extensions["edgeopt_sessionmaker"]() as s, mqtt_publisher(app.config["BROKER_URL"]) as publish:
        return do_tick(s, publish, now, alerts=False, signer=signer_of(app), **kw)


def create(client, app, devices, stage_percent=100, threshold=0.2):
    return client.post("/api/v1/deployments", headers=bearer(app.config["_token"]), json={
        "package_id": app.config["_pkg"]["id"], "target": {"devices": devices},
        "stage_percent": stage_percent, "failure_threshold": threshold})


def get(client, app, dep_id):
    return client.get(f"/api/v1/deployments/{dep_id}", headers=bearer(app.config["_token"])).get_json()


def device_of(topic: str) -> str:
    return topics.parse(topic).device_id


def test_staged_rollout_advances_stage_by_stage(broker_app, client, sub):
    app = broker_app
    devices = [f"edge-{i:03d}" for i in range(4)]
    resp = create(client, app, devices, stage_percent=50, threshold=0.5)
    assert resp.status_code == 201, resp.get_json()
    dep = resp.get_json()
    assert dep["state"] == "running" and dep["counts"]["in_flight"] == 2 and dep["counts"]["pending"] == 2
    msgs = sub.wait_for(2)
    assert len(msgs) == 2
    stage1 = {device_of(t): c for t, c in msgs}
    assert set(stage1) == {"edge-000", "edge-001"}
    for t, cmd in msgs:
        assert cmd.command == "deploy" and cmd.deployment_id == dep["id"]
        args = DeployArgs.model_validate(cmd.args)
        assert args.sha256 == app.config["_pkg"]["sha256"] and args.version == "1.1.0"
        # The URL in the command downloads the package without any login.
        path = args.package_url.replace("http://dashboard.test", "")
        assert app.test_client().get(path).status_code == 200
    for dev, cmd in stage1.items():
        agent_result(app, dev, cmd, "accepted")
    tick(app)
    assert get(client, app, dep["id"])["counts"]["accepted"] == 2
    assert len(sub.wait_for(3, timeout=0.5)) == 2  # nothing new before stage 1 finished
    for dev, cmd in stage1.items():
        agent_result(app, dev, cmd, "succeeded", "switched to 1.1.0")
    tick(app)
    msgs = sub.wait_for(4)
    stage2 = {device_of(t): c for t, c in msgs[2:]}
    assert set(stage2) == {"edge-002", "edge-003"}
    d = get(client, app, dep["id"])
    assert d["current_stage"] == 2 and d["message"] == "stage 1 succeeded; stage 2 sent to 2 devices"
    for dev, cmd in stage2.items():
        agent_result(app, dev, cmd, "succeeded")
    tick(app)
    d = get(client, app, dep["id"])
    assert d["state"] == "completed" and d["message"] == "completed: 4 succeeded"
    assert [t["state"] for t in d["targets"]] == ["succeeded"] * 4
    assert d["active"] is False


def test_stops_by_itself_over_the_failure_share(broker_app, client, sub):
    app = broker_app
    dep = create(client, app, [f"edge-{i:03d}" for i in range(4)], stage_percent=50, threshold=0.2).get_json()
    msgs = sub.wait_for(2)
    (t1, c1), (t2, c2) = msgs
    agent_result(app, device_of(t1), c1, "failed", "self-test failed: cosine 0.41 < 0.99")
    agent_result(app, device_of(t2), c2, "succeeded")
    tick(app)
    d = get(client, app, dep["id"])
    assert d["state"] == "failed"
    assert d["message"] == "stopped automatically: 1 of 2 devices failed (50% > 20% allowed); 2 not sent"
    failed = [t for t in d["targets"] if t["state"] == "failed"]
    assert failed[0]["message"] == "self-test failed: cosine 0.41 < 0.99"
    tick(app)
    assert len(sub.wait_for(3, timeout=1.0)) == 2  # stage 2 never sent


def test_silent_devices_time_out(broker_app, client, sub):
    app = broker_app
    dep = create(client, app, ["edge-000"], threshold=0.5).get_json()
    sub.wait_for(1)
    tick(app, now=datetime.now(timezone.utc) + timedelta(seconds=901), timeout_s=900)
    d = get(client, app, dep["id"])
    assert d["targets"][0]["state"] == "failed"
    assert d["targets"][0]["message"] == "timed out: no result within 900 s of sending"
    assert d["state"] == "failed"


def test_abort_and_rollback_from_the_pages(broker_app, client, sub, db):
    app = broker_app
    login(client, "operator")
    tok = page_token(client, "/deployments/new")
    resp = client.post("/deployments", data={
        "csrf_token": tok, "package_id": str(app.config["_pkg"]["id"]), "target_kind": "group", "group": "line-1",
        "stage_percent": "50", "failure_threshold_percent": "50"}, follow_redirects=True)
    html = resp.get_data(as_text=True)
    assert "deployment started: stage 1 sent to 2 devices" in html
    dep_id = resp.request.path.rsplit("/", 1)[1]
    msgs = sub.wait_for(2)
    agent_result(app, device_of(msgs[0][0]), msgs[0][1], "succeeded")
    html = client.post(f"/deployments/{dep_id}/abort", data={"csrf_token": tok}, follow_redirects=True).get_data(as_text=True)
    assert "deployment aborted: nothing more will be sent" in html
    assert "not sent: deployment aborted" in html
    html = client.post(f"/deployments/{dep_id}/rollback", data={"csrf_token": tok},
                       follow_redirects=True).get_data(as_text=True)
    assert "rollback sent to 2 devices" in html
    rb = sub.wait_for(4)[2:]
    assert {c.command for _, c in rb} == {"rollback"} and all(c.args == {"model": "digits"} for _, c in rb)
    for t, c in rb:
        agent_result(app, device_of(t), c, "succeeded", "rolled back to 1.0.0")
    d = get(client, app, dep_id)
    assert d["state"] == "rolled_back"
    assert sorted(t["state"] for t in d["targets"]) == ["pending", "pending", "rolled_back", "rolled_back"]
    resp = client.post(f"/deployments/{dep_id}/abort", data={"csrf_token": tok}, follow_redirects=True)
    assert "deployment is rolled_back; only a running deployment can be aborted" in resp.get_data(as_text=True)


def test_broker_unreachable_is_recorded_and_shown(app, client, tmp_path, trusted_keys):
    seed_fleet(app, n=1, minutes=1)
    tok = api_token(app, "operator")
    path = make_package(tmp_path / "p.eopkg", trusted_keys["key"])
    pkg = client.post("/api/v1/packages", data={"file": (io.BytesIO(path.read_bytes()), path.name)},
                      headers=bearer(tok), content_type="multipart/form-data").get_json()
    resp = client.post("/api/v1/deployments", headers=bearer(tok),
                       json={"package_id": pkg["id"], "target": {"devices": ["edge-000"]}})
    d = resp.get_json()
    assert resp.status_code == 201 and d["state"] == "failed"
    assert d["message"].startswith("deploy commands not sent: MQTT broker mqtt://127.0.0.1:1 is unreachable:")
    assert d["targets"][0]["state"] == "pending"
    login(client, "viewer")
    html = client.get(f"/deployments/{d['id']}").get_data(as_text=True)
    assert "deploy commands not sent: MQTT broker mqtt://127.0.0.1:1 is unreachable" in html


def test_bad_deployment_requests(broker_app, client, sub):
    app = broker_app
    tok = bearer(app.config["_token"])
    pid = app.config["_pkg"]["id"]
    cases = [
        ({"package_id": pid, "target": {"devices": ["nope"]}}, "unknown device(s): nope (check the device ids)"),
        ({"package_id": pid, "target": {"devices": [" "]}}, "no device given: pick at least one device"),
        ({"package_id": pid, "target": {"group": "no-such"}}, "unknown group 'no-such'"),
        ({"package_id": pid, "target": {"tag": "none"}}, "tag 'none' has no devices"),
        ({"package_id": pid, "target": {"devices": ["edge-000"]}, "stage_percent": 0},
         "stage percentage must be between 1 and 100, got 0"),
        ({"package_id": pid, "target": {"devices": ["edge-000"]}, "failure_threshold": 2},
         "failure threshold must be a share between 0 and 1, got 2.0"),
        ({"package_id": 999, "target": {"devices": ["edge-000"]}}, "no package with id 999"),
        ({"package_id": pid, "target": {"fleet": "x"}},
         'target must be one of {"devices": [...]}, {"group": name} or {"tag": name}'),
    ]
    for body, message in cases:
        resp = client.post("/api/v1/deployments", headers=tok, json=body)
        assert resp.status_code == 400, body
        assert resp.get_json() == {"error": "invalid_input", "message": message}
    assert create(client, app, ["edge-000"]).status_code == 201
    resp = create(client, app, ["edge-000", "edge-001"])
    assert resp.get_json()["message"] == ("device(s) already in a running deployment: edge-000 "
                                          "(wait for it to finish or abort it first)")
    viewer = api_token(app, "viewer")
    assert client.post("/api/v1/deployments", headers=bearer(viewer), json={}).status_code == 403


def test_end_to_end_through_the_ingest_process(broker_app, client, mqtt_broker, db_url):
    """The real ingest process subscribes, stores the agent's results and calls tick(); a plain paho
    client plays the agent, answering every deploy command it receives."""
    import paho.mqtt.client as mqtt

    from edgeopt.dashboard.ingest import IngestService, IngestSettings

    app = broker_app
    service = IngestService(IngestSettings(broker=mqtt_broker.url, database_url=db_url, group="",
                                           tick_every_s=0.3, rollup_every_s=0, flush_ms=50),
                            signer=signer_of(app))
    service.start()
    agent = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-agent", protocol=mqtt.MQTTv5)
    seq = iter(range(1, 10_000))

    def on_message(c, u, msg):
        cmd = decode(msg.payload)
        dev = topics.parse(msg.topic).device_id
        for status in ("accepted", "succeeded"):
            r = CommandResultPayload(device_id=dev, session_id="e2e", seq=next(seq), command_id=cmd.id,
                                     command=cmd.command, ok=True, status=status, deployment_id=cmd.deployment_id)
            c.publish(topics.topic("test", dev, "cmd/result"), r.to_json(), qos=1)

    ready = threading.Event()
    agent.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.subscription("cmd"), qos=1)
    agent.on_subscribe = lambda *a: ready.set()
    agent.on_message = on_message
    agent.connect("127.0.0.1", mqtt_broker.port)
    agent.loop_start()
    try:
        assert ready.wait(10) and service.connected.wait(10)
        dep = create(client, app, [f"edge-{i:03d}" for i in range(4)], stage_percent=25, threshold=0.2).get_json()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            d = get(client, app, dep["id"])
            if d["state"] != "running":
                break
            time.sleep(0.2)
        assert d["state"] == "completed", d
        assert d["counts"]["succeeded"] == 4
    finally:
        agent.disconnect()
        agent.loop_stop()
        service.stop()


def test_agent_events_show_progress_and_a_failed_publish_is_retried(broker_app, client, sub):
    from edgeopt.dashboard.deployments import tick as do_tick
    from edgeopt.sdk.telemetry import EventPayload

    app = broker_app
    dep = create(client, app, ["edge-000", "edge-001"], stage_percent=50, threshold=0.5).get_json()
    (t, cmd), = sub.wait_for(1)
    ev = EventPayload(device_id="edge-000", session_id="agent-sess", seq=5000, event="download", ok=True,
                      message="downloaded 211 KiB", command_id=cmd.id, deployment_id=dep["id"])
    ingest(app.extensions["edgeopt_engine"], [(topics.topic("test", "edge-000", "events"), ev.to_json())])
    d = get(client, app, dep["id"])
    assert d["targets"][0]["state"] == "installing" and d["targets"][0]["message"] == "download: downloaded 211 KiB"
    agent_result(app, "edge-000", cmd, "succeeded")

    def broken(topic, payload):
        raise RuntimeError("ingest client is not running")

    with app.extensions["edgeopt_sessionmaker"]() as s:
        do_tick(s, broken, alerts=False, signer=signer_of(app))
    d = get(client, app, dep["id"])
    assert d["state"] == "running" and d["current_stage"] == 1
    assert d["message"].startswith("stage 2 not sent yet: publish to edgeopt/v1/test/edge-001/cmd failed: "
                                   "ingest client is not running")
    tick(app)  # the broker is back: the next tick sends stage 2
    assert device_of(sub.wait_for(2)[1][0]) == "edge-001"
    assert get(client, app, dep["id"])["current_stage"] == 2


def test_groups_api_lists_targets(broker_app, client):
    body = client.get("/api/v1/groups", headers=bearer(broker_app.config["_token"])).get_json()
    assert body == {"groups": [{"name": "line-1", "devices": 4}], "tags": [{"tag": "cam", "devices": 4}]}


def test_commands_are_signed_for_their_device_with_the_instance_key(broker_app, client, sub):
    """Every command leaves signed by the key in the instance folder, for its one device, valid 15 min."""
    from pathlib import Path

    from edgeopt.sdk.command_signing import CommandRefused, verify_command
    from edgeopt.sdk.package import load_public_key

    app = broker_app
    assert create(client, app, ["edge-000"]).status_code == 201
    (_, cmd), = sub.wait_for(1)
    public = load_public_key(Path(app.instance_path) / "command-signing.pub")
    got = verify_command(sub.raw[0], [public], fleet="test", device_id="edge-000")
    assert got == cmd and got.command == "deploy"
    assert (got.expires_at - got.issued_at).total_seconds() == 900
    with pytest.raises(CommandRefused) as err:
        verify_command(sub.raw[0], [public], fleet="test", device_id="edge-001")
    assert err.value.reason == "wrong_target"


def test_a_process_without_the_command_key_says_why_stage_2_waits(broker_app, client, sub):
    from edgeopt.dashboard.deployments import tick as do_tick
    from edgeopt.dashboard.mqtt_publish import mqtt_publisher

    app = broker_app
    dep = create(client, app, ["edge-000", "edge-001"], stage_percent=50, threshold=0.5).get_json()
    (_, cmd), = sub.wait_for(1)
    agent_result(app, "edge-000", cmd, "succeeded")
    with app.extensions["edgeopt_sessionmaker"]() as s, mqtt_publisher(app.config["BROKER_URL"]) as publish:
        do_tick(s, publish, alerts=False)
    d = get(client, app, dep["id"])
    assert d["state"] == "running" and d["current_stage"] == 1
    assert d["message"] == "stage 2 not sent yet: this process has no command-signing key (see EDGEOPT_COMMAND_KEY)"
