"""A paho-mqtt client that reads the socket through a user-space buffer.

paho reads every packet with several ``recv`` calls (1 byte of command, 1 byte per length byte, then the
rest) and ``loop_read`` handles one packet per ``select``. At thousands of small QoS 1 messages per
second those system calls are a large share of the ingest's CPU. This subclass serves ``_sock_recv`` from a
64 KiB buffer filled by one ``recv``, and :meth:`read_available` handles every complete packet already
received before going back to ``select``. Only paho's private ``_sock_recv`` / ``_sock_close`` /
``_packet_read`` / ``_loop_rc_handle`` are used (paho-mqtt is pinned to 2.x); TLS sockets fall back to
paho's own reading.
"""
from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt

BUFFER_BYTES = 65536


class BufferedClient(mqtt.Client):
    """``paho.mqtt.client.Client`` with buffered socket reads (same API)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

    def buffered(self) -> int:
        """Bytes received but not yet handed to paho."""
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
