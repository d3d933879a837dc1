"""A paho-mqtt client that reads the socket through a user-space buffer.

paho reads every packet with several ``recv`` calls (1 byte of command, 1 byte per length byte, then the
rest) and ``loop_read`` handles one packet per ``select``. At thousands of small QoS 1 messages per
second those system calls are a large share of the ingest's CPU (measured: ~155 -> ~110 us/msg). This
subclass serves ``_sock_recv`` from a 64 KiB buffer filled by one ``recv``, and :meth:`read_available`
handles every complete packet already received before going back to ``select``.

That needs paho's PRIVATE ``_sock``, ``_sock_recv``, ``_sock_close``, ``_packet_read`` and
``_loop_rc_handle`` (:data:`PRIVATE_API`). The ``dashboard`` extra pins paho-mqtt to the releases they
were checked against, ``tests/dashboard/test_mqtt_buffered.py`` fails if one goes away, and
:func:`make_client` falls back to paho's own public reading (slower, same behaviour) when they are
missing, so a paho upgrade can cost speed but never correctness. Manual acknowledgements (the ingest's
durability) use only the public ``manual_ack=True`` / ``Client.ack``. TLS sockets use paho's own reading.
"""
from __future__ import annotations

import logging
import ssl

import paho.mqtt
import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

BUFFER_BYTES = 65536
PRIVATE_API = ("_sock", "_sock_recv", "_sock_close", "_packet_read", "_loop_rc_handle")


def private_api_present() -> bool:
    """Whether this paho still has every private attribute :class:`BufferedClient` relies on."""
    probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    return all(hasattr(probe, name) for name in PRIVATE_API)


class PlainClient(mqtt.Client):
    """``paho.mqtt.client.Client`` with the small interface the ingest's network loop uses, on public API."""

    def buffered(self) -> int:
        """Bytes received but not yet handed to paho (none: paho reads the socket itself)."""
        return 0

    def read_available(self) -> mqtt.MQTTErrorCode:
        """Handle what can be read without blocking."""
        return self.loop_read()

    def drop_connection(self) -> None:
        """Close the connection so that the next turn of the loop reconnects."""
        self.disconnect()


class BufferedClient(PlainClient):
    """``paho.mqtt.client.Client`` with buffered socket reads (same API)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

    def buffered(self) -> int:
        return len(self._rbuf) - self._rpos

    def _sock_recv(self, bufsize: int) -> bytes:
        if isinstance(self._sock, ssl.SSLSocket):
            return super()._sock_recv(bufsize)
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(BUFFER_BYTES)  # BlockingIOError / b"" (EOF) propagate as in paho
            if not data:
                return data
            self._rbuf, self._rpos = data, 0
        out = self._rbuf[self._rpos:self._rpos + bufsize]
        self._rpos += len(out)
        return out

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()

    def drop_connection(self) -> None:
        # Close without a DISCONNECT packet, as a lost connection would: the session stays with the broker.
        self._sock_close()

    def read_available(self, max_packets: int = 10_000) -> mqtt.MQTTErrorCode:
        """Handle every packet that can be read without blocking (``loop_read`` handles one)."""
        for _ in range(max_packets):
            if self._sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS


def make_client(*args, **kwargs) -> PlainClient:
    """A :class:`BufferedClient` when paho has the private API it needs, else a :class:`PlainClient`."""
    if private_api_present():
        return BufferedClient(*args, **kwargs)
    log.warning("paho-mqtt %s lacks private attributes the buffered reader uses (%s); reading through paho's "
                "public loop_read (correct, slower)", getattr(paho.mqtt, "__version__", "?"), ", ".join(PRIVATE_API))
    return PlainClient(*args, **kwargs)
