"""mqtts with a CA, a client certificate and a user name/password, against a real Mosquitto; a refused
connection (wrong password) is never reported as connected and the agent keeps running."""
from __future__ import annotations

import datetime as dt
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent_support import Broker, agent_config, agent_test_fixtures, wait_for
from edgeopt.agent.daemon import Agent

agent_keys = agent_test_fixtures().agent_keys


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool, san: list | None = None):
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture
def tls_broker(tmp_path):
    import ipaddress

    d = tmp_path / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edgeopt-test-ca", ca_key, None, ca_key, ca=True)
    srv_key, cli_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    srv = _cert("127.0.0.1", ca_key, ca.subject, srv_key, ca=False,
                san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cli = _cert("cam-07", ca_key, ca.subject, cli_key, ca=False)
    files = {"ca": _write(d / "ca.pem", ca), "srv": _write(d / "server.pem", srv),
             "srv_key": _write(d / "server.key", key=srv_key), "cli": _write(d / "client.pem", cli),
             "cli_key": _write(d / "client.key", key=cli_key)}
    passwd = d / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "cam-07", "s3cret"], check=True,
                   capture_output=True)
    broker = Broker(tmp_path / "broker", extra_conf=(
        f"cafile {files['ca']}\ncertfile {files['srv']}\nkeyfile {files['srv_key']}\n"
        f"require_certificate true\npassword_file {passwd}\nallow_anonymous false\n")).start()
    yield broker, files
    broker.stop()


def _tls_config(tmp_path, keys, broker, files, password):
    return agent_config(tmp_path / "state", keys, f"mqtts://127.0.0.1:{broker.port}",
                        broker={"url": f"mqtts://127.0.0.1:{broker.port}", "ca_file": str(files["ca"]),
                                "cert_file": str(files["cli"]), "key_file": str(files["cli_key"]),
                                "username": "cam-07", "password": password, "keepalive_s": 5})


def test_mqtts_with_client_certificate_and_password(tmp_path, agent_keys, tls_broker):
    broker, files = tls_broker
    agent = Agent(_tls_config(tmp_path, agent_keys, broker, files, "s3cret")).start()
    try:
        wait_for(agent.link.connected.is_set, 20, what="a TLS connection")
        assert agent.link.refused is None
        agent.reporter.report()
        wait_for(lambda: len(agent.outbox) == 0, 20, what="telemetry acknowledged over TLS")
    finally:
        agent.stop(flush_timeout=2)


def test_refused_connection_is_never_marked_connected(tmp_path, agent_keys, tls_broker):
    broker, files = tls_broker
    agent = Agent(_tls_config(tmp_path, agent_keys, broker, files, "wrong")).start()
    try:
        refused = wait_for(lambda: agent.link.refused, 20, what="the broker's refusal")
        assert "Not authorized" in refused or "Bad user name or password" in refused
        assert not agent.link.connected.is_set()
        agent.reporter.report()  # still running: telemetry is buffered, not lost
        assert len(agent.outbox) >= 1
    finally:
        agent.stop(flush_timeout=1)
