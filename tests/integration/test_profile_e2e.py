"""On-device profile from the dashboard, every part real: a package built by the real CLI (with its host
profile in the manifest) installed on a real agent daemon; headless Chromium clicks "Profile on device" on
the device page -> the web app signs and publishes the ``profile`` command on Mosquitto -> the agent profiles
while it keeps serving -> its ``profile`` event comes back through the ingest -> the page shows the top
layers, the comparison with the host profile, and the trace downloads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent_support import Broker, free_port, infer, wait_for

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "tests" / "assets" / "digits"
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _run(*args, env=None):
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode:
        raise AssertionError(f"{args[0]} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


@pytest.mark.timeout(300)
def test_profile_on_device_button_to_table_and_trace(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (the browser tests need it)")
    from playwright.sync_api import sync_playwright

    keys, pkg = tmp_path / "keys", tmp_path / "digits.eopkg"
    _run(BIN / "edgeopt", "keygen", "--out", keys)
    _run(BIN / "edgeopt", "package", DIGITS / "digits_cnn.onnx", "--calib", DIGITS / "digits_calib.npz", "--heldout",
         DIGITS / "digits_heldout.npz", "--runtime", "onnxruntime", "--sign-key", keys / "edgeopt.key", "--name",
         "digits", "--iterations", "5", "-o", pkg)
    broker = Broker(tmp_path / "broker").start()
    procs: list[subprocess.Popen] = []
    web_port, api_port = free_port(), free_port()
    env = dict(os.environ, EDGEOPT_DATABASE_URL=f"sqlite:///{tmp_path / 'dash.db'}",
               EDGEOPT_INSTANCE_DIR=str(tmp_path / "web"), EDGEOPT_TRUSTED_KEYS=str(keys / "edgeopt.pub"),
               EDGEOPT_BROKER_URL=broker.url, EDGEOPT_FLEET="plant-a",
               EDGEOPT_PUBLIC_URL=f"http://127.0.0.1:{web_port}")
    try:
        _run(BIN / "edgeopt-dashboard", "init-db", env=env)
        _run(BIN / "edgeopt-dashboard", "create-user", "ops", "--role", "operator", "--password", "s3cret-pass",
             env=env)
        token = _run(BIN / "edgeopt-dashboard", "create-token", "ops", env=env).stdout.strip().splitlines()[-1]
        logs = tmp_path / "logs"
        logs.mkdir()

        def spawn(name, *args):
            fh = open(logs / f"{name}.log", "w")
            procs.append(subprocess.Popen([str(a) for a in args], env=env, stdout=fh, stderr=subprocess.STDOUT))

        spawn("ingest", BIN / "edgeopt-dashboard", "ingest", "--broker", broker.url, "--flush-ms", "50")
        spawn("web", BIN / "edgeopt-dashboard", "serve", "--port", web_port)
        command_pub = _run(BIN / "edgeopt-dashboard", "command-key", env=env).stdout.strip()
        cfg = tmp_path / "cam-01.toml"
        cfg.write_text(_run(BIN / "edgeopt", "agent", "init", "--device-id", "cam-01", "--fleet", "plant-a",
                            "--broker", broker.url, "--state-dir", tmp_path / "cam-01", "--api-port", api_port,
                            "--trust-key", keys / "edgeopt.pub", "--telemetry-interval", "1", "--command-key",
                            command_pub).stdout)
        _run(BIN / "edgeopt", "agent", "install", pkg, "--config", cfg)
        spawn("agent", BIN / "edgeopt-agent", "--config", cfg)
        base = f"http://127.0.0.1:{web_port}"

        def api(path):
            req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.read()
            except OSError:
                return 0, b""

        wait_for(lambda: api("/healthz")[0] == 200, 60, interval=0.3, what="dashboard web")
        wait_for(lambda: any(p["name"] == "digits" for p in json.loads(api("/api/v1/devices/cam-01")[1] or b"{}")
                             .get("packages", [])), 60, interval=0.3, what="cam-01 online with digits")

        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(str(tmp_path / "chromium"), executable_path=CHROMIUM,
                                                       args=FLAGS, headless=True, accept_downloads=True)
            page = ctx.new_page()
            page.goto(base + "/login")
            page.fill("#username", "ops")
            page.fill("#password", "s3cret-pass")
            page.click("button[type=submit]")
            page.wait_for_url(base + "/fleet")
            page.goto(base + "/devices/cam-01")
            page.click("#device-profile-link")
            page.wait_for_url(base + "/devices/cam-01/profile")
            assert page.locator("#profile-none").count() == 1
            page.select_option("#profile-model", "digits")
            page.click("#profile-start")
            page.wait_for_url(base + "/devices/cam-01/profile")
            assert "profile requested" in page.inner_text(".flash")
            # The service goes on while the agent profiles: the local API answers throughout.
            x = np.load(DIGITS / "digits_heldout.npz")["images"][:1]
            assert infer(("127.0.0.1", api_port), x)[0] == 200

            def shown():
                page.reload()
                return page.locator("#profile-top tbody tr").count() > 0

            wait_for(shown, 90, interval=1.0, what="the profile table on the device page")
            rows = page.locator("#profile-top tbody tr")
            assert rows.count() == 12  # every layer of the int8 digits graph as ORT runs it (top 15)
            assert "QLinearConv" in page.inner_text("#profile-top") and "int8" in page.inner_text("#profile-top")
            assert float(page.inner_text("#profile-layer-sum")) > 0
            assert "host" in page.inner_text("#profile-comparison")
            with page.expect_download() as dl:
                page.click("#trace-download")
            trace = json.loads(Path(dl.value.path()).read_text())
            assert any(e.get("cat") == "QLinearConv" for e in trace["traceEvents"])
            ARTIFACTS = ROOT / "test-artifacts"
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "device-profile.png"), full_page=True)
            ctx.close()
        status, body = api("/api/v1/devices/cam-01/profiles")
        prof = json.loads(body)["profiles"][0]
        assert status == 200 and prof["model"] == "digits" and prof["bounds"]["threads"] == 1
        assert prof["comparison"]["baseline_total_ms"] > 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
