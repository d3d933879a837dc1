"""The agent's MQTT link (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``, MQTT 5).

* Birth and will: the retained ``status`` topic carries ``online`` (published in ``on_connect``, with
  capabilities and installed packages) and ``offline`` (the last will, and on a clean stop).
* Everything else (telemetry, events, command results) goes through the on-disk :class:`Outbox`: a pump
  thread hands rows to paho in order, at most ``WINDOW`` unacknowledged at a time, and deletes a row only
  when its PUBACK arrives (``on_publish`` with the message id). paho keeps unacknowledged QoS 1 messages
  across reconnects and resends them; an agent restart resends whatever the outbox still holds.
* Commands arrive on ``cmd`` (subscribed inside ``on_connect`` so a reconnect restores it) and are handed
  to a callback on a separate thread, so a slow command never stalls the network loop.

A refused connection (``reason_code.is_failure``) is logged and never marked connected; an unreachable
broker is not fatal: paho retries with backoff while the outbox buffers.
"""
from __future__ import annotations

import collections
import logging
import queue
import ssl
import threading
import time
import uuid
from itertools import count
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..sdk import topics
from ..sdk.telemetry import StatusPayload
from .outbox import Outbox

log = logging.getLogger(__name__)

WINDOW = 20  # unacknowledged QoS 1 messages in flight (paho's own default)
SESSION_EXPIRY_S = 3600  # the broker keeps our cmd subscription (and queued commands) over short outages


class Envelope:
    """Stamps payloads with this device's id, the session id (new every start) and the per-session seq."""

    def __init__(self, device_id: str, session_id: str | None = None):
        self.device_id = device_id
        self.session_id = session_id or uuid.uuid4().hex[:16]
        self._seq = count()
        self._lock = threading.Lock()

    def next_seq(self) -> int:
        with self._lock:
            return next(self._seq)

    def make(self, payload_cls: type, **fields: Any):
        """A payload model instance with the envelope fields filled in."""
        return payload_cls(device_id=self.device_id, session_id=self.session_id, seq=self.next_seq(), **fields)


