"""The whole product, every part real: SDK packages -> dashboard upload -> staged deployment over MQTT ->
two agents download, verify, self-test and switch -> events and telemetry back through ingest -> rollback.

Processes: our own Mosquitto, `edgeopt-dashboard ingest`, `edgeopt-dashboard serve`, two `edgeopt-agent`.
Database: SQLite, and PostgreSQL too when EDGEOPT_TEST_POSTGRES_URL is set (scripts/test.sh sets it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from agent_support import MOSQUITTO, Broker, free_port, stop_processes, wait_for

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "tests" / "assets" / "digits"
BIN = Path(sys.executable).parent


def _run(*args, env=None, check=True):
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)
    if check and out.returncode:
        raise AssertionError(f"{args[0]} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Two real signed cpu packages of the digits model, built by the real CLI."""
    d = tmp_path_factory.mktemp("pkgs")
    _run(BIN / "edgeopt", "keygen", "--out", d / "keys")
    out = {}
    for v in ("1.0.0", "1.1.0"):
        out[v] = d / f"digits-{v}.eopkg"
        _run(BIN / "edgeopt", "package", DIGITS / "digits_cnn.onnx", "--profile", "cpu", "--calib",
             DIGITS / "digits_calib.npz", "--heldout", DIGITS / "digits_heldout.npz", "--runtime", "onnxruntime",
             "--sign-key", d / "keys" / "edgeopt.key", "--name", "digits", "--version", v, "-o", out[v])
    return d / "keys", out


def _database_urls():
    urls = [pytest.param("sqlite", id="sqlite")]
    # Under CI the PostgreSQL variant always exists, so a missing server fails it instead of hiding it.
    if os.environ.get("EDGEOPT_TEST_POSTGRES_URL") or os.environ.get("CI") == "true":
        urls.append(pytest.param("postgresql", id="postgresql"))
    return urls


@pytest.fixture(params=_database_urls())
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dash.db'}"
        return
    import psycopg

    base = os.environ.get("EDGEOPT_TEST_POSTGRES_URL")
    if not base:
        pytest.fail("EDGEOPT_TEST_POSTGRES_URL is not set: scripts/test.sh sets it when PostgreSQL answers on "
                    "127.0.0.1:5432")
    name = f"edgeopt_e2e_{uuid.uuid4().hex[:10]}"
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield base.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Api:
    def __init__(self, port: int, token: str):
        self.base, self.token = f"http://127.0.0.1:{port}", token

    def call(self, method: str, path: str, body: dict | None = None, raw: bytes | None = None,
             content_type: str = "application/json"):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def upload(self, path: Path) -> dict:
        boundary = uuid.uuid4().hex
        raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n\r\n"
               ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        status, doc = self.call("POST", "/api/v1/packages", raw=raw,
                                content_type=f"multipart/form-data; boundary={boundary}")
        assert status == 201, doc
        return doc


def _served_version(api_port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v2/models/digits", timeout=5) as r:
            return json.load(r)["versions"][0]
    except (urllib.error.URLError, OSError, KeyError, IndexError):
        return None


class AclBroker:
    """Mosquitto running what `edgeopt-dashboard broker-config` wrote: TLS, one account per part, the ACL."""

    def __init__(self, workdir: Path, devices: list[str]):
        self.dir, self.port = Path(workdir), free_port()
        _run(BIN / "edgeopt-dashboard", "broker-config", "--out", self.dir, "--fleet", "plant-a",
             *[a for d in devices for a in ("--device", d)], "--tls-generate", "127.0.0.1", "--public-host",
             "127.0.0.1", "--port", self.port, "--bind", "127.0.0.1")
        self.ca = self.dir / "ca.pem"
        accounts = json.loads((self.dir / "credentials.json").read_text())["accounts"]
        self.pw = {user: account["password"] for user, account in accounts.items()}
        # `user root`: as root, mosquitto would switch to a user who cannot read pytest's tmp folders.
        self.conf = self.dir / "run.conf"
        self.conf.write_text("user root\n" + (self.dir / "mosquitto.conf").read_text())
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: _listening(self.port), 15, what="mosquitto with the broker-config configuration")

    def url(self, account: str | None = None) -> str:
        auth = f"{account}:{self.pw[account]}@" if account else ""
        return f"mqtts://{auth}127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_staged_deployment_and_rollback_across_all_parts(tmp_path, packages, database_url):
    _staged_deployment_and_rollback(tmp_path, packages, database_url, acl=False)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_same_through_broker_config_tls_accounts_and_acl(tmp_path, packages):
    """Every part with its own broker identity over TLS: agents as plant-a/<id>, ingest as edgeopt-ingest
    (reads only), web and later stages as edgeopt-dashboard (publishes commands only)."""
    _staged_deployment_and_rollback(tmp_path, packages, f"sqlite:///{tmp_path / 'dash.db'}", acl=True)


