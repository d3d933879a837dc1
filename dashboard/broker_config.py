"""``edgeopt-dashboard broker-config``: a Mosquitto configuration where each part has its own identity.

Written into one folder:

- ``mosquitto.conf``: a TLS listener, no anonymous clients, the password file and the ACL below;
- ``passwd``: one account per device plus ``edgeopt-ingest`` and ``edgeopt-dashboard``, hashed by
  Mosquitto's own ``mosquitto_passwd -U`` (never by us);
- ``acl``: deny by default; a device (user ``<fleet>/<device>``) may publish only its own ``status``,
  ``telemetry``, ``events`` and ``cmd/result`` and read only its own ``cmd``; the ingest account reads
  every device's ``status/telemetry/events/cmd/result`` and publishes nothing; the dashboard account
  publishes ``cmd`` and reads nothing. So a device, or a stolen device's credentials, cannot speak for
  another device (no spoofed retained ``offline``) nor read another's commands;
- ``credentials.json`` (mode 0600): every account's password, kept across runs so adding a device does not
  change the others (``rotate`` gives named accounts new passwords; a device left out is revoked);
- ``devices/<fleet>/<device>.toml``: the ``[broker]`` section of that device's agent config;
- with ``generate_tls``: ``ca.pem``/``ca.key`` (a private CA) and ``server.pem``/``server.key``.

Apply a new configuration without dropping clients: ``kill -HUP <mosquitto pid>`` rereads the password
file and the ACL.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from edgeopt.sdk import topics
from edgeopt.sdk.errors import InputError, MissingDependencyError, UnavailableError

log = logging.getLogger(__name__)

INGEST_USER = "edgeopt-ingest"
DASHBOARD_USER = "edgeopt-dashboard"
DEVICE_PUBLISHES = ("status", "telemetry", "events", "cmd/result")
INGEST_READS = ("status", "telemetry", "events", "cmd/result")
# Largest MQTT packet the broker takes: the payload bound of the contract plus room for topic and header.
MAX_PACKET_BYTES = 256 * 1024 + 4096


def device_user(fleet: str, device_id: str) -> str:
    """The broker user name of one device: ``<fleet>/<device>`` ('/' never occurs in an id)."""
    for value, what in ((fleet, "fleet"), (device_id, "device id")):
        topics.validate_id(value, what)
        if ":" in value:
            raise InputError(f"{what} {value!r} contains ':', which a Mosquitto password file cannot hold in a "
                             "user name", hint="use ids without ':' for brokered devices")
    return f"{fleet}/{device_id}"


def parse_device(spec: str, default_fleet: str | None) -> tuple[str, str]:
    """``FLEET/DEVICE`` or ``DEVICE`` (in ``default_fleet``) -> (fleet, device)."""
    spec = spec.strip()
    if "/" in spec:
        fleet, _, device = spec.partition("/")
    elif default_fleet:
        fleet, device = default_fleet, spec
    else:
        raise InputError(f"device {spec!r} has no fleet", hint="write FLEET/DEVICE or pass --fleet")
    device_user(fleet, device)  # validates both
    return fleet, device


@dataclass
class TlsFiles:
    """PEM files of the broker's listener; ``ca`` verifies client certificates when they are required."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass
class BrokerConfigResult:
    out_dir: Path
    conf: Path
    accounts: dict[str, dict] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "conf": str(self.conf), "accounts": sorted(self.accounts),
                "added": sorted(self.added), "revoked": sorted(self.revoked), "rotated": sorted(self.rotated)}


def render_acl(devices: list[tuple[str, str]]) -> str:
    """The Mosquitto ACL: deny by default, each account only what its part needs."""
    lines = ["# edgeopt broker ACL (edgeopt-dashboard broker-config). Whatever is not granted is denied.", "",
             "# Ingest: reads every device's messages, publishes nothing.", f"user {INGEST_USER}"]
    lines += [f"topic read {topics.PREFIX}/{topics.VERSION}/+/+/{kind}" for kind in INGEST_READS]
    lines += ["", "# Dashboard (web and rollout stages): publishes signed commands, reads nothing.",
              f"user {DASHBOARD_USER}", f"topic write {topics.PREFIX}/{topics.VERSION}/+/+/cmd", ""]
    for fleet, device in devices:
        lines.append(f"user {device_user(fleet, device)}")
        lines += [f"topic write {topics.topic(fleet, device, kind)}" for kind in DEVICE_PUBLISHES]
        lines += [f"topic read {topics.topic(fleet, device, 'cmd')}", ""]
    return "\n".join(lines)


