"""Database fixtures for the dashboard tests, on SQLite and (when configured) PostgreSQL.

``db_url`` is the URL of a fresh, migrated database (``init_db``: alembic upgrade head) for each test.
It is parametrized over ``sqlite`` and, when ``EDGEOPT_TEST_POSTGRES_URL`` is set (``scripts/test.sh``
sets it), ``postgresql``: every PostgreSQL test gets its own database ``edgeopt_t_<random>`` created
from a migrated template and dropped afterwards. When the server is unreachable the PostgreSQL variants
FAIL under CI (``CI=true``) and are skipped, with the reason, elsewhere.

Other fixtures: ``engine`` (SQLAlchemy engine on ``db_url``), ``session`` (an ORM session),
``pg_only_url`` (PostgreSQL only), ``mqtt_broker`` (``host, port`` of a private Mosquitto).
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

PG_ENV = "EDGEOPT_TEST_POSTGRES_URL"


def _pg_admin(url: str):
    """An autocommit psycopg connection to the server of ``url`` (for CREATE/DROP DATABASE)."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username or "postgres",
                           password=u.password, dbname=u.database or "postgres", autocommit=True,
                           connect_timeout=5)


def _pg_url_for(url: str, dbname: str) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(url).set(drivername="postgresql+psycopg", database=dbname)
    return u.render_as_string(hide_password=False)


class PgServer:
    """The test PostgreSQL server: a migrated template database and fresh copies of it."""

    def __init__(self, url: str):
        self.url = url
        self.template = f"edgeopt_tpl_{secrets.token_hex(4)}"
        self.created: list[str] = []

    def start(self) -> None:
        from edgeopt.dashboard.db import init_db

        with _pg_admin(self.url) as conn:
            conn.execute(f'CREATE DATABASE "{self.template}"')
        init_db(_pg_url_for(self.url, self.template))

    def new_database(self, migrated: bool = True) -> str:
        name = f"edgeopt_t_{secrets.token_hex(6)}"
        with _pg_admin(self.url) as conn:
            if migrated:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
            else:
                conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return _pg_url_for(self.url, name)

    def drop(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        with _pg_admin(self.url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)

    def stop(self) -> None:
        with _pg_admin(self.url) as conn:
            for name in [*self.created, self.template]:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server():
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PG_ENV} is not set under CI: the PostgreSQL variants must run there")
        pytest.skip(f"{PG_ENV} not set: PostgreSQL variants not run (scripts/test.sh sets it)")
    server = PgServer(url)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - any connection failure
        msg = f"PostgreSQL at {PG_ENV} is unreachable: {str(exc).splitlines()[0]}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    yield server
    server.stop()


def _backends() -> list:
    params = ["sqlite"]
    # Under CI the PostgreSQL variants always exist, so a missing or unreachable server fails them.
    if os.environ.get(PG_ENV) or os.environ.get("CI") == "true":
        params.append(pytest.param("postgresql", marks=pytest.mark.postgres))
    return params


@pytest.fixture(params=_backends())
def db_backend(request) -> str:
    return request.param


@pytest.fixture
def db_url(request, db_backend, tmp_path):
    """URL of a fresh migrated database for this test."""
    from edgeopt.dashboard.db import dispose_engines, init_db

    if db_backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'edgeopt.db'}"
        init_db(url)
        yield url
        dispose_engines()
    else:
        server = request.getfixturevalue("pg_server")
        url = server.new_database()
        yield url
        dispose_engines()
        server.drop(url)


@pytest.fixture
def pg_only_url(pg_server):
    """URL of a fresh migrated PostgreSQL database (PostgreSQL-only tests)."""
    from edgeopt.dashboard.db import dispose_engines

    url = pg_server.new_database()
    yield url
    dispose_engines()
    pg_server.drop(url)


@pytest.fixture
def engine(db_url):
    from edgeopt.dashboard.db import make_engine

    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine):
    from edgeopt.dashboard.db import session_factory

    with session_factory(engine)() as s:
        yield s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Mosquitto:
    """A private Mosquitto broker on a free port (can be stopped and restarted on the same port)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             "max_inflight_messages 1000\nmax_queued_messages 100000\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@pytest.fixture
def mqtt_broker(tmp_path):
    """A private Mosquitto on a free port, stopped after the test."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("mosquitto is not installed (apt-get install mosquitto): the ingest tests need it")
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()
