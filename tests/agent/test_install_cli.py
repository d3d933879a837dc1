"""`edgeopt agent init | install | rollback | list` as a user runs them (exit codes, one-line errors)."""
from __future__ import annotations

import json

import pytest

from edgeopt.agent.config import load_config
from edgeopt.sdk.cli import cli, run_cli


def _run(capsys, *argv):
    code = run_cli(cli, list(argv), prog_name="edgeopt")
    out = capsys.readouterr()
    return code, out.out, out.err


def test_init_writes_loadable_config(capsys, tmp_path, agent_keys):
    code, out, err = _run(capsys, "agent", "init", "--device-id", "cam-07", "--fleet", "plant-a",
                          "--broker", "mqtt://broker:1883", "--state-dir", str(tmp_path / "state"),
                          "--api-port", "8471", "--trust-key", str(agent_keys.trusted_public))
    assert code == 0, err
    path = tmp_path / "agent.toml"
    path.write_text(out)
    cfg = load_config(path)
    assert (cfg.device_id, cfg.fleet, cfg.broker.url, cfg.api.port) == ("cam-07", "plant-a", "mqtt://broker:1883", 8471)
    assert cfg.state_dir == (tmp_path / "state").resolve()
    code, out, _ = _run(capsys, "agent", "init", "--device-id", "cam-07", "--fleet", "plant-a",
                        "--trust-key", str(agent_keys.trusted_public), "--json")
    assert code == 0 and json.loads(out)["device_id"] == "cam-07"


def test_init_errors(capsys, tmp_path, agent_keys):
    code, _, err = _run(capsys, "agent", "init", "--device-id", "cam-07", "--fleet", "f")
    assert code == 2 and "give at least one --trust-key (or --allow-unsigned for development)" in err
    code, _, err = _run(capsys, "agent", "init", "--device-id", "cam 07", "--fleet", "f", "--allow-unsigned")
    assert code == 3 and "error: agent init: device_id: Value error, invalid device_id 'cam 07'" in err
    code, _, err = _run(capsys, "agent", "init", "--device-id", "c", "--fleet", "f",
                        "--trust-key", str(tmp_path / "none.pub"))
    assert code == 3 and f"error: --trust-key {tmp_path / 'none.pub'}: file not found" in err
    code, _, err = _run(capsys, "agent", "init", "--device-id", "c", "--fleet", "f",
                        "--trust-key", str(agent_keys.trusted_private))
    assert code == 3 and "is not a PEM public key" in err
    code, _, err = _run(capsys, "agent", "init", "--device-id", "c", "--fleet", "f", "--allow-unsigned",
                        "--broker", "tcp://x")
    assert code == 3 and "broker url must start with mqtt:// or mqtts://, found 'tcp://x'" in err


def test_install_list_rollback(capsys, agent_config_file, make_package, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # rich wraps cells at the default 80 columns
    cfg = str(agent_config_file)
    code, out, err = _run(capsys, "agent", "list", "--config", cfg)
    assert code == 0 and out.strip() == "no models installed"
    code, out, err = _run(capsys, "agent", "install", str(make_package("1.0.0")), "--config", cfg)
    assert code == 0, err
    assert out.strip() == "installed digits 1.0.0"
    assert "self_test ok     4 golden samples within tolerance" in err
    code, out, err = _run(capsys, "agent", "install", str(make_package("1.1.0")), "--config", cfg, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["installed"]["version"] == "1.1.0" and doc["installed"]["previous_version"] == "1.0.0"
    assert [e["event"] for e in doc["events"]] == ["self_test", "switch", "install"]
    code, out, _ = _run(capsys, "agent", "list", "--config", cfg, "--json")
    rows = json.loads(out)
    assert rows[0]["name"] == "digits" and rows[0]["version"] == "1.1.0" and rows[0]["versions"] == ["1.0.0", "1.1.0"]
    code, out, _ = _run(capsys, "agent", "list", "--config", cfg)
    assert code == 0 and "digits" in out and "1.1.0" in out and "onnxruntime" in out
    code, out, err = _run(capsys, "agent", "rollback", "digits", "--config", cfg)
    assert code == 0 and out.strip() == "digits now at 1.0.0"
    code, out, err = _run(capsys, "agent", "rollback", "digits", "--config", cfg, "--version", "1.1.0", "--json")
    assert code == 0 and json.loads(out)["installed"]["version"] == "1.1.0"


@pytest.mark.parametrize("kind,code,message", [
    ("wrong_key", 7, "signature does not match any trusted key"),
    ("downgrade", 3, "digits 0.9.0 is lower than the installed 1.0.0; refused (use an explicit rollback"),
    ("missing", 3, "package file not found"),
])
def test_install_refusals_exit_codes(capsys, agent_config_file, make_package, tmp_path, kind, code, message):
    cfg = str(agent_config_file)
    assert _run(capsys, "agent", "install", str(make_package("1.0.0")), "--config", cfg)[0] == 0
    pkg = {"wrong_key": lambda: make_package("2.0.0", key="other"), "downgrade": lambda: make_package("0.9.0"),
           "missing": lambda: tmp_path / "nope.eopkg"}[kind]()
    got, out, err = _run(capsys, "agent", "install", str(pkg), "--config", cfg)
    assert got == code
    # the failure is said once, as the command's one-line error
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    # ... and queued for the fleet: the daemon sends the outbox over MQTT
    from edgeopt.agent.config import load_config
    from edgeopt.agent.outbox import Outbox
    from edgeopt.sdk.telemetry import parse_payload

    conf = load_config(agent_config_file)
    rows = Outbox(conf.state_dir).peek(1000)
    refused = [parse_payload("events", r.payload) for r in rows if r.topic.endswith("/events")]
    refused = [e for e in refused if not e.ok]
    if kind != "missing":  # a file that is not there never reaches the installer
        assert refused and message.split(" (")[0][:40] in refused[-1].message
        assert refused[-1].session_id.startswith("cli-") and refused[-1].details["source"].startswith("edgeopt agent")
    # --rollback makes the downgrade explicit
    if kind == "downgrade":
        assert _run(capsys, "agent", "install", str(pkg), "--config", cfg, "--rollback")[0] == 0


def test_bad_config_is_one_line(capsys, tmp_path, make_package):
    bad = tmp_path / "agent.toml"
    bad.write_text('device_id = "x"\n')
    code, _, err = _run(capsys, "agent", "install", str(make_package("1.0.0")), "--config", str(bad))
    assert code == 3
    assert err.count("\n") == 1 and "agent.toml: fleet: required key is missing" in err
