"""`edgeopt-dashboard` commands, run as the installed console script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from edgeopt.dashboard import models as m
from edgeopt.dashboard.db import head_revision

EXE = str(Path(sys.executable).with_name("edgeopt-dashboard"))


def run(*args, url: str | None = None, input: str | None = None, env: dict | None = None):
    e = dict(os.environ, **(env or {}))
    e.pop("EDGEOPT_DATABASE_URL", None)
    if url:
        e["EDGEOPT_DATABASE_URL"] = url
    return subprocess.run([EXE, *args], capture_output=True, text=True, input=input, env=e, timeout=120)


@pytest.mark.parametrize("cmd", [[], ["init-db"], ["create-user"], ["create-token"], ["ingest"], ["rollup"],
                                 ["serve"], ["counters"], ["broker-config"], ["command-key"]])
def test_help_everywhere(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "Usage: edgeopt-dashboard" in r.stdout


def test_init_db_default_is_sqlite_in_data_dir(tmp_path):
    r = run("init-db", "--json", env={"EDGEOPT_DATA_DIR": str(tmp_path / "data")})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["revision"] == head_revision() and doc["database"] == f"sqlite:///{tmp_path / 'data' / 'edgeopt.db'}"
    assert (tmp_path / "data" / "edgeopt.db").exists()


def test_users_and_tokens(db_url, session):
    r = run("create-user", "alice", "--role", "operator", "--password", "correct horse", url=db_url)
    assert r.returncode == 0 and "user alice (operator) created" in r.stdout, r.stderr
    user = session.scalars(select(m.User).where(m.User.username == "alice")).one()
    assert user.role == "operator" and "correct horse" not in user.password_hash
    from edgeopt.dashboard.security import check_password, hash_token

    assert check_password(user.password_hash, "correct horse")
    r = run("create-user", "alice", "--password", "another one", url=db_url)
    assert r.returncode == 3 and r.stderr.strip() == (
        "error: user 'alice' already exists (pass --update to change it)")
    r = run("create-user", "bob", "--password", "short", url=db_url)
    assert r.returncode == 3 and "password too short: expected at least 8 characters, found 5" in r.stderr
    # prompted, with confirmation
    r = run("create-user", "carol", "--role", "admin", url=db_url, input="s3cret-pass\ns3cret-pass\n")
    assert r.returncode == 0, r.stderr
    r = run("create-token", "alice", "--name", "ci", "--json", url=db_url)
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["token"]
    session.expire_all()
    stored = session.scalars(select(m.ApiToken)).one()
    assert stored.token_hash == hash_token(token) and token not in stored.token_hash and stored.name == "ci"
    r = run("create-token", "nobody", url=db_url)
    assert r.returncode == 3 and r.stderr.strip() == ("error: user 'nobody' does not exist (create it first: "
                                                      "edgeopt-dashboard create-user nobody --role viewer)")


def test_rollup_and_counters_json(db_url):
    r = run("rollup", "--json", url=db_url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["raw_rows_scanned"] == 0
    r = run("counters", "--json", url=db_url)
    assert r.returncode == 0 and json.loads(r.stdout) == {}


def test_unreachable_database_is_one_line():
    r = run("counters", url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert r.returncode == 8
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: database postgresql+psycopg://nobody@127.0.0.1:1/none is unreachable: ")
    assert lines[0].endswith("(check that the server runs and EDGEOPT_DATABASE_URL is right)")


def test_uninitialised_database_is_refused(tmp_path):
    r = run("create-token", "x", url=f"sqlite:///{tmp_path / 'empty.db'}")
    assert r.returncode == 3 and f"is at schema revision none, expected {head_revision()} (run: edgeopt-dashboard init-db)" in r.stderr


def test_bad_urls(tmp_path):
    r = run("init-db", url="mysql://x@y/z")
    assert r.returncode == 3 and r.stderr.strip() == ("error: unsupported database URL 'mysql://x@y/z': only SQLite "
                                                 "and PostgreSQL are supported (use sqlite:///path/edgeopt.db or "
                                                 "postgresql+psycopg://user@host:5432/name)")
    r = run("ingest", "--broker", "http://x", url=f"sqlite:///{tmp_path / 'e.db'}")
    assert r.returncode == 3 and r.stderr.strip() == (
        "error: invalid broker URL 'http://x' (expected mqtt://host:port or mqtts://user:password@host:8883)")


def test_seed_demo(db_url, session):
    r = run("seed-demo", "--devices", "4", "--hours", "0.5", "--interval", "60", "--json", url=db_url)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["devices"] == 4 and doc["messages"] == 4 * 2 + 4 * 31
    assert session.scalar(select(func.count()).select_from(m.TelemetryRaw)) > 4 * 31  # 2-model devices: 2 rows
    from edgeopt.dashboard import stats

    s = stats.fleet_summary(session)
    assert s["devices"] == 4 and s["online"] == 4 and s["models"] == ["chat", "detector", "digits"]
    # the demo's language model (on device 1) sends text figures, so the demo shows their charts
    assert s["text_models"] == ["chat"]
    assert stats.device_detail(session, "demo-001")["text_models"] == ["chat"]
    assert stats.device_detail(session, "demo-000")["text_models"] == []


def test_serve_on_a_busy_port_is_one_line(tmp_path):
    import socket

    url = f"sqlite:///{tmp_path / 'd.db'}"
    assert run("init-db", url=url).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", "--port", str(port), url=url, env={"EDGEOPT_INSTANCE_DIR": str(tmp_path / "inst")})
    assert r.returncode == 8  # ExitCode.UNAVAILABLE
    assert r.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (choose another --port, or stop what "
        "uses it)"]


def test_ingest_takes_the_retention_options():
    r = run("ingest", "--help")
    for opt in ("--raw-hours", "--minute-days", "--hour-days"):
        assert opt in r.stdout
    r = run("ingest", "--raw-hours", "0")
    assert r.returncode == 2 and "--raw-hours" in r.stderr
