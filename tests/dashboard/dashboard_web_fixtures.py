"""Fixtures and helpers of the web app tests (flaskr style: ``app``, ``client``, ``runner``).

Imported by the ``test_app*``, ``test_auth*``, ``test_api*``, ``test_packages*``, ``test_deployments*``
and ``test_browser*`` modules. ``app`` runs on ``db_url`` from conftest.py, so every test using it runs
on SQLite and, when configured, on PostgreSQL. Telemetry is written through the real ingest code
(``ingest_writer.prepare`` + ``BatchWriter``) and rolled up with the real rollup job.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct-horse-battery"
USERS = {"admin": "admin", "operator": "operator", "viewer": "viewer"}


@pytest.fixture
def trusted_keys(tmp_path_factory):
    """(private key, public key path) of the key the app trusts, and an untrusted private key."""
    from edgeopt.sdk.package import generate_keypair, load_private_key

    d = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(d, "trusted")
    other_priv, _ = generate_keypair(d, "other")
    return {"key": load_private_key(priv), "pub": pub, "other": load_private_key(other_priv)}


@pytest.fixture
def app(db_url, tmp_path, trusted_keys):
    from edgeopt.dashboard import create_app
    from edgeopt.dashboard.db import session_scope, make_engine
    from edgeopt.dashboard.models import User
    from edgeopt.dashboard.security import hash_password

    app = create_app({
        "TESTING": True,
        "DATABASE_URL": db_url,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "SECRET_KEY": "test-secret-key",
        "PACKAGE_DIR": str(tmp_path / "packages"),
        "TRUSTED_KEYS": [str(trusted_keys["pub"])],
        # Nothing listens on port 1: tests that need a broker pass their own.
        "BROKER_URL": "mqtt://127.0.0.1:1",
        "PUBLIC_URL": "http://dashboard.test",
    })
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        for name, role in USERS.items():
            s.add(User(username=name, role=role, password_hash=hash_password(PASSWORD)))
    engine.dispose()
    yield app
    app.extensions["edgeopt_engine"].dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def db(app):
    """An ORM session on the app's database (for seeding and checking)."""
    with app.extensions["edgeopt_sessionmaker"]() as s:
        yield s


def csrf_token(html: str) -> str:
    m = re.search(r'<meta name="csrf-token" content="([^"]+)"', html) or \
        re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(client, username: str, password: str = PASSWORD, follow: bool = False):
    page = client.get("/login")
    token = csrf_token(page.get_data(as_text=True))
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token},
                        follow_redirects=follow)


def page_token(client, path: str = "/fleet") -> str:
    """The CSRF token of the logged-in session, read from a page like a browser would."""
    resp = client.get(path)
    assert resp.status_code == 200, resp.status_code
    return csrf_token(resp.get_data(as_text=True))


def api_token(app, username: str) -> str:
    from edgeopt.dashboard.models import ApiToken, User
    from edgeopt.dashboard.security import new_token
    from sqlalchemy import select

    plain, digest = new_token()
    with app.extensions["edgeopt_sessionmaker"]() as s:
        user = s.scalar(select(User).where(User.username == username))
        s.add(ApiToken(user_id=user.id, token_hash=digest, name="test"))
        s.commit()
    return plain


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def ingest(engine, messages, now: datetime | None = None):
    """Write (topic, payload bytes) messages through the real ingest writer."""
    from edgeopt.dashboard.ingest_writer import BatchWriter, Incoming, prepare

    now = now or datetime.now(timezone.utc)
    batch = prepare([Incoming(t, p, now) for t, p in messages])
    return BatchWriter(engine).write(batch, now)


def seed_fleet(app, n: int = 3, minutes: int = 30, fleet: str = "test", groups=("line-1",), tags=("cam",)):
    """``n`` simulated devices: online status, ``minutes`` of telemetry ending now, rolled up."""
    from edgeopt.dashboard.rollup import run_rollup
    from edgeopt.dashboard.simulate import SimDevice, minute_series

    engine = app.extensions["edgeopt_engine"]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    devices = [SimDevice(f"edge-{i:03d}", fleet=fleet, median_ms=2.0 * 3 ** i, profile="cpu", groups=groups, tags=tags,
                         seed=i) for i in range(n)]
    start = now - timedelta(minutes=minutes)
    # Birth before the telemetry: the device rows then take the newest telemetry's p95, CPU and RSS.
    ingest(engine, [(d.topic("status"), d.status("online", ts=start - timedelta(seconds=1)).to_json())
                    for d in devices], start)
    series = minute_series(devices, start, minutes, interval_s=30.0, requests=20)
    ingest(engine, [(t, p) for t, p, _ in series], now)
    run_rollup(engine, now + timedelta(minutes=2))
    return devices


def make_package(path: Path, key, name: str = "digits", version: str = "1.0.0", profile: str = "cpu",
                 artifacts: dict | None = None) -> Path:
    """A small real package: the digits ONNX model, manifest written and signed by the SDK."""
    from edgeopt.sdk.package import Manifest, SourceModel, TensorSpec, sha256_file, write_package

    model = ROOT / "tests" / "assets" / "digits" / "digits_cnn.onnx"
    manifest = Manifest(
        name=name, version=version, profile={"name": profile, "runtime": "onnxruntime"}, runtime="onnxruntime",
        runtime_version="1.20.0", device="CPU", precision="fp32", model_file="model.onnx",
        inputs=[TensorSpec(name="input", dtype="float32", shape=[1, 1, 8, 8])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[1, 10])],
        source_model=SourceModel(filename="digits_cnn.onnx", format="onnx", sha256=sha256_file(model)),
    )
    write_package(path, manifest, artifacts or {"model.onnx": model}, private_key=key)
    return path
