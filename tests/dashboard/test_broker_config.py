"""`edgeopt-dashboard broker-config` and `command-key` as a user runs them: files, reruns, rotation,
revocation and one-line errors. (A real Mosquitto runs the result in tests/integration/test_broker_acl.py.)"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).with_name("edgeopt-dashboard"))


def run(*args, env: dict | None = None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOPT_")}
    e.update(env or {})
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=e, timeout=120)


def _accounts(out: Path) -> dict:
    return json.loads((out / "credentials.json").read_text())["accounts"]


def test_files_rerun_rotation_and_revocation(tmp_path):
    out = tmp_path / "b"
    r = run("broker-config", "--out", out, "--fleet", "plant", "--device", "cam-01", "--device", "other/cam-02",
            "--tls-generate", "broker.lan", "--public-host", "broker.lan", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["added"] == ["edgeopt-dashboard", "edgeopt-ingest", "other/cam-02", "plant/cam-01"]
    first = _accounts(out)
    for name in ("credentials.json", "passwd", "ca.key", "server.key", "devices/plant/cam-01.toml"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    passwd = (out / "passwd").read_text()
    assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd.splitlines())  # hashed by Mosquitto
    assert first["plant/cam-01"]["password"] not in passwd
    conf = (out / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "listener 8883 0.0.0.0" in conf and "tls_version tlsv1.2" in conf
    assert f"password_file {out / 'passwd'}" in conf and f"acl_file {out / 'acl'}" in conf
    snippet = (out / "devices" / "plant" / "cam-01.toml").read_text()
    assert 'url = "mqtts://broker.lan:8883"' in snippet and 'username = "plant/cam-01"' in snippet
    acl = (out / "acl").read_text()
    assert "user plant/cam-01\ntopic write edgeopt/v1/plant/cam-01/status\n" in acl
    assert "topic read edgeopt/v1/plant/cam-01/cmd" in acl and "topic read edgeopt/v1/+/+/telemetry" in acl
    ca_before = (out / "ca.pem").read_bytes()

    # Add cam-03, drop other/cam-02, rotate cam-01: the rest keep their passwords, the CA stays.
    r = run("broker-config", "--out", out, "--fleet", "plant", "--device", "cam-01", "--device", "cam-03",
            "--tls-generate", "broker.lan", "--rotate", "plant/cam-01", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["added"], doc["rotated"], doc["revoked"]) == (["plant/cam-03"], ["plant/cam-01"], ["other/cam-02"])
    second = _accounts(out)
    assert second["edgeopt-ingest"]["password"] == first["edgeopt-ingest"]["password"]
    assert second["plant/cam-01"]["password"] != first["plant/cam-01"]["password"]
    assert "other/cam-02" not in (out / "acl").read_text() and "other/cam-02" not in (out / "passwd").read_text()
    assert not (out / "devices" / "other").exists()
    assert (out / "ca.pem").read_bytes() == ca_before


@pytest.mark.parametrize("args, message", [
    (["--device", "cam-01", "--fleet", "f"],
     "give --tls-cert/--tls-key, or --tls-generate HOST, or --no-tls (loopback only)"),
    (["--device", "cam-01", "--no-tls"], "device 'cam-01' has no fleet (write FLEET/DEVICE or pass --fleet)"),
    (["--device", "f/cam:01", "--no-tls"],
     "device id 'cam:01' contains ':', which a Mosquitto password file cannot hold in a user name"),
    (["--device", "f/a b", "--no-tls"], "invalid device id 'a b'"),
    (["--no-tls"], "no device given: use --device, --devices-file or --known-devices"),
    (["--device", "f/d", "--no-tls", "--rotate", "f/zz"], "cannot rotate unknown account(s): f/zz"),
    (["--device", "f/d", "--no-tls", "--tls-generate", "h"], "--no-tls and --tls-* exclude each other"),
])
def test_usage_errors_are_one_line(tmp_path, args, message):
    r = run("broker-config", "--out", tmp_path / "b", *args)
    assert r.returncode in (2, 3), r.stderr
    assert message in r.stderr.strip().splitlines()[-1]  # usage errors end with one line naming the problem


def test_devices_file_and_plain_listener(tmp_path):
    devices = tmp_path / "devices.txt"
    devices.write_text("# line 1\nplant/cam-01\ncam-02  # in --fleet\n\n")
    r = run("broker-config", "--out", tmp_path / "b", "--devices-file", devices, "--fleet", "plant", "--no-tls",
            "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(_accounts(tmp_path / "b")) == ["edgeopt-dashboard", "edgeopt-ingest", "plant/cam-01",
                                                 "plant/cam-02"]
    assert (tmp_path / "b" / "mosquitto.conf").read_text().startswith("# WARNING: no TLS")


def test_command_key_is_created_once_and_printed(tmp_path):
    env = {"EDGEOPT_INSTANCE_DIR": str(tmp_path / "inst")}
    r = run("command-key", "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["public_key"] == str(tmp_path / "inst" / "command-signing.pub")
    assert stat.S_IMODE((tmp_path / "inst" / "command-signing.key").stat().st_mode) == 0o600
    again = json.loads(run("command-key", "--json", env=env).stdout)
    assert again["key_id"] == doc["key_id"]  # the same key, not a new one
    assert run("command-key", env=env).stdout.strip() == doc["public_key"]
    assert run("command-key", "--pem", env=env).stdout.startswith("-----BEGIN PUBLIC KEY-----")


def test_command_key_named_but_missing_is_a_config_error(tmp_path):
    r = run("command-key", env={"EDGEOPT_COMMAND_KEY": str(tmp_path / "nope.key")})
    assert r.returncode == 3
    assert r.stderr.strip() == (f"error: EDGEOPT_COMMAND_KEY: command-signing key {tmp_path / 'nope.key'} not found "
                                "(create one with: edgeopt keygen --out DIR --name command)")
