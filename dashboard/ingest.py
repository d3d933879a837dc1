"""The ingest process: MQTT -> validated, batched, idempotent writes to the dashboard database.

Run it with ``edgeopt-dashboard ingest --broker mqtt://host:1883`` (one or more processes).

- MQTT 5 (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``). Subscriptions are made in ``on_connect`` so a
  reconnect restores them: telemetry, events and cmd/result through the shared subscription
  ``$share/<group>/edgeopt/v1/+/+/<kind>`` (processes of one group split the messages), and ``status``
  WITHOUT sharing, because every process must see the retained births and last wills.
- The MQTT thread (``ingest_mqtt.MqttLink``) only queues messages; a writer thread (``ingest_loop.WriterLoop``) validates and
  writes them in batches (every ``batch_size`` messages or ``flush_ms``). A message is acknowledged to
  the broker (MQTT 5 manual acks, ``PUBACK``) only after the transaction holding it, or its dead letter,
  has committed. The process keeps a persistent session under a stable client id (``ingest_health``),
  so whatever it received but had not committed when it was killed - even with kill -9, even during a
  database outage - is delivered again to it when it comes back. Receive Maximum bounds what the broker
  sends before acks (``max_buffer``, at most 65,535): that is the back-pressure while the database is
  down, and the broker holds the rest.
- No message can stop the writer (dead letters, ``ingest_loop``); a supervisor thread restarts any of
  the process's threads that dies anyway, and writes the process's health for ``/healthz`` every
  ``health_every_s``.
- A clean stop unsubscribes, writes and acknowledges what it holds, then ends its broker session; with
  the database down it leaves the session to the broker, which keeps the unacknowledged messages.
- A maintenance thread marks devices offline after 3 telemetry intervals of silence, rolls up and
  applies retention every ``rollup_every_s``, and calls ``edgeopt.dashboard.deployments.tick(session,
  publish, now)`` every ``tick_every_s`` when that module exists.
- A broker outage is survived: the link reconnects with backoff (1..30 s) and resumes its session.
"""
from __future__ import annotations

import importlib
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from edgeopt.sdk import topics
from edgeopt.sdk.errors import ConfigError, MissingDependencyError
from edgeopt.sdk.telemetry import MAX_PAYLOAD_BYTES