class MqttLink:
    """Connection, birth/will, outbox pump and command intake for one agent."""

    def __init__(self, config: Any, envelope: Envelope, outbox: Outbox, *,
                 status_fields: Callable[[], dict[str, Any]] = dict,
                 on_command: Callable[[bytes], None] | None = None, client_id: str | None = None):
        self.config = config
        self.broker = config.broker
        self.envelope = envelope
        self.outbox = outbox
        self.status_fields = status_fields
        self.on_command = on_command
        self.fleet, self.device_id = config.fleet, config.device_id
        self.topic = {kind: topics.topic(self.fleet, self.device_id, kind) for kind in topics.KINDS}
        self.connected = threading.Event()
        self.refused: str | None = None  # the broker's last refusal reason, for logs and tests
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._acks: collections.deque[int] = collections.deque()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id (owned by the pump thread)
        self._handed = 0  # highest outbox id handed to paho in this process
        self._commands: queue.Queue[bytes | None] = queue.Queue()
        self.published = 0
        self.client = self._make_client(client_id or f"edgeopt-agent-{self.device_id}")
        self._pump_thread = threading.Thread(target=self._pump, name="mqtt-outbox", daemon=True)
        self._cmd_thread = threading.Thread(target=self._command_loop, name="mqtt-commands", daemon=True)

    # ------------------------------------------------------------------ setup
    def _make_client(self, client_id: str) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if self.broker.tls:
            client.tls_set(ca_certs=str(self.broker.ca_file) if self.broker.ca_file else None,
                           certfile=str(self.broker.cert_file) if self.broker.cert_file else None,
                           keyfile=str(self.broker.key_file) if self.broker.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED)
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        will = self.envelope.make(StatusPayload, state="offline")
        client.will_set(self.topic["status"], will.to_json(), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(WINDOW)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def start(self) -> "MqttLink":
        """Connect in the background (retrying with backoff) and start the pump; never blocks on the broker."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s,
                                  clean_start=False, properties=props)
        self.client.loop_start()
        self._pump_thread.start()
        self._cmd_thread.start()
        log.info("MQTT: connecting to %s:%d as %s/%s", self.broker.host, self.broker.port, self.fleet, self.device_id)
        return self

    # ------------------------------------------------------------------ paho callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            # Never treat a refusal (bad credentials, not authorised) as connected; paho keeps retrying.
            self.refused = str(reason_code)
            self.connected.clear()
            log.error("MQTT: broker %s refused the connection: %s", self.broker.url, reason_code)
            return
        self.refused = None
        client.subscribe(self.topic["cmd"], qos=1)
        self.publish_status()
        self.connected.set()
        self._wake.set()
        log.info("MQTT: connected to %s", self.broker.url)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._stopping.is_set():
            log.warning("MQTT: disconnected (%s); buffering in the outbox and reconnecting", reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Called with paho's outgoing-message lock held: only record the ack; the pump does the rest.
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            log.warning("MQTT: broker refused message %d: %s (dropped)", mid, reason_code)
        self._acks.append(mid)
        self._wake.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("MQTT: subscription to %s refused: %s", self.topic["cmd"], rc)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.topic["cmd"]:
            self._commands.put(bytes(message.payload))

    # ------------------------------------------------------------------ publishing
    def publish_status(self, state: str = "online") -> mqtt.MQTTMessageInfo | None:
        """The retained status message (direct, not through the outbox: only the latest one matters)."""
        try:
            fields = self.status_fields() if state == "online" else {}
            payload = self.envelope.make(StatusPayload, state=state, **fields)
        except Exception:  # a broken probe must not stop the agent from connecting
            log.exception("MQTT: cannot build the status payload")
            payload = self.envelope.make(StatusPayload, state=state)
        return self.client.publish(self.topic["status"], payload.to_json(), qos=1, retain=True)

    def emit(self, kind: str, payload: Any) -> int:
        """Queue a payload model for ``kind`` (telemetry, events, cmd/result) in the outbox; returns its row id."""
        row = self.outbox.put(self.topic[kind], payload.to_json(), qos=1)
        self._wake.set()
        return row

    def _pump(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._pump_once()
            except Exception:  # keep pumping: one bad row or a sqlite hiccup must not stop telemetry
                log.exception("MQTT: outbox pump failed; retrying")
                time.sleep(1.0)

    def _pump_once(self) -> None:
        done = []
        while self._acks:
            row = self._inflight.pop(self._acks.popleft(), None)
            if row is not None:
                done.append(row)
        if done:
            self.outbox.ack(done)
            self.published += len(done)
        if not self.connected.is_set():
            return
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        for msg in self.outbox.peek(room, after_id=self._handed):
            try:
                info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            except ValueError as exc:  # oversize or invalid: it can never be sent
                log.error("MQTT: dropping outbox message %d: %s", msg.id, exc)
                self.outbox.ack(msg.id)
                self._handed = msg.id
                continue
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("MQTT: publish of outbox message %d failed (%s); will retry", msg.id, info.rc)
                return
            # NO_CONN: paho has queued the QoS 1 message and sends it on reconnect; track it the same way.
            self._inflight[info.mid] = msg.id
            self._handed = msg.id

    # ------------------------------------------------------------------ commands
    def _command_loop(self) -> None:
        while True:
            raw = self._commands.get()
            if raw is None:
                return
            # Commands queued by the broker arrive on connect, possibly before the daemon has finished
            # starting (models loading): hold them until it installs its handler instead of dropping them.
            while self.on_command is None and not self._stopping.is_set():
                time.sleep(0.05)
            if self.on_command is None:
                return
            try:
                self.on_command(raw)
            except Exception:  # a command must never take the agent down
                log.exception("MQTT: command handler failed")

    # ------------------------------------------------------------------ shutdown
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the outbox is empty (best effort while connected). True when everything was acked."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.outbox) == 0:
                return True
            if not self.connected.is_set():
                return False
            self._wake.set()
            time.sleep(0.02)
        return len(self.outbox) == 0

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Flush the outbox, publish ``offline`` (retained), disconnect cleanly and stop the threads."""
        flushed = self.flush(flush_timeout) if self.connected.is_set() else False
        if self.connected.is_set():
            info = self.publish_status("offline")
            try:
                if info is not None:
                    info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self._stopping.set()
        self._wake.set()
        self._commands.put(None)
        self.client.disconnect()
        self.client.loop_stop()
        self._pump_thread.join(2.0)
        self._cmd_thread.join(2.0)
        log.info("MQTT: stopped (%s; %d message(s) left in the outbox)",
                 "outbox flushed" if flushed else "outbox not flushed", len(self.outbox))