def _staged_deployment_and_rollback(tmp_path, packages, database_url, acl: bool):
    keys, pkgs = packages
    broker = AclBroker(tmp_path / "broker", ["cam-01", "cam-02"]) if acl else Broker(tmp_path / "broker").start()
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, EDGEOPT_DATABASE_URL=database_url, EDGEOPT_INSTANCE_DIR=str(tmp_path / "web"),
               EDGEOPT_TRUSTED_KEYS=str(keys / "edgeopt.pub"),
               EDGEOPT_BROKER_URL=broker.url("edgeopt-dashboard") if acl else broker.url,
               EDGEOPT_FLEET="plant-a")
    if acl:
        env["EDGEOPT_BROKER_CA"] = str(broker.ca)
    web_port = free_port()
    env["EDGEOPT_PUBLIC_URL"] = f"http://127.0.0.1:{web_port}"
    try:
        _run(BIN / "edgeopt-dashboard", "init-db", env=env)
        _run(BIN / "edgeopt-dashboard", "create-user", "ops", "--role", "operator", "--password", "s3cret-pass", env=env)
        token = _run(BIN / "edgeopt-dashboard", "create-token", "ops", env=env).stdout.strip().splitlines()[-1]
        logs = tmp_path / "logs"
        logs.mkdir()

        def spawn(name, *args):
            fh = open(logs / f"{name}.log", "w")
            procs.append(subprocess.Popen([str(a) for a in args], env=env, stdout=fh, stderr=subprocess.STDOUT))

        spawn("ingest", BIN / "edgeopt-dashboard", "ingest", "--broker",
              broker.url("edgeopt-ingest") if acl else broker.url, "--flush-ms", "50", "--heartbeat-check", "1")
        spawn("web", BIN / "edgeopt-dashboard", "serve", "--port", web_port)

        # The dashboard's command-signing public key, created now (the documented order: agents trust it
        # before the first command is sent).
        command_pub = _run(BIN / "edgeopt-dashboard", "command-key", env=env).stdout.strip()
        agents = {}
        for dev in ("cam-01", "cam-02"):
            api_port = free_port()
            cfg = tmp_path / f"{dev}.toml"
            account = (["--broker-ca", broker.ca, "--broker-username", f"plant-a/{dev}", "--broker-password",
                        broker.pw[f"plant-a/{dev}"]] if acl else [])
            cfg.write_text(_run(BIN / "edgeopt", "agent", "init", "--device-id", dev, "--fleet", "plant-a",
                                "--broker", broker.url() if acl else broker.url, "--state-dir", tmp_path / dev,
                                "--api-port", api_port, "--trust-key", keys / "edgeopt.pub",
                                "--telemetry-interval", "1", "--group", "line-1", "--command-key", command_pub,
                                "--package-url", f"http://127.0.0.1:{web_port}/dl/", *account).stdout)
            _run(BIN / "edgeopt", "agent", "install", pkgs["1.0.0"], "--config", cfg)
            spawn(dev, BIN / "edgeopt-agent", "--config", cfg)
            agents[dev] = api_port

        api = Api(web_port, token)
        wait_for(lambda: api.call("GET", "/healthz")[0] == 200, 60, interval=0.3, what="dashboard web")
        for dev, port in agents.items():
            wait_for(lambda: _served_version(port) == "1.0.0", 60, interval=0.3, what=f"{dev} serving 1.0.0")

        def device(dev):
            status, doc = api.call("GET", f"/api/v1/devices/{dev}")
            return doc if status == 200 else {}

        for dev in agents:
            wait_for(lambda: device(dev).get("status") == "online", 60, interval=0.5, what=f"{dev} online")

        api.upload(pkgs["1.0.0"])
        v2 = api.upload(pkgs["1.1.0"])
        status, dep = api.call("POST", "/api/v1/deployments",
                               {"package_id": v2["id"], "target": {"group": "line-1"}, "stage_percent": 50,
                                "failure_threshold": 0.5})
        assert status == 201, dep
        dep_id = dep["id"]

        def deployment():
            return api.call("GET", f"/api/v1/deployments/{dep_id}")[1]

        final = wait_for(lambda: (d := deployment()).get("state") in ("completed", "failed", "aborted") and d,
                         180, interval=0.5, what="deployment to finish")
        assert final["state"] == "completed", json.dumps(final, indent=1)[:3000]
        stages = sorted({t["stage"] for t in final["targets"]})
        assert stages == [1, 2], final["targets"]  # 50 % first, then the rest
        assert all(t["state"] == "succeeded" for t in final["targets"]), final["targets"]
        for dev, port in agents.items():
            assert _served_version(port) == "1.1.0"
            wait_for(lambda: any(p["version"] == "1.1.0" for p in device(dev).get("packages", [])), 60,
                     interval=0.5, what=f"dashboard to show 1.1.0 on {dev}")
            events = api.call("GET", f"/api/v1/devices/{dev}/events")[1]["events"]
            kinds = {e["kind"] for e in events if e.get("deployment_id") == dep_id}
            assert {"download", "self_test", "switch", "install"} <= kinds, kinds

        status, rb = api.call("POST", f"/api/v1/deployments/{dep_id}/rollback")
        assert status == 200, rb
        for dev, port in agents.items():
            wait_for(lambda: _served_version(port) == "1.0.0", 120, interval=0.5, what=f"{dev} rolled back")
        wait_for(lambda: deployment().get("state") == "rolled_back", 60, interval=0.5, what="rolled_back state")
    finally:
        stop_processes(procs)
        broker.stop()