from . import ingest_health
from .db import check_connection, data_dir, make_engine, redact
from .ingest_loop import WriterLoop, classify as _classify, first_line as _first_line  # noqa: F401 - re-exported
from .ingest_mqtt import MqttLink
from .ingest_writer import BatchWriter, Incoming, Limits, mark_heartbeat_offline
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
    client_id: str | None = Field(None, description="MQTT client id; default edgeopt-ingest-<host>-<slot>, the "
                                  "slot held by a lock file under data_dir/ingest (see ingest_health).")
    data_dir: str | None = Field(None, description="Where the slot locks live; default the dashboard's data dir.")
    username: str | None = None
    password: str | None = None
    database_url: str | None = Field(None, description="Default: EDGEOPT_DATABASE_URL or local SQLite.")
    batch_size: int = Field(500, ge=1, le=50_000, description="Write after this many messages...")
    flush_ms: int = Field(200, ge=1, le=60_000, description="...or after this many milliseconds.")
    max_buffer: int = Field(100_000, ge=100, description="Messages held unacknowledged in memory (the MQTT "
                            "Receive Maximum, capped at 65,535): the broker holds the rest.")
    max_payload_bytes: int = Field(MAX_PAYLOAD_BYTES, ge=1024)
    max_ts_ahead_s: float = Field(86400.0, gt=0, description="Refuse payloads whose ts is further ahead of "
                                  "their receipt than this (dead letter, reason ts_out_of_window).")
    max_ts_age_s: float = Field(7 * 86400.0, ge=0, description="Refuse telemetry/events/results whose ts is "
                                "older than this at receipt (0: no bound; status is exempt).")
    dead_letters_per_minute: int = Field(1000, ge=0, description="Dead letters stored per minute at most; "
                                         "more are only counted (dead_letter_overflow).")
    health_every_s: float = Field(5.0, gt=0, description="Seconds between health rows (ingest_processes).")
    drain_timeout_s: float = Field(10.0, ge=0, description="On stop: how long to wait for the messages in hand "
                                   "to be written and acknowledged.")
    heartbeat_check_s: float = Field(5.0, gt=0)
    rollup_every_s: float = Field(30.0, ge=0, description="0 disables rollups in this process.")
    tick_every_s: float = Field(2.0, gt=0, description="Deployment controller period.")
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    keepalive_s: int = Field(30, ge=5)
    session_expiry_s: int = Field(3600, ge=0, description="How long the broker keeps this process's session "
                                  "(its unacknowledged and queued QoS 1 messages) while it is away; 0: no "
                                  "persistent session, so a kill -9 loses what was in hand.")

    def limits(self) -> Limits:
        """The writer's acceptance limits from these settings."""
        return Limits(max_bytes=self.max_payload_bytes, max_ahead=timedelta(seconds=self.max_ts_ahead_s),
                      max_age=timedelta(seconds=self.max_ts_age_s) if self.max_ts_age_s else None)

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
    """One ingest process: MQTT client, writer thread, maintenance thread, supervisor."""

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
        self.engine = make_engine(settings.database_url)
        self.client_id = settings.client_id
        self._slot_lock = None
        self.writer = BatchWriter(self.engine, dead_letters_per_minute=settings.dead_letters_per_minute)
        self.queue: queue.Queue[Incoming] = queue.Queue(maxsize=settings.max_buffer)
        self.stop_event = threading.Event()
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self.link = MqttLink(settings, subscriptions(settings.group), self.queue, self.stop_event, self.stats,
                             self._lock)
        self.loop = WriterLoop(self.queue, self.writer, settings.limits(), settings.batch_size, settings.flush_ms,
                               self.stop_event, self.link.committed, self.stats, self._lock)
        self._threads: dict[str, threading.Thread] = {}
        self._targets: dict[str, Callable[[], None]] = {}
        self.restarts: Counter = Counter()
        self.deaths: dict[str, str] = {}
        self.started_at = datetime.now(timezone.utc)

    @property
    def connected(self) -> threading.Event:
        """Set while the broker connection has its subscriptions."""
        return self.link.connected

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish QoS 1 through this process's connection (used by the deployment controller)."""
        self.link.publish(topic, payload)

    # ------------------------------------------------------------------------------------ maintenance
    def _maintenance_loop(self) -> None:
        s = self.settings
        last = {"hb": 0.0, "rollup": time.monotonic(), "tick": 0.0}
        tick = _load_tick()
        steps: list[tuple[str, str, float, Callable[[], None]]] = [
            ("hb", "heartbeat timeout check", s.heartbeat_check_s, self._heartbeat_offline)]
        if tick is not None:
            steps.append(("tick", "deployment tick", s.tick_every_s, lambda: self._tick(tick)))
        if s.rollup_every_s:
            steps.append(("rollup", "rollup", s.rollup_every_s,
                          lambda: log.debug("rollup %s", run_rollup(self.engine, retention=s.retention))))
        while not self.stop_event.wait(0.5):
            for key, what, every, fn in steps:
                if time.monotonic() - last[key] < every or (key == "tick" and not self.connected.is_set()):
                    continue
                last[key] = time.monotonic()
                try:  # each step on its own: one failing must not starve the others
                    fn()
                except DBAPIError as exc:
                    log.warning("%s skipped: database error (%s)", what, _first_line(exc))
                except Exception:  # noqa: BLE001 - a bug in a hook must not stop ingest
                    log.exception("%s failed", what)

    def _heartbeat_offline(self) -> None:
        with Session(self.engine) as session, session.begin():
            n = mark_heartbeat_offline(session, datetime.now(timezone.utc))
        if n:
            log.info("%d device(s) offline: no telemetry for 3 intervals", n)

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

    # ------------------------------------------------------------------------------------- supervisor
    def _spawn(self, name: str) -> None:
        def guarded() -> None:
            try:
                self._targets[name]()
            except BaseException as exc:  # noqa: BLE001 - recorded; the supervisor restarts the thread
                self.deaths[name] = f"{type(exc).__name__}: {exc}"[:500]
                log.critical("thread %s died: %s", name, self.deaths[name], exc_info=True)

        t = threading.Thread(target=guarded, name=f"ingest-{name}", daemon=True)
        self._threads[name] = t
        t.start()

    def _supervise(self) -> None:
        """Restart any thread that died (it cannot, short of a bug) and write the health row."""
        next_beat = 0.0
        while not self.stop_event.wait(0.2):
            for name, t in list(self._threads.items()):
                if name != "supervisor" and not t.is_alive() and not self.stop_event.is_set() and not self.link.closing:
                    self.restarts[name] += 1
                    log.error("thread ingest-%s is dead (%s); restarting it (restart %d)", name,
                              self.deaths.get(name, "returned"), self.restarts[name])
                    self._spawn(name)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.settings.health_every_s
                try:
                    self._beat()
                except Exception as exc:  # noqa: BLE001 - the database may be down; the row goes stale
                    log.debug("health row not written: %s", _first_line(exc))

    def health(self) -> dict[str, Any]:
        """This process's health: threads, restarts, connection, database, messages in hand."""
        threads = {n: t.is_alive() for n, t in self._threads.items()}
        with self._lock:
            counters = {k: v for k, v in self.stats.items()}
        return dict(threads=threads, restarts=dict(self.restarts), deaths=dict(self.deaths),
                    connected=self.connected.is_set(), database="ok" if self.loop.db_ok else "unavailable",
                    in_hand=self.loop.in_hand, queued=self.queue.qsize(), counters=counters,
                    healthy=all(threads.values()) and self.connected.is_set() and self.loop.db_ok)

    def _beat(self) -> None:
        h = self.health()
        row = dict(client_id=self.client_id, host=socket.gethostname()[:255], pid=os.getpid(),
                   started_at=self.started_at, beat_at=datetime.now(timezone.utc),
                   beat_every_s=self.settings.health_every_s, healthy=h.pop("healthy"), details=h)
        with Session(self.engine) as session, session.begin():
            ingest_health.beat(session, row, self.engine.dialect.name)

    # ---------------------------------------------------------------------------------------- control
    def start(self) -> None:
        """Start the threads and the MQTT connection (returns at once; connection retried in background)."""
        check_connection(self.engine)
        if self.client_id is None:
            self.client_id, self._slot_lock = ingest_health.claim_client_id(
                Path(self.settings.data_dir) if self.settings.data_dir else data_dir())
        self.writer.name = self.client_id
        self.link.open(self.client_id)
        self._targets = {"writer": self.loop.run, "maint": self._maintenance_loop, "mqtt": self.link.run}
        for name in self._targets:
            self._spawn(name)
        self._targets["supervisor"] = self._supervise
        self._spawn("supervisor")
        log.info("ingest %s started: broker %s, database %s, group %r", self.client_id, redact_broker(self.settings.broker),
                 redact(str(self.engine.url)), self.settings.group)

    def stop(self, timeout: float | None = None) -> None:
        """Stop receiving, write and acknowledge what is in hand, end the broker session, stop the threads.
        With the database down the session is kept: the broker holds what was not acknowledged."""
        timeout = self.settings.drain_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        drained = False
        if self.link.client is not None:
            if self.connected.is_set():
                self.link.unsubscribe(min(5.0, deadline - time.monotonic()))
                while time.monotonic() < deadline and not self._idle():
                    time.sleep(0.05)
                drained = self._idle()
            if not drained:
                log.warning("stopping with %d messages not acknowledged: the broker keeps them for %s",
                            self.loop.in_hand + self.queue.qsize(), self.client_id)
            self.link.close(drained, deadline)
            self._threads["mqtt"].join(5)
            self.link.closing = True
        self.stop_event.set()
        for t in self._threads.values():
            t.join(max(0.1, deadline - time.monotonic()))
        if drained:
            try:
                with Session(self.engine) as session, session.begin():
                    ingest_health.forget(session, self.client_id)
            except DBAPIError:
                pass
        self.engine.dispose()
        self.link.dispose()
        if self._slot_lock is not None:
            self._slot_lock.close()  # frees the slot (and its session) for the next process
        log.info("ingest stopped: %s", " ".join(f"{k}={v}" for k, v in sorted(self.stats.items())))

    def _idle(self) -> bool:
        return self.queue.empty() and self.loop.items is None and not self.link.acks_pending

    def run_forever(self) -> None:
        """Run until SIGTERM/SIGINT."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        while not done.wait(1.0):
            if not self._threads["supervisor"].is_alive():  # the supervisor's own supervisor
                self.restarts["supervisor"] += 1
                log.error("supervisor thread is dead (%s); restarting it", self.deaths.get("supervisor", "returned"))
                self._spawn("supervisor")
        log.info("stopping ingest")
        self.stop()

def _load_tick() -> Callable[..., Any] | None:
    """The deployment controller's ``tick(session, publish, now)`` if the module exists."""
    try:
        mod = importlib.import_module("edgeopt.dashboard.deployments")
    except ModuleNotFoundError as exc:
        if exc.name != "edgeopt.dashboard.deployments":
            raise
        return None
    return getattr(mod, "tick", None)
