"""The whole loop for a language model (issue 14), every part real: the SmolLM2 package built by the CLI ->
uploaded to the dashboard -> deployed to a device over MQTT (download, verify, golden-prompt self-test, switch)
-> streaming chat through the `openai` client and KServe generate on the device -> TTFT, time per output token,
tokens/s and KV-cache use through ingest into the dashboard -> rollback from the dashboard.

Processes: our own Mosquitto, `edgeopt-dashboard ingest`, `edgeopt-dashboard serve`, one `edgeopt-agent`;
SQLite (the text figures on PostgreSQL: tests/dashboard).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from agent_support import Broker, free_port, package_as_version, stop_processes, wait_for
from test_fleet_deploy import Api, _run

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _served(api_port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/models", timeout=5) as r:
            return json.load(r)["data"][0]["version"]
    except (urllib.error.URLError, OSError, KeyError, IndexError):
        return None


@pytest.mark.timeout(600)
def test_deploy_serve_watch_and_roll_back_a_language_model(tmp_path, slm_int8_package, keypair):
    pkgs = {"1.0.0": slm_int8_package[0],
            "1.1.0": package_as_version(slm_int8_package[0], tmp_path / "slm-1.1.0.eopkg", "1.1.0", keypair[0])}
    broker = Broker(tmp_path / "broker").start()
    procs: list[subprocess.Popen] = []
    web_port, api_port = free_port(), free_port()
    env = dict(os.environ, EDGEOPT_DATABASE_URL=f"sqlite:///{tmp_path / 'dash.db'}",
               EDGEOPT_INSTANCE_DIR=str(tmp_path / "web"), EDGEOPT_TRUSTED_KEYS=str(keypair[1]),
               EDGEOPT_BROKER_URL=broker.url, EDGEOPT_FLEET="lab", EDGEOPT_PUBLIC_URL=f"http://127.0.0.1:{web_port}")
    logs = tmp_path / "logs"
    logs.mkdir()

    def spawn(name, *args):
        fh = open(logs / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(a) for a in args], env=env, stdout=fh, stderr=subprocess.STDOUT))

    try:
        _run(BIN / "edgeopt-dashboard", "init-db", env=env)
        _run(BIN / "edgeopt-dashboard", "create-user", "ops", "--role", "operator", "--password", "s3cret-pass", env=env)
        token = _run(BIN / "edgeopt-dashboard", "create-token", "ops", env=env).stdout.strip().splitlines()[-1]
        spawn("ingest", BIN / "edgeopt-dashboard", "ingest", "--broker", broker.url, "--flush-ms", "50",
              "--heartbeat-check", "1", "--rollup-every", "2")
        spawn("web", BIN / "edgeopt-dashboard", "serve", "--port", web_port)
        command_pub = _run(BIN / "edgeopt-dashboard", "command-key", env=env).stdout.strip()
        cfg = tmp_path / "edge-1.toml"
        cfg.write_text(_run(BIN / "edgeopt", "agent", "init", "--device-id", "edge-1", "--fleet", "lab", "--broker",
                            broker.url, "--state-dir", tmp_path / "edge-1", "--api-port", api_port, "--trust-key",
                            keypair[1], "--telemetry-interval", "1", "--group", "slm", "--command-key", command_pub,
                            "--package-url", f"http://127.0.0.1:{web_port}/dl/").stdout)
        _run(BIN / "edgeopt", "agent", "install", pkgs["1.0.0"], "--config", cfg)
        spawn("edge-1", BIN / "edgeopt-agent", "--config", cfg)
        api = Api(web_port, token)
        wait_for(lambda: api.call("GET", "/healthz")[0] == 200, 60, interval=0.3, what="dashboard web")
        wait_for(lambda: _served(api_port) == "1.0.0", 120, interval=0.3, what="edge-1 serving slm 1.0.0")
        wait_for(lambda: api.call("GET", "/api/v1/devices/edge-1")[1].get("status") == "online", 60, interval=0.5,
                 what="edge-1 online on the dashboard")

        api.upload(pkgs["1.0.0"])
        v2 = api.upload(pkgs["1.1.0"])
        status, dep = api.call("POST", "/api/v1/deployments", {"package_id": v2["id"], "target": {"group": "slm"}})
        assert status == 201, dep

        def deployment():
            return api.call("GET", f"/api/v1/deployments/{dep['id']}")[1]

        final = wait_for(lambda: (d := deployment()).get("state") in ("completed", "failed", "aborted") and d,
                         240, interval=0.5, what="the deployment to finish")
        assert final["state"] == "completed", json.dumps(final, indent=1)[:3000]
        assert _served(api_port) == "1.1.0"
        events = api.call("GET", "/api/v1/devices/edge-1/events")[1]["events"]
        assert {"download", "self_test", "switch", "install"} <= {e["kind"] for e in events
                                                                  if e.get("deployment_id") == dep["id"]}

        # traffic on the device: streamed chat through the OpenAI client, KServe generate
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="slm", stream=True, max_tokens=16,
                messages=[{"role": "user", "content": "What is the capital of France?"}]) if c.choices)
            assert "Paris" in text
        req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v2/models/slm/generate", method="POST",
                                     data=json.dumps({"text_input": "The sea is", "parameters": {"max_tokens": 8}})
                                     .encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["model_version"] == "1.1.0"

        check_dashboard_text_figures(api)

        status, rb = api.call("POST", f"/api/v1/deployments/{dep['id']}/rollback")
        assert status == 200, rb
        wait_for(lambda: _served(api_port) == "1.0.0", 180, interval=0.5, what="edge-1 rolled back to 1.0.0")
        wait_for(lambda: deployment().get("state") == "rolled_back", 60, interval=0.5, what="rolled_back state")
    finally:
        stop_processes(procs)
        broker.stop()


def check_dashboard_text_figures(api: Api) -> None:
    """The device's text-generation figures as the dashboard's JSON API shows them, from the agent's telemetry
    through MQTT and ingest: TTFT and time per output token from the merged sketches, tokens/s, KV cache use;
    fleet-wide too."""

    def device_points():
        status, doc = api.call("GET", "/api/v1/devices/edge-1/series?range=1h&model=slm")
        if status != 200 or doc.get("text_models") != ["slm"]:
            return None
        pts = [p for p in doc["points"] if p["ttft_p95"] is not None and p["generated_tokens"]]
        return pts if sum(p["generated_tokens"] for p in pts) >= 3 * 8 else None

    pts = wait_for(device_points, 60, interval=0.5, what="the dashboard to show slm's text figures")
    assert all(0 < p["ttft_p50"] <= p["ttft_p95"] < 60_000 for p in pts)
    assert any(p["tpot_p50"] is not None and 0 < p["tpot_p50"] < 10_000 for p in pts)
    assert all(p["tokens_per_s"] > 0 for p in pts)
    assert any(p["kv_cache_peak"] is not None and 0 < p["kv_cache_peak"] <= 1 for p in pts)

    def fleet_points():  # from the fleet rollup (ingest rolls up every 2 s here)
        status, doc = api.call("GET", "/api/v1/fleet/series?range=1h")
        return status == 200 and "slm" in doc.get("text_models", []) and [
            p for p in doc["points"] if p["ttft_p95"] is not None and p["tokens_per_s"]]

    assert wait_for(fleet_points, 60, interval=0.5, what="fleet-wide text figures")
