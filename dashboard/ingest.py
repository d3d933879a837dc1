"""The ingest process: MQTT -> validated, batched, idempotent writes to the dashboard database.

Run it with ``edgeopt-dashboard ingest --broker mqtt://host:1883`` (one or more processes).

- MQTT 5 (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``). Subscriptions are made in ``on_connect`` so a
  reconnect restores them: telemetry, events and cmd/result through the shared subscription
  ``$share/<group>/edgeopt/v1/+/+/<kind>`` (processes of one group split the messages), and ``status``
  WITHOUT sharing, because every process must see the retained births and last wills.
- The MQTT thread only queues messages (bounded); a writer thread validates and writes them in batches
  (every ``batch_size`` messages or ``flush_ms``). When the database is down the writer keeps its batch
  and retries with backoff (one log line per outage); the queue then fills up to its bound and the MQTT
  thread waits, which stops the broker sending more: nothing is dropped within the bound.
- A maintenance thread marks devices offline after 3 telemetry intervals of silence, rolls up and
  applies retention every ``rollup_every_s``, and calls ``edgeopt.dashboard.deployments.tick(session,
  publish, now)`` every ``tick_every_s`` when that module exists.
- A broker outage is survived: paho reconnects with backoff (1..30 s).
"""
from __future__ import annotations

import importlib
import logging
import os
import queue
import select
import signal
import socket
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from edgeopt.sdk import topics
from edgeopt.sdk.errors import ConfigError, MissingDependencyError
from edgeopt.sdk.telemetry import MAX_PAYLOAD_BYTES

from .db import check_connection, make_engine, redact
from .ingest_writer import BatchWriter, Incoming, add_counters, mark_heartbeat_offline, prepare
from .rollup import RetentionSettings, run_rollup

log = logging.getLogger(__name__)

SHARED_KINDS = ("telemetry", "events", "cmd/result")
TICK_LOCK = 0x65646774  # PostgreSQL advisory lock key of the deployment tick


class IngestSettings(BaseModel):
    """Settings of one ingest process."""

    model_config = ConfigDict(extra="forbid")
    broker: str = Field("mqtt://127.0.0.1:1883",
                        description="mqtt://[user:password@]host:port, or mqtts://... for TLS (the ingest account).")
    ca_file: str | None = Field(None, description="PEM CA of the broker's certificate (mqtts; default: the system's).")
    command_broker: str | None = Field(
        None, description="Broker URL of the dashboard account, which later rollout stages are published with "
                          "(the ingest account may only read); default: this process's own connection.")
    group: str = Field(topics.SHARED_GROUP, description="Shared subscription group; '' for no sharing.")
    client_id: str | None = Field(None, description="MQTT client id; default edgeopt-ingest-<host>-<pid>.")
    username: str | None = None
    password: str | None = None
    database_url: str | None = Field(None, description="Default: EDGEOPT_DATABASE_URL or local SQLite.")
    batch_size: int = Field(500, ge=1, le=50_000, description="Write after this many messages...")
    flush_ms: int = Field(200, ge=1, le=60_000, description="...or after this many milliseconds.")
    max_buffer: int = Field(100_000, ge=100, description="Messages held in memory while the database is down.")
    max_payload_bytes: int = Field(MAX_PAYLOAD_BYTES, ge=1024)
    heartbeat_check_s: float = Field(5.0, gt=0)
    rollup_every_s: float = Field(30.0, ge=0, description="0 disables rollups in this process.")
    tick_every_s: float = Field(2.0, gt=0, description="Deployment controller period.")
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    keepalive_s: int = Field(30, ge=5)
    session_expiry_s: int = Field(3600, ge=0, description="With a fixed client_id: how long the broker keeps "
                                  "the session (and queues QoS 1 messages) while this process is away.")

    def broker_address(self) -> tuple[str, int]:
        u = urlparse(self.broker)
        if u.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not u.hostname:
            raise ConfigError(f"invalid broker URL {redact_broker(self.broker)!r}",
                              hint="expected mqtt://host:port or mqtts://user:password@host:8883")
        return u.hostname, u.port or (8883 if self.tls else 1883)

    @property
    def tls(self) -> bool:
        return urlparse(self.broker).scheme in ("mqtts", "ssl")

    def credentials(self) -> tuple[str | None, str | None]:
        """User name and password: from the URL, else the fields."""
        u = urlparse(self.broker)
        if u.username:
            return unquote(u.username), unquote(u.password) if u.password else None
        return self.username, self.password


