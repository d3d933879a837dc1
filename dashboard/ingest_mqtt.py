"""The ingest's MQTT side: one connection, a network loop of its own, and acknowledgements after commit.

- MQTT 5 (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``, ``manual_ack=True``). Subscriptions are made in
  ``on_connect`` so a reconnect restores them (see ``ingest.subscriptions``).
- Received messages go to the writer's queue as :class:`~edgeopt.dashboard.ingest_writer.Incoming`,
  tagged with the connection they came on. The writer hands them back through :meth:`MqttLink.committed`
  once their transaction has committed; the network thread then acknowledges (``PUBACK``) those that
  came on the current connection. Earlier connections' messages are not acknowledged: the broker
  delivers them again on the resumed session and the database drops them as duplicates.
- paho is not thread-safe, so every call on the client (acks, publishes, unsubscribe, disconnect) runs on
  the network thread (:meth:`MqttLink.call`), woken through a socket pair.
"""
from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from collections import Counter, deque
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from .ingest_writer import Incoming

if TYPE_CHECKING:
    from .ingest import IngestSettings

log = logging.getLogger(__name__)


class MqttLink:
    """The broker connection of one ingest process."""

    def __init__(self, settings: "IngestSettings", subscriptions: list[str], out: queue.Queue,
                 stop_event: threading.Event, stats: Counter, stats_lock: threading.Lock):
        self.settings = settings
        self.host, self.port = settings.broker_address()
        self.subscriptions = subscriptions
        self.queue, self.stop_event, self.stats, self._lock = out, stop_event, stats, stats_lock
        self.client_id: str | None = settings.client_id
        self.connected = threading.Event()
        self.unsubscribed = threading.Event()
        self.closing = False
        self.client = None
        self.connect_args: dict[str, Any] = {}
        # Work for the network thread: acks of committed messages, and calls.
        self._acks: deque[tuple[int, int, int]] = deque()
        self._calls: deque[Callable[[Any], Any]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conn = 0  # connection generation: an ack goes only to the connection its message came on

    @property
    def acks_pending(self) -> int:
        return len(self._acks)

    def open(self, client_id: str) -> None:
        """Create the client for ``client_id`` with a persistent session and Receive Maximum."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.client_id = client_id
        self.client = self.make_client()
        # A persistent session (clean_start False, an expiry) under a stable client id: what this process
        # received but had not acknowledged when it died is delivered again when it comes back.
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = min(65535, self.settings.max_buffer)
        self.connect_args = dict(keepalive=self.settings.keepalive_s, clean_start=self.settings.session_expiry_s == 0,
                                 properties=props)

    def close(self, drained: bool, deadline: float) -> None:
        """End the connection: with ``drained``, also the broker session (nothing left for it to keep)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if drained:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0

        def _disconnect(c) -> None:
            self.closing = True
            c.disconnect(properties=props)

        if self.connected.is_set():
            self.call(_disconnect)  # on the network thread, which then ends
        else:  # no connection to end: just stop the loop (it may be waiting to reconnect)
            self.closing = True
            self.wake()

    def unsubscribe(self, timeout: float) -> None:
        """Stop new deliveries and wait (up to ``timeout``) for the broker to confirm."""
        self.call(lambda c: c.unsubscribe(self.subscriptions))
        self.unsubscribed.wait(max(0.0, timeout))

    def dispose(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def make_client(self):
        import paho.mqtt.client as mqtt

        from .mqtt_buffered import make_client

        client = make_client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5,
                             manual_ack=True)
        user, password = self.settings.credentials()  # from the mqtts://user:password@ URL, else the fields
        if user:
            client.username_pw_set(user, password)
        if self.settings.tls:
            import ssl

            client.tls_set(ca_certs=self.settings.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.max_queued_messages_set(10_000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = lambda *a: self.unsubscribed.set()
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%s refused the connection: %s", self.host, self.port, reason_code)
            return
        from paho.mqtt.subscribeoptions import SubscribeOptions

        self._conn += 1
        self._acks.clear()  # acks for the previous connection: the broker redelivers those messages
        subs = [(f, SubscribeOptions(qos=1)) for f in self.subscriptions]
        client.subscribe(subs)
        self.stats["connects"] += 1
        log.info("connected to %s:%s as %s (session %s); subscribing to %s", self.host, self.port, self.client_id,
                 "resumed" if flags.session_present else "new", [s for s, _ in subs])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        bad = [rc for rc in reason_codes if rc.is_failure]
        if bad:
            log.error("broker refused subscriptions: %s", bad)
            return
        log.info("subscriptions granted")
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stop_event.is_set() and not self.closing:
            log.warning("disconnected from broker %s:%s (%s); reconnecting", self.host, self.port, reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # paho raises on a topic that is not UTF-8: it becomes a dead letter
            topic = "<topic is not UTF-8>"
        item = Incoming(topic, msg.payload, datetime.now(timezone.utc), msg.mid, msg.qos, self._conn)
        # Receive Maximum keeps the broker from sending more than the queue holds; blocking is the rest.
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def committed(self, items: list[Incoming]) -> None:
        """Called by the writer after a commit: acknowledge those messages (on the network thread)."""
        self._acks.extend((it.conn, it.mid, it.qos) for it in items if it.qos)
        self.wake()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already woken (buffer full) or closing

    def call(self, fn: Callable[[Any], Any]) -> None:
        """Run ``fn(client)`` on the network thread."""
        self._calls.append(fn)
        self.wake()

    def _run_pending(self, client) -> None:
        stale = 0
        while self._acks:
            conn, mid, qos = self._acks.popleft()
            if conn == self._conn and client.is_connected():
                client.ack(mid, qos)
            else:
                stale += 1
        if stale:
            with self._lock:
                self.stats["acks_after_reconnect"] += stale
        while self._calls:
            self._calls.popleft()(client)

    def run(self) -> None:
        """paho's network loop, done here instead of ``loop_start()``: one ``select`` (on the broker socket
        and the wake-up socket of the writer's acks), then every packet already received. Reconnects with
        backoff (1..30 s) for ever. No exception ends it: an unexpected one drops the connection, which
        the next turn opens again (everything unacknowledged is delivered again)."""
        client, state = self.client, {"delay": 1.0, "first": True, "warned": False, "next_try": 0.0}
        while not self.closing and not self.stop_event.is_set():
            try:
                self._network_turn(client, state)
            except Exception:  # noqa: BLE001 - the network thread must not die
                log.exception("MQTT network loop error; reconnecting")
                with self._lock:
                    self.stats["network_errors"] += 1
                client.drop_connection()
                self.stop_event.wait(1.0)

    def _network_turn(self, client, state: dict) -> None:
        import paho.mqtt.client as mqtt

        if self.connected.is_set():
            state["delay"], state["warned"] = 1.0, False  # a session that got its subscriptions resets the backoff
        if client.socket() is None:
            # Backoff between attempts, also when the TCP connect works but the broker refuses us.
            wait = state["next_try"] - time.monotonic()
            if wait > 0:
                self.stop_event.wait(min(wait, 0.5))
                return
            state["next_try"], state["delay"] = time.monotonic() + state["delay"], min(state["delay"] * 2, 30.0)
            try:
                if state["first"]:
                    client.connect(self.host, self.port, **self.connect_args)
                else:
                    client.reconnect()
                state["first"] = False
            except (OSError, mqtt.WebsocketConnectionError) as exc:
                if not state["warned"]:
                    log.warning("cannot reach broker %s:%s (%s); retrying with backoff", self.host, self.port, exc)
                    state["warned"] = True
                return
        sock = client.socket()
        if sock is None:
            return
        try:
            # Bytes already buffered need no select (the socket may have nothing more to say).
            timeout = 0.0 if client.buffered() else 1.0
            readable, writable, _ = select.select([sock, self._wake_r], [sock] if client.want_write() else [], [],
                                                  timeout)
        except (OSError, ValueError):  # closed under us
            readable = writable = []
        if self._wake_r in readable:
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        rc = mqtt.MQTT_ERR_SUCCESS
        if sock in readable or client.buffered():
            rc = client.read_available()
        if rc == mqtt.MQTT_ERR_SUCCESS:
            self._run_pending(client)
        if rc == mqtt.MQTT_ERR_SUCCESS and (writable or client.want_write()):
            rc = client.loop_write()
        if rc == mqtt.MQTT_ERR_SUCCESS:
            rc = client.loop_misc()
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN) and client.socket() is not None:
            client.drop_connection()  # paho closes on most errors itself; make sure, then reconnect above

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish QoS 1 through this process's connection (used by the deployment controller)."""
        if self.client is None:
            raise RuntimeError("ingest client is not running")
        self.call(lambda c: c.publish(topic, payload, qos=1))

