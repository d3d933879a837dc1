"""Publishing commands from the web process: a short-lived MQTT 5 client per batch of commands.

Web workers come and go (gunicorn), so they keep no long-lived connection; a deployment publishes a
handful of commands at once, and one connection per batch costs a few milliseconds. QoS 1, and the
publish waits for the broker's PUBACK: a command counts as sent only when the broker has it.
"""
from __future__ import annotations

import logging
import secrets
import threading
from contextlib import contextmanager
from typing import Callable, Iterator
from urllib.parse import unquote, urlparse

from edgeopt.sdk.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)


def parse_broker_url(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` -> (host, port, tls, username, password)."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
        raise ConfigError(f"invalid broker URL {url!r}", hint="expected mqtt://host:1883 or mqtts://host:8883")
    tls = u.scheme in ("mqtts", "ssl")
    return (u.hostname, u.port or (8883 if tls else 1883), tls,
            unquote(u.username) if u.username else None, unquote(u.password) if u.password else None)


class BrokerPublisher:
    """``publish(topic, payload)`` over a connection opened on the first call and closed by :meth:`close`
    (or the ``with`` block). Raises :class:`UnavailableError` when the broker cannot be reached, refuses
    the connection, or does not acknowledge a message in time."""

    def __init__(self, broker_url: str, timeout_s: float = 5.0, ca_file: str | None = None):
        self.host, self.port, self.tls, self.user, self.password = parse_broker_url(broker_url)
        self.ca_file = ca_file
        self.safe_url = f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
        self.timeout_s = timeout_s
        self._client = None

    def __enter__(self) -> "BrokerPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgeopt-web-{secrets.token_hex(6)}",
                             protocol=mqtt.MQTTv5)
        if self.user:
            client.username_pw_set(self.user, self.password)
        if self.tls:
            # The broker's CA (EDGEOPT_BROKER_CA) when it is a private one, else the system's.
            client.tls_set(ca_certs=self.ca_file)
        connected = threading.Event()
        outcome: dict[str, str] = {}

        def on_connect(_c, _u, _flags, reason_code, _props):
            if reason_code.is_failure:
                outcome["error"] = f"broker refused the connection: {reason_code}"
            connected.set()

        client.on_connect = on_connect
        try:
            client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise UnavailableError(f"MQTT broker {self.safe_url} is unreachable: {exc.strerror or exc}",
                                   hint="check that the broker runs and EDGEOPT_BROKER_URL is right") from None
        client.loop_start()
        if not connected.wait(self.timeout_s) or "error" in outcome:
            client.loop_stop()
            client.disconnect()
            raise UnavailableError(f"MQTT broker {self.safe_url}: "
                                   f"{outcome.get('error', 'no CONNACK within the timeout')}")
        self._client = client
        return client

    def __call__(self, topic: str, payload: bytes) -> None:
        client = self._client or self._connect()
        info = client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(self.timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise UnavailableError(f"MQTT broker {self.safe_url}: publish to {topic} failed: {exc}") from None
        if not info.is_published():
            raise UnavailableError(f"MQTT broker {self.safe_url}: no acknowledgement for {topic} "
                                   f"within {self.timeout_s:.0f} s")
        log.debug("published %d bytes to %s", len(payload), topic)

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


@contextmanager
def mqtt_publisher(broker_url: str, timeout_s: float = 5.0,
                   ca_file: str | None = None) -> Iterator[Callable[[str, bytes], None]]:
    """``with mqtt_publisher(url) as publish: publish(topic, payload)``; connects lazily."""
    pub = BrokerPublisher(broker_url, timeout_s, ca_file)
    try:
        yield pub
    finally:
        pub.close()