def redact_broker(url: str) -> str:
    """A broker URL without its password, for logs."""
    u = urlparse(url)
    if u.password:
        return u._replace(netloc=u.netloc.rsplit("@", 1)[0].split(":", 1)[0] + ":***@"
                          + u.netloc.rsplit("@", 1)[1]).geturl()
    return url


def subscriptions(group: str) -> list[str]:
    """The topic filters an ingest process subscribes to."""
    shared = group or None
    return [topics.subscription(k, shared_group=shared) for k in SHARED_KINDS] + [topics.subscription("status")]


class IngestService:
    """One ingest process: MQTT client, writer thread, maintenance thread."""

    def __init__(self, settings: IngestSettings, signer: Any = None):
        try:
            import paho.mqtt.client as mqtt  # noqa: F401
        except ImportError:
            raise MissingDependencyError("paho-mqtt is not installed",
                                         hint="install it with: pip install 'edgeopt[dashboard]'") from None
        self.settings = settings
        # The dashboard's command signer (edgeopt.dashboard.command_signing): later rollout stages are
        # signed commands; without one they are not sent and the deployment says so.
        self.signer = signer
        self.host, self.port = settings.broker_address()
        self.engine = make_engine(settings.database_url)
        self.writer = BatchWriter(self.engine)
        self.queue: queue.Queue[Incoming] = queue.Queue(maxsize=settings.max_buffer)
        self.stop_event = threading.Event()
        self.connected = threading.Event()
        self.stats: Counter = Counter()
        self._threads: list[threading.Thread] = []
        self._client = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- mqtt side
    def _make_client(self):
        import paho.mqtt.client as mqtt

        from .mqtt_buffered import BufferedClient

        cid = self.settings.client_id or f"edgeopt-ingest-{socket.gethostname()}-{os.getpid()}"
        client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        user, password = self.settings.credentials()
        if user:
            client.username_pw_set(user, password)
        if self.settings.tls:
            import ssl

            client.tls_set(ca_certs=self.settings.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(10_000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%s refused the connection: %s", self.host, self.port, reason_code)
            return
        from paho.mqtt.subscribeoptions import SubscribeOptions

        subs = [(f, SubscribeOptions(qos=1)) for f in subscriptions(self.settings.group)]
        client.subscribe(subs)
        self.stats["connects"] += 1
        log.info("connected to %s:%s; subscribing to %s", self.host, self.port, [s for s, _ in subs])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        bad = [rc for rc in reason_codes if rc.is_failure]
        if bad:
            log.error("broker refused subscriptions: %s", bad)
            return
        log.info("subscriptions granted")
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stop_event.is_set():
            log.warning("disconnected from broker %s:%s (%s); reconnecting", self.host, self.port, reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        item = Incoming(msg.topic, msg.payload, datetime.now(timezone.utc))
        # Blocking when full is the back-pressure: paho stops reading, the broker holds the messages.
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _network_loop(self) -> None:
        """paho's network loop, done here instead of ``loop_start()``: one ``select``, then every packet
        already received (:class:`BufferedClient`; paho's own loop reads one packet per ``select``, each
        with several ``recv`` calls). Reconnects with backoff (1..30 s) for ever."""
        import paho.mqtt.client as mqtt

        client, delay, first, warned, next_try = self._client, 1.0, True, False, 0.0
        while not self._closing and not self.stop_event.is_set():
            if self.connected.is_set():
                delay, warned = 1.0, False  # a session that got its subscriptions resets the backoff
            if client.socket() is None:
                # Backoff between attempts, also when the TCP connect works but the broker refuses us.
                wait = next_try - time.monotonic()
                if wait > 0:
                    self.stop_event.wait(wait)
                    continue
                next_try, delay = time.monotonic() + delay, min(delay * 2, 30.0)
                try:
                    if first:
                        client.connect(self.host, self.port, **self._connect_args)
                    else:
                        client.reconnect()
                    first = False
                except (OSError, mqtt.WebsocketConnectionError) as exc:
                    if not warned:
                        log.warning("cannot reach broker %s:%s (%s); retrying with backoff", self.host, self.port, exc)
                        warned = True
                    continue
            sock = client.socket()
            if sock is None:
                continue
            try:
                # Bytes already buffered need no select (the socket may have nothing more to say).
                timeout = 0.0 if client.buffered() else 1.0
                readable, writable, _ = select.select([sock], [sock] if client.want_write() else [], [], timeout)
            except (OSError, ValueError):  # closed under us (disconnect from another thread)
                readable = writable = []
            rc = mqtt.MQTT_ERR_SUCCESS
            if readable or client.buffered():
                rc = client.read_available()
            if rc == mqtt.MQTT_ERR_SUCCESS and (writable or client.want_write()):
                rc = client.loop_write()
            if rc == mqtt.MQTT_ERR_SUCCESS:
                rc = client.loop_misc()
            if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN) and client.socket() is not None:
                client._sock_close()  # paho closes on most errors itself; make sure, then reconnect above

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish QoS 1 through this process's connection (used by the deployment controller)."""
        if self._client is None:
            raise RuntimeError("ingest client is not running")
        self._client.publish(topic, payload, qos=1)

    # ----------------------------------------------------------------------------------- writer side
    def _take_batch(self) -> list[Incoming]:
        s = self.settings
        batch: list[Incoming] = []
        deadline = time.monotonic() + s.flush_ms / 1000
        while len(batch) < s.batch_size:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                batch.append(self.queue.get(timeout=timeout))
            except queue.Empty:
                break
            # Drain what is already there without waiting.
            while len(batch) < s.batch_size:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
        return batch

    def _write_loop(self) -> None:
        delay = 0.5
        down_since: float | None = None
        pending = None
        failures = 0
        while True:
            if pending is None:
                items = self._take_batch()
                if not items:
                    if self.stop_event.is_set():
                        return
                    continue
                pending = prepare(items, self.settings.max_payload_bytes)
            try:
                now = datetime.now(timezone.utc)
                res = self.writer.write(pending, now)
                with self._lock:
                    self.stats["written"] += pending.size
                    self.stats["telemetry"] += res.telemetry_msgs
                    self.stats["duplicates"] += res.duplicates
                    self.stats["rejected"] += sum(pending.counters.values()) - pending.counters["duplicate"]
                if down_since is not None:
                    log.warning("database is back after %.1f s; writing resumed", time.monotonic() - down_since)
                    down_since, delay = None, 0.5
                pending, failures = None, 0
            except Exception as exc:  # noqa: BLE001 - the writer thread must never die
                kind = _classify(exc)
                if kind == "refused":
                    # A device deleted while cached, or a row no constraint allows: write one by one so one
                    # bad message cannot block the rest.
                    log.warning("batch refused by the database (%s); writing messages one by one", _first_line(exc))
                    self.writer.forget_devices()
                    self._write_singly(pending)
                    pending = None
                elif kind == "conflict":
                    # Deadlock or serialization failure with another ingest process: just run it again.
                    log.info("batch rolled back by the database (%s); retrying", _first_line(exc))
                    self.writer.forget_devices()
                elif kind == "unavailable":
                    if down_since is None:
                        down_since = time.monotonic()
                        log.error("database %s unavailable (%s); holding %d messages in memory and retrying",
                                  redact(str(self.engine.url)), _first_line(exc), pending.size + self.queue.qsize())
                    self.writer.forget_devices()
                    if self.stop_event.wait(delay) and self._give_up_on_stop():
                        return
                    delay = min(delay * 2, 10.0)
                else:
                    failures += 1
                    log.exception("unexpected error writing a batch of %d messages (attempt %d)", pending.size, failures)
                    self.writer.forget_devices()
                    if failures >= 3:  # give the batch one message at a time rather than block ingest
                        self._write_singly(pending)
                        pending, failures = None, 0
                    elif self.stop_event.wait(delay):
                        return

    def _give_up_on_stop(self) -> bool:
        # Stopping while the database is down: the messages held are lost; say how many.
        log.error("stopping with the database unavailable: %d messages not written", self.queue.qsize())
        return True

    def _write_singly(self, batch) -> None:
        from .ingest_writer import Prepared

        now = datetime.now(timezone.utc)
        parts: list[Prepared] = []
        for device_id, row in batch.telemetry:
            key = (device_id, row["session_id"], row["seq"])
            p = Prepared(telemetry=[(device_id, row)], telemetry_msgs={key: 1},
                         fleets={device_id: batch.fleets[device_id]},
                         touch={device_id: batch.touch[device_id]} if device_id in batch.touch else {})
            parts.append(p)
        for device_id, row in batch.events:
            parts.append(Prepared(events=[(device_id, row)], fleets={device_id: batch.fleets[device_id]}))
        for device_id, row in batch.results:
            parts.append(Prepared(results=[(device_id, row)], fleets={device_id: batch.fleets[device_id]}))
        for device_id, p, received in batch.statuses:
            parts.append(Prepared(statuses=[(device_id, p, received)], fleets={device_id: batch.fleets[device_id]}))
        failed = 0
        for part in parts:
            try:
                self.writer.write(part, now)
            except Exception as exc:  # noqa: BLE001 - one message; counted, logged, not retried
                failed += 1
                log.warning("message refused by the database: %s", _first_line(exc))
                self.writer.forget_devices()
        counters = Counter(batch.counters)
        if failed:
            counters["db_refused"] += failed
        if counters:
            with Session(self.engine) as session, session.begin():
                add_counters(session, counters, now, self.engine.dialect.name)

    # ------------------------------------------------------------------------------------ maintenance
    def _maintenance_loop(self) -> None:
        s = self.settings
        last = {"hb": 0.0, "rollup": time.monotonic(), "tick": 0.0}
        tick = _load_tick()
        while not self.stop_event.wait(0.5):
            mono = time.monotonic()
            try:
                if mono - last["hb"] >= s.heartbeat_check_s:
                    last["hb"] = mono
                    with Session(self.engine) as session, session.begin():
                        n = mark_heartbeat_offline(session, datetime.now(timezone.utc))
                    if n:
                        log.info("%d device(s) offline: no telemetry for 3 intervals", n)
                if tick is not None and mono - last["tick"] >= s.tick_every_s and self.connected.is_set():
                    last["tick"] = mono
                    self._tick(tick)
                if s.rollup_every_s and mono - last["rollup"] >= s.rollup_every_s:
                    last["rollup"] = mono
                    st = run_rollup(self.engine, retention=s.retention)
                    log.debug("rollup %s", st)
            except DBAPIError as exc:
                log.warning("maintenance skipped: database error (%s)", str(exc.orig or exc).splitlines()[0])
            except Exception:  # a bug in a hook must not stop ingest
                log.exception("maintenance step failed")

    def _tick(self, tick: Callable[..., Any]) -> None:
        """One deployment-controller step. On PostgreSQL a session advisory lock lets only one of several
        ingest processes run it at a time (the others skip this period), so no command is sent twice."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            pg = conn.dialect.name == "postgresql"
            if pg:
                got = conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": TICK_LOCK})
                conn.commit()
                if not got:
                    return
            try:
                with Session(bind=conn) as session, self._command_publisher() as publish:
                    tick(session, publish, datetime.now(timezone.utc), signer=self.signer)
                    session.commit()
            finally:
                if pg:
                    conn.rollback()
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": TICK_LOCK})
                    conn.commit()

    def _command_publisher(self):
        """Publish commands as the dashboard account when one is configured (connects only if used)."""
        from contextlib import nullcontext

        if not self.settings.command_broker:
            return nullcontext(self.publish)
        from .mqtt_publish import mqtt_publisher

        return mqtt_publisher(self.settings.command_broker, ca_file=self.settings.ca_file)

    # ---------------------------------------------------------------------------------------- control
    def start(self) -> None:
        """Start the threads and the MQTT connection (returns at once; connection retried in background)."""
        check_connection(self.engine)
        self._client = self._make_client()
        for target, name in ((self._write_loop, "ingest-writer"), (self._maintenance_loop, "ingest-maint")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        props, clean = None, True
        if self.settings.client_id:
            # A fixed client id asks for a persistent session: the broker keeps the subscriptions and queues
            # QoS 1 messages while this process restarts. Random ids (the default) must not, or every
            # restart would leave an orphan session behind holding its share of the messages.
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.settings.session_expiry_s
            clean = False
        self._connect_args = dict(keepalive=self.settings.keepalive_s, clean_start=clean, properties=props)
        self._closing = False
        net = threading.Thread(target=self._network_loop, name="ingest-mqtt", daemon=True)
        net.start()
        self._net_thread = net
        log.info("ingest started: broker %s, database %s, group %r", redact_broker(self.settings.broker),
                 redact(str(self.engine.url)), self.settings.group)

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect, write what is queued, stop the threads."""
        if self._client is not None:
            self._closing = True
            self._client.disconnect()
            self._net_thread.join(5)
        deadline = time.monotonic() + timeout
        while not self.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop_event.set()
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        self.engine.dispose()
        log.info("ingest stopped: %s", " ".join(f"{k}={v}" for k, v in sorted(self.stats.items())))

    def run_forever(self) -> None:
        """Run until SIGTERM/SIGINT."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        log.info("stopping ingest")
        self.stop()


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _classify(exc: BaseException) -> str:
    """How the writer reacts to a database error: "refused" (a constraint: write one by one), "conflict"
    (deadlock / serialization: retry now), "unavailable" (connection, timeout, locked: retry with
    backoff) or "unexpected". Errors come wrapped by SQLAlchemy or, from the COPY fast path, raw psycopg."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(exc, IntegrityError):
        return "refused"
    try:
        import psycopg
    except ImportError:  # SQLite-only installs
        psycopg = None
    if psycopg is not None and isinstance(orig, psycopg.Error):
        if isinstance(orig, psycopg.IntegrityError):
            return "refused"
        if (getattr(orig, "sqlstate", None) or "").startswith("40"):  # class 40: deadlock, serialization
            return "conflict"
        if isinstance(orig, (psycopg.OperationalError, psycopg.InterfaceError)):
            return "unavailable"
        return "unexpected"
    if isinstance(exc, OperationalError) or getattr(exc, "connection_invalidated", False):
        return "unavailable"
    return "unexpected"


def _load_tick() -> Callable[..., Any] | None:
    """The deployment controller's ``tick(session, publish, now)`` if the module exists."""
    try:
        mod = importlib.import_module("edgeopt.dashboard.deployments")
    except ModuleNotFoundError as exc:
        if exc.name != "edgeopt.dashboard.deployments":
            raise
        return None
    return getattr(mod, "tick", None)
