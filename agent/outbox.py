"""On-disk outbox: every telemetry, event and command-result payload is written here before it is sent.

SQLite (stdlib) in WAL mode in the state directory. A row leaves the outbox only when the broker has
acknowledged it (MQTT PUBACK), so a broker outage or an agent restart loses nothing; QoS 1 may deliver a
message twice, and readers drop the duplicate by (device, session, seq). The outbox is bounded: beyond
``max_messages`` the oldest rows are dropped and counted, and the count goes out in telemetry.

``synchronous=NORMAL`` with WAL survives a killed process (the case that matters on a device that is
restarted or updated); a power cut may lose the last few hundred milliseconds of telemetry.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILENAME = "outbox.sqlite3"


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    """A bounded FIFO of MQTT messages on disk. Thread-safe."""

    def __init__(self, path: str | Path, max_messages: int = 100_000):
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / FILENAME
        self.path = path
        self.max_messages = int(max_messages)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, "
                         "retain INTEGER NOT NULL, created REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._count = self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        # Dropped since this process started (the telemetry figure); the lifetime total is kept in meta.
        self.dropped = 0
        if self._count:
            log.info("outbox %s holds %d unsent message(s) from a previous run", path, self._count)

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Append one message; drops (and counts) the oldest when the outbox is full. Returns its id."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO messages (topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?)",
                    (topic, payload, int(qos), int(bool(retain)), time.time()))
                self._count += 1
                excess = self._count - self.max_messages
                if excess > 0:
                    self._db.execute("DELETE FROM messages WHERE id IN "
                                     "(SELECT id FROM messages ORDER BY id LIMIT ?)", (excess,))
                    self._db.execute("INSERT INTO meta (key, value) VALUES ('dropped_total', ?) ON CONFLICT(key) "
                                     "DO UPDATE SET value = value + excluded.value", (excess,))
                    self._count -= excess
                    self.dropped += excess
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if excess > 0:
                log.warning("outbox full (%d messages): dropped the %d oldest", self.max_messages, excess)
            return int(cur.lastrowid)

    def peek(self, limit: int = 100, after_id: int = 0) -> list[OutboxMessage]:
        """The oldest unsent messages with id greater than ``after_id``, in order."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, qos, retain FROM messages WHERE id > ? "
                                    "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def ack(self, ids: list[int] | int) -> None:
        """The broker has the message(s): remove them."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        if not ids:
            return
        with self._lock:
            cur = self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])
            self._count -= max(0, cur.rowcount)

    def __len__(self) -> int:
        return self._count

    @property
    def dropped_total(self) -> int:
        """Dropped over the outbox's whole life, across restarts."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'dropped_total'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