def render_conf(out_dir: Path, *, port: int, bind: str, tls: TlsFiles | None,
                require_certificate: bool = False) -> str:
    """mosquitto.conf for the generated password file and ACL."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = [f"# Written by edgeopt-dashboard broker-config at {now}.",
            "# Reload the password file and the ACL without dropping clients: kill -HUP <mosquitto pid>.",
            "per_listener_settings false",
            # The ingest acknowledges a message only after its commit and keeps a persistent session: the
            # broker is its durable queue. Mosquitto's default of 1,000 queued messages per session lost
            # 12,957 of 60,000 under a kill -9 at full load (docs/ingest-reliability.md); persistence keeps
            # queued messages and commands across a broker restart.
            "persistence true",
            f"persistence_location {out_dir / 'data'}/",
            "max_queued_messages 1000000",
            "allow_anonymous false",
            f"password_file {out_dir / 'passwd'}",
            f"acl_file {out_dir / 'acl'}",
            f"max_packet_size {MAX_PACKET_BYTES}",
            "",
            f"listener {port} {bind}"]
    if tls is None:
        text.insert(0, "# WARNING: no TLS: passwords and commands cross the network in clear text. Loopback only.")
    else:
        text += [f"certfile {tls.cert.resolve()}", f"keyfile {tls.key.resolve()}", "tls_version tlsv1.2"]
        if tls.ca is not None:
            text.append(f"cafile {tls.ca.resolve()}")
        if require_certificate:
            text.append("require_certificate true")
    return "\n".join(text) + "\n"


def _write_private(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _hash_passwords(out_dir: Path, accounts: dict[str, dict]) -> Path:
    """``passwd`` hashed by mosquitto_passwd (-U rewrites a plain ``user:password`` file in place)."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise MissingDependencyError("mosquitto_passwd is not installed",
                                     hint="install Mosquitto (apt-get install mosquitto) where you run broker-config")
    plain = out_dir / f".passwd.{secrets.token_hex(4)}"
    _write_private(plain, "".join(f"{user}:{acc['password']}\n" for user, acc in sorted(accounts.items())))
    try:
        out = subprocess.run([tool, "-U", str(plain)], capture_output=True, text=True, timeout=300)
        if out.returncode:
            raise UnavailableError(f"mosquitto_passwd failed ({out.returncode}): "
                                   f"{(out.stderr or out.stdout).strip()[:300]}")
        os.replace(plain, out_dir / "passwd")
    finally:
        plain.unlink(missing_ok=True)
    return out_dir / "passwd"


def generate_tls(out_dir: Path, names: list[str], days: int = 825) -> TlsFiles:
    """A private CA and a server certificate for ``names`` (DNS names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not names:
        raise InputError("--tls-generate needs at least one host name or IP address of the broker")
    sans: list = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = dt.datetime.now(dt.timezone.utc)

    def build(subject, issuer, key, signer, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeopt broker CA")])
    ca = build(ca_name, ca_name, ca_key, ca_key, True)
    srv = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), ca_name, srv_key, ca_key, False)
    pem = serialization.Encoding.PEM

    def key_pem(k) -> bytes:
        return k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    _write_private(out_dir / "ca.key", key_pem(ca_key))
    _write_private(out_dir / "server.key", key_pem(srv_key))
    (out_dir / "ca.pem").write_bytes(ca.public_bytes(pem))
    (out_dir / "server.pem").write_bytes(srv.public_bytes(pem))
    return TlsFiles(out_dir / "server.pem", out_dir / "server.key", out_dir / "ca.pem")


def _agent_broker_toml(url: str, ca: Path | None, user: str, password: str) -> str:
    def q(v: str) -> str:
        return json.dumps(v)  # a JSON string is a valid TOML basic string for these values

    return ("# The [broker] section of this device's agent config (edgeopt-dashboard broker-config).\n"
            f"[broker]\nurl = {q(url)}\n" + (f"ca_file = {q(str(ca.resolve()))}\n" if ca else "")
            + f"username = {q(user)}\npassword = {q(password)}\nkeepalive_s = 30\n")


def write_broker_config(out_dir: str | Path, devices: list[tuple[str, str]], *, port: int = 8883,
                        bind: str = "0.0.0.0", public_host: str = "localhost", tls: TlsFiles | None = None,
                        tls_generate: list[str] | None = None, require_certificate: bool = False,
                        rotate: list[str] = ()) -> BrokerConfigResult:
    """Write (or update) the broker configuration in ``out_dir``; see the module docstring."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)  # the broker's persistence_location
    if tls_generate:
        tls = generate_tls(out, tls_generate) if not (out / "server.pem").is_file() else \
            TlsFiles(out / "server.pem", out / "server.key", out / "ca.pem")
    devices = sorted(set(devices))
    creds_path = out / "credentials.json"
    old = json.loads(creds_path.read_text())["accounts"] if creds_path.is_file() else {}
    wanted = {INGEST_USER: {"role": "ingest"}, DASHBOARD_USER: {"role": "dashboard"}}
    for fleet, device in devices:
        wanted[device_user(fleet, device)] = {"role": "device", "fleet": fleet, "device_id": device}
    unknown = sorted(set(rotate) - set(wanted))
    if unknown:
        raise InputError(f"cannot rotate unknown account(s): {', '.join(unknown)}",
                         hint=f"accounts are {INGEST_USER}, {DASHBOARD_USER} and FLEET/DEVICE")
    result = BrokerConfigResult(out, out / "mosquitto.conf")
    for user, acc in wanted.items():
        keep = old.get(user, {}).get("password")
        if keep and user not in rotate:
            acc["password"] = keep
        else:
            acc["password"] = secrets.token_urlsafe(24)
            (result.rotated if keep else result.added).append(user)
    result.revoked = sorted(set(old) - set(wanted))
    result.accounts = wanted
    _hash_passwords(out, wanted)
    (out / "acl").write_text(render_acl(devices) + "\n")
    _write_private(creds_path, json.dumps({"accounts": wanted}, indent=1, sort_keys=True) + "\n")
    scheme = "mqtts" if tls else "mqtt"
    url = f"{scheme}://{public_host}:{port}"
    dev_dir = out / "devices"
    if dev_dir.is_dir():
        shutil.rmtree(dev_dir)  # revoked devices lose their snippet too
    for fleet, device in devices:
        user = device_user(fleet, device)
        (dev_dir / fleet).mkdir(parents=True, exist_ok=True)
        _write_private(dev_dir / fleet / f"{device}.toml",
                       _agent_broker_toml(url, tls.ca if tls else None, user, wanted[user]["password"]))
    result.conf.write_text(render_conf(out, port=port, bind=bind, tls=tls, require_certificate=require_certificate))
    log.info("broker config in %s: %d device account(s), %d added, %d rotated, %d revoked", out, len(devices),
             len(result.added), len(result.rotated), len(result.revoked))
    return result
