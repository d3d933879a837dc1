"""Agent config: validation errors name file, key, value and fix; `init` output loads back."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgeopt.agent.config import AgentConfig, ApiConfig, load_config, render_config
from edgeopt.sdk.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, body: str, key_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'trusted_keys = ["{key_path}"]\n' + body)
    return path


BASE = 'device_id = "cam-07"\nfleet = "plant-a"\nstate_dir = "state"\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n'


def test_minimal_config_defaults_and_relative_paths(tmp_path, agent_keys):
    cfg = load_config(_write(tmp_path, BASE, agent_keys.trusted_public))
    assert cfg.state_dir == tmp_path / "state"  # relative to the file, not to the cwd
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", 8470)
    assert (cfg.batching.enabled, cfg.batching.max_batch, cfg.batching.max_delay_ms, cfg.batching.max_queue) == \
        (True, None, 2.0, 256)
    assert (cfg.download.max_bytes, cfg.download.timeout_s) == (2 * 1024**3, 60)
    assert cfg.outbox.max_messages == 100_000
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("127.0.0.1", 1883, False)
    assert cfg.telemetry_interval_s == 10.0 and cfg.allow_unsigned is False
    from edgeopt.agent.connection import HttpLimits

    assert cfg.api.http_limits() == HttpLimits(max_header_bytes=16384, max_body_bytes=256 * 1024**2,
                                               header_timeout_s=10, body_timeout_s=30, idle_timeout_s=60,
                                               max_connections=512)


def test_api_limits_are_read_and_checked(tmp_path, agent_keys):
    body = BASE + "[api]\nmax_connections = 64\nheader_timeout_s = 2.5\nmax_body_bytes = 1048576\n"
    limits = load_config(_write(tmp_path, body, agent_keys.trusted_public)).api.http_limits()
    assert (limits.max_connections, limits.header_timeout_s, limits.max_body_bytes) == (64, 2.5, 1048576)
    with pytest.raises(ConfigError, match=r"api\.idle_timeout_s.*greater than 0"):
        load_config(_write(tmp_path, BASE + "[api]\nidle_timeout_s = 0\n", agent_keys.trusted_public))


def test_relative_key_path(tmp_path, agent_keys):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k.pub").write_bytes(agent_keys.trusted_public.read_bytes())
    path = tmp_path / "agent.toml"
    path.write_text('trusted_keys = ["keys/k.pub"]\n' + BASE)
    assert load_config(path).trusted_keys == [tmp_path / "keys" / "k.pub"]


@pytest.mark.parametrize("body,message", [
    (BASE + "[api]\nprot = 1\n", r"agent.toml: api.prot: unknown key \(remove it or check its spelling\)"),
    (BASE.replace("mqtt://127.0.0.1:1883", "http://x:1883"),
     r"broker.url: Value error, broker url must start with mqtt:// or mqtts://, found 'http://x:1883'"),
    (BASE.replace("mqtt://127.0.0.1:1883", "mqtt://:1883"), r"broker url 'mqtt://:1883' has no host"),
    (BASE.replace("mqtt://127.0.0.1:1883", "mqtt://h:99999"), r"broker url 'mqtt://h:99999' has an invalid port"),
    (BASE.replace('"cam-07"', '"cam/07"'), r"device_id: Value error, invalid device_id 'cam/07'"),
    (BASE.replace('"plant-a"', '"plant+"'), r"fleet: Value error, invalid fleet 'plant\+'"),
    (BASE + 'ca_file = "ca.pem"\n', r"ca_file/cert_file/key_file need an mqtts:// url"),
    (BASE.replace("mqtt://", "mqtts://") + 'cert_file = "c.pem"\n', r"cert_file and key_file go together"),
    (BASE + 'password = "x"\n', r"password is set but username is not"),
    (BASE + "[batching]\nmax_queue = 0\n", r"batching.max_queue: Input should be greater than or equal to 1 \(found 0\)"),
    (BASE.replace('fleet = "plant-a"\n', ""), r"agent.toml: fleet: required key is missing"),
    ("telemetry_interval_s = 'fast'\n" + BASE, r"telemetry_interval_s: Input should be a valid number"),
])
def test_validation_errors(tmp_path, agent_keys, body, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, body, agent_keys.trusted_public))


def test_file_level_errors(tmp_path, agent_keys):
    with pytest.raises(ConfigError, match=r"missing.toml: agent config file not found") as err:
        load_config(tmp_path / "missing.toml")
    assert err.value.one_line().endswith("(create one with: edgeopt agent init ... > agent.toml)")
    bad = tmp_path / "bad.toml"
    bad.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    nokeys = tmp_path / "nokeys.toml"
    nokeys.write_text(BASE)
    with pytest.raises(ConfigError, match="trusted_keys is empty: no package could be installed"):
        load_config(nokeys)
    missing_key = tmp_path / "mk.toml"
    missing_key.write_text('trusted_keys = ["nope.pub"]\n' + BASE)
    with pytest.raises(ConfigError, match=r"trusted_keys: public key file .*nope.pub not found"):
        load_config(missing_key)
    ca = tmp_path / "ca.toml"
    ca.write_text(f'trusted_keys = ["{agent_keys.trusted_public}"]\n'
                  + BASE.replace("mqtt://", "mqtts://") + 'ca_file = "ca.pem"\n')
    with pytest.raises(ConfigError, match=r"broker.ca_file: file .*ca.pem not found"):
        load_config(ca)


def test_mqtts_with_client_cert(tmp_path, agent_keys):
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("x")
    body = BASE.replace("mqtt://127.0.0.1:1883", "mqtts://broker.example") + \
        'ca_file = "ca.pem"\ncert_file = "c.pem"\nkey_file = "c.key"\nusername = "u"\npassword = "p"\n'
    cfg = load_config(_write(tmp_path, body, agent_keys.trusted_public))
    assert (cfg.broker.tls, cfg.broker.port, cfg.broker.ca_file) == (True, 8883, tmp_path / "ca.pem")


def test_render_config_round_trips(tmp_path, agent_keys):
    text = render_config(device_id="cam-07", fleet="plant-a", broker="mqtts://b:8883", state_dir=tmp_path / "s",
                         trusted_keys=[agent_keys.trusted_public], api_port=9000, groups=["line-1"])
    path = tmp_path / "agent.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert (cfg.device_id, cfg.fleet, cfg.api.port, cfg.groups) == ("cam-07", "plant-a", 9000, ["line-1"])
    assert cfg.trusted_keys == [agent_keys.trusted_public.resolve()]
    assert text.count("\n#") >= 10  # commented for humans


def test_render_config_refuses_bad_values(agent_keys):
    with pytest.raises(ConfigError, match=r"agent init: device_id: Value error, invalid device_id 'a b'"):
        render_config(device_id="a b", fleet="f", broker="mqtt://h", state_dir="/x",
                      trusted_keys=[agent_keys.trusted_public])


def test_shipped_example_config_validates(tmp_path, agent_keys, command_keys):
    # The example names keys/*.pub and /etc/edgeopt/ca.pem: put files there in a copy.
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "edgeopt.pub").write_bytes(agent_keys.trusted_public.read_bytes())
    (tmp_path / "keys" / "dashboard-command.pub").write_bytes(command_keys.public.read_bytes())
    (tmp_path / "ca.pem").write_text("x")
    copy = tmp_path / "agent.toml"
    copy.write_text((ROOT / "agent" / "examples" / "agent.toml").read_text().replace("/etc/edgeopt/ca.pem", "ca.pem"))
    cfg = load_config(copy)
    assert cfg.device_id == "cam-07" and cfg.state_dir == Path("/var/lib/edgeopt")
    assert cfg.control.trust_keys == [tmp_path / "keys" / "dashboard-command.pub"]
    assert cfg.download.allowed_urls == ["https://dashboard.local:8080/dl/"]


def test_control_and_package_store_settings(tmp_path, agent_keys, command_keys):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "cmd.pub").write_bytes(command_keys.public.read_bytes())
    body = BASE + '[download]\nallowed_urls = ["http://dash:8080/dl"]\n[control]\ntrust_keys = ["k/cmd.pub"]\n'
    cfg = load_config(_write(tmp_path, body, agent_keys.trusted_public))
    assert cfg.control.trust_keys == [tmp_path / "k" / "cmd.pub"]  # relative to the file
    assert cfg.download.allowed_urls == ["http://dash:8080/dl/"]  # a base path always ends with '/'
    assert (cfg.control.max_clock_skew_s, cfg.control.max_command_lifetime_s) == (300, 86400)
    defaults = load_config(_write(tmp_path, BASE, agent_keys.trusted_public))
    assert defaults.control.trust_keys == [] and defaults.download.allowed_urls == []  # refuse all by default


@pytest.mark.parametrize("body, message", [
    ('[download]\nallowed_urls = ["ftp://h/"]\n', r"download.allowed_urls: Value error, allowed package URL must "
                                                   r"be http:// or https:// with a host, found 'ftp://h/'"),
    ('[download]\nallowed_urls = ["http://u:p@h/dl/"]\n', r"must have no user info, query or fragment"),
    ('[download]\nallowed_urls = ["http://h/dl/../x/"]\n', r"must not contain '.', '..' or encoded separators"),
    ('[control]\ntrust_keys = ["nope.pub"]\n', r"control.trust_keys: public key file .*nope.pub not found$"),
    ('[control]\nmax_clock_skew_s = -1\n', r"control.max_clock_skew_s: Input should be greater than or equal to 0"),
    ('[control]\ntrustkeys = []\n', r"control.trustkeys: unknown key"),
])
def test_control_and_package_store_errors(tmp_path, agent_keys, body, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, BASE + body, agent_keys.trusted_public))


def test_render_config_with_command_key_store_and_broker_account(tmp_path, agent_keys, command_keys):
    (tmp_path / "ca.pem").write_text("x")
    text = render_config(device_id="cam-07", fleet="plant-a", broker="mqtts://b:8883", state_dir=tmp_path / "s",
                         trusted_keys=[agent_keys.trusted_public], command_keys=[command_keys.public],
                         package_urls=["https://dash/dl/"], broker_ca=tmp_path / "ca.pem",
                         broker_username="plant-a/cam-07", broker_password='p"w')
    path = tmp_path / "agent.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.control.trust_keys == [command_keys.public.resolve()]
    assert cfg.download.allowed_urls == ["https://dash/dl/"]
    assert (cfg.broker.username, cfg.broker.password, cfg.broker.ca_file) == ("plant-a/cam-07", 'p"w',
                                                                              (tmp_path / "ca.pem").resolve())


def test_model_has_titles_and_descriptions():
    schema = AgentConfig.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("title") and prop.get("description"), name


def test_systemd_unit_runs_the_daemon_with_the_config():
    unit = (ROOT / "agent" / "systemd" / "edgeopt-agent.service").read_text()
    for line in ("Type=simple", "ExecStart=/usr/local/bin/edgeopt-agent --config /etc/edgeopt/agent.toml",
                 "Restart=on-failure", "StateDirectory=edgeopt", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "LimitNOFILE=4096"):
        assert line in unit.splitlines(), line
    # the API's default connection cap fits the unit's open-file limit with the agent's reserve to spare
    from edgeopt.agent.server import RESERVED_FDS

    assert ApiConfig().max_connections + RESERVED_FDS <= 4096


def test_systemd_unit_verifies(tmp_path):
    """systemd's own checker accepts the unit, and its offline security score is "OK" or better."""
    import re
    import shutil
    import subprocess
    import sys

    tool = shutil.which("systemd-analyze")
    # scripts/setup.sh installs it (Debian package systemd): a missing tool is a broken set-up, not a skip.
    assert tool, "systemd-analyze is not installed: run scripts/setup.sh (apt-get install systemd)"
    unit = tmp_path / "edgeopt-agent.service"
    # verify checks that ExecStart exists: point it at this environment's entry point
    text = (ROOT / "agent" / "systemd" / "edgeopt-agent.service").read_text()
    unit.write_text(text.replace("/usr/local/bin/edgeopt-agent", str(Path(sys.executable).with_name("edgeopt-agent"))))
    verify = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    sec = subprocess.run([tool, "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for edgeopt-agent.service: ([0-9.]+)", sec.stdout)
    assert level and float(level.group(1)) <= 3.0, sec.stdout[-500:]
