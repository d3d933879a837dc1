"""On-disk outbox: every telemetry, event and command-result payload is written here before it is sent.

SQLite (stdlib) in WAL mode in the state directory. A row leaves the outbox only when the broker has
acknowledged it (MQTT PUBACK), so a broker outage or an agent restart loses nothing; QoS 1 may deliver a
message twice, and readers drop the duplicate by (device, session, seq). The outbox is bounded: beyond
``max_messages`` the oldest rows are dropped and counted, and the count goes out in telemetry.

``synchronous=NORMAL`` with WAL survives a killed process (the case that matters on a device that is
restarted or updated); a power cut may lose the last few hundred milliseconds of telemetry.

A full disk (the state directory shares its filesystem with logs and other software, and the outbox itself
grows while the broker is away) must not stop the agent. On a full disk SQLite can add no row, and not
even delete one, since a delete is written to the WAL first. So:

* Below :data:`LOW_SPACE_BYTES` free on the device the outbox stops growing: it holds at most as many rows
  as it held then, each new message replacing the oldest one (counted in ``dropped``), so SQLite reuses
  the pages they leave and needs no new space.
* It keeps a small ballast file, as CockroachDB does in its store directories: if the disk fills up anyway
  (another program), the ballast is deleted, which gives SQLite the room to drop the oldest rows and
  checkpoint. A message that still does not fit is dropped and counted.
* Acks that cannot be written are kept and applied later. When space returns, the outbox grows again and
  the ballast is put back; nothing needs a restart.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILENAME = "outbox.sqlite3"
BALLAST_NAME = "outbox.ballast"
BALLAST_BYTES = 4 * 1024 * 1024
LOW_SPACE_BYTES = 2 * BALLAST_BYTES
# Keep the WAL small (checkpoint every 256 pages, about 1 MiB, and truncate it back to 1 MiB): a checkpoint
# on a full disk needs at most that much room, which the ballast gives.
_WAL_PAGES = 256
_WAL_LIMIT = 1024 * 1024
_SQLITE_FULL = 13
_ACK_BATCH = 200


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
        self.ballast = path.with_name(BALLAST_NAME)
        self.max_messages = int(max_messages)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
        self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        self._db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, "
                         "retain INTEGER NOT NULL, created REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._count = self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        # Dropped since this process started (the telemetry figure); the lifetime total is kept in meta.
        self.dropped = 0
        self.dropped_disk_full = 0  # of which: dropped because the disk was full
        self.disk_full = False
        self._unsaved_drops = 0  # drops not yet added to meta (the disk was full)
        self._unacked: set[int] = set()  # acknowledged rows not yet deleted (the disk was full)
        self._ballast_checked = 0.0
        self.low_space = False
        self._room = 1  # rows the outbox may hold while space is low (see _low_space)
        self._enospc = False
        self._restore_ballast()
        if self._count:
            log.info("outbox %s holds %d unsent message(s) from a previous run", path, self._count)

    # ------------------------------------------------------------------ writing
    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Append one message; drops (and counts) the oldest when the outbox is full. Returns its id, or
        None when the disk is full and the message was dropped (counted; see the module doc)."""
        row = (topic, payload, int(qos), int(bool(retain)), time.time())
        with self._lock:
            try:
                rowid = self._insert(row)
            except sqlite3.Error as exc:
                if not _disk_full(exc):
                    raise
                rowid = self._insert_on_full_disk(row)
                if rowid is None:
                    return None
            self._unsaved_drops = 0
            if self.disk_full and not self.low_space:
                self.disk_full = self._enospc = False
                log.warning("outbox: the disk has room again; %d message(s) were dropped for lack of space",
                            self.dropped_disk_full)
            self._retry_acks()
            self._restore_ballast()
            return rowid

    def _insert(self, row: tuple) -> int:
        """One transaction: the row, the oldest beyond ``max_messages`` out, the drop count into meta."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute("INSERT INTO messages (topic, payload, qos, retain, created) "
                                   "VALUES (?, ?, ?, ?, ?)", row)
            # Low on space: do not grow, let the new row take the place of the oldest.
            limit = self.max_messages
            if self._low_space():
                limit = min(limit, self._room)
            excess = max(0, self._count + 1 - limit)
            if excess:
                self._db.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT ?)",
                                 (excess,))
            self._save_drops(excess + self._unsaved_drops)
            self._db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT has already rolled back: a ROLLBACK then would raise and hide the cause.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._count += 1 - excess
        if excess:
            self.dropped += excess
            if self.low_space:
                self.dropped_disk_full += excess
            else:
                log.warning("outbox full (%d messages): dropped the %d oldest", self.max_messages, excess)
        return int(cur.lastrowid)

    def _low_space(self) -> bool:
        """Below :data:`LOW_SPACE_BYTES` free on the outbox's device, until there is a ballast's worth more
        (so a WAL checkpoint freeing a few pages does not flip it back and forth). A statvfs per insert:
        microseconds, against the tens of microseconds of the insert."""
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return self.low_space
        if not self.low_space and free < LOW_SPACE_BYTES:
            # The file has held this many rows: as many fit again in the pages they leave free.
            self._room = max(self._room, self._count, 1)
            self.low_space = self.disk_full = True
            log.error("outbox: less than %d bytes free on the device of %s; the outbox stops growing and "
                      "drops its oldest telemetry and events (counted) until there is room; inference is "
                      "not affected", LOW_SPACE_BYTES, self.path)
        elif self.low_space and free >= LOW_SPACE_BYTES + BALLAST_BYTES:
            self.low_space = False
        return self.low_space

    def _save_drops(self, drops: int) -> None:
        if drops:
            self._db.execute("INSERT INTO meta (key, value) VALUES ('dropped_total', ?) ON CONFLICT(key) "
                             "DO UPDATE SET value = value + excluded.value", (drops,))

    def _insert_on_full_disk(self, row: tuple) -> int | None:
        """The disk is full: drop the oldest rows to make room (freeing the ballast if even that cannot be
        written), then try once more; None when the message had to be dropped."""
        if not self._enospc:
            self._enospc = True
            log.error("outbox: no space left on the device of %s; dropping the oldest telemetry and events "
                      "(counted) to make room; inference is not affected", self.path)
        self.low_space = self.disk_full = True
        for release_ballast in (False, True):
            if release_ballast:
                if not self.ballast.exists():
                    break
                self.ballast.unlink()
                log.warning("outbox: deleted the %d-byte ballast %s to get room back", BALLAST_BYTES, self.ballast)
            try:
                self._drop_oldest(max(1, self._count // 20))
                self._room = max(1, self._count)  # what fits: hold no more than this until space returns
                return self._insert(row)
            except sqlite3.Error as exc:
                if not _disk_full(exc):
                    raise
        self.dropped += 1
        self.dropped_disk_full += 1
        self._unsaved_drops += 1
        return None

    def _drop_oldest(self, n: int) -> None:
        ids = [r[0] for r in self._db.execute("SELECT id FROM messages ORDER BY id LIMIT ?", (n,))]
        if ids:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute("DELETE FROM messages WHERE id <= ?", (ids[-1],))
                self._save_drops(cur.rowcount + self._unsaved_drops)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            gone = cur.rowcount - len([i for i in self._unacked if i <= ids[-1]])  # acked ones were sent
            self._unacked = {i for i in self._unacked if i > ids[-1]}
            self._unsaved_drops = 0
            self._count -= cur.rowcount
            self.dropped += gone
            self.dropped_disk_full += gone
        # Move the WAL into the database file and shrink it: the freed pages are reused by the next rows.
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _restore_ballast(self) -> None:
        """Put the ballast back once the disk has room for it and some to spare (checked every 10 s at most)."""
        if self.ballast.exists() or time.monotonic() - self._ballast_checked < 10.0:
            return
        self._ballast_checked = time.monotonic()
        try:
            if shutil.disk_usage(self.ballast.parent).free < LOW_SPACE_BYTES + BALLAST_BYTES:
                return
            fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, BALLAST_BYTES)  # real blocks, not a sparse file
            finally:
                os.close(fd)
        except OSError as exc:
            self.ballast.unlink(missing_ok=True)
            log.warning("outbox: cannot create the ballast %s: %s", self.ballast, exc)

    # ------------------------------------------------------------------ reading and acks
    def peek(self, limit: int = 100, after_id: int = 0) -> list[OutboxMessage]:
        """The oldest unsent messages with id greater than ``after_id``, in order."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, qos, retain FROM messages WHERE id > ? "
                                    "ORDER BY id LIMIT ?", (after_id, limit + len(self._unacked))).fetchall()
            rows = [r for r in rows if r[0] not in self._unacked][:limit]
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def ack(self, ids: list[int] | int) -> None:
        """The broker has the message(s): remove them (later, if the disk is full now)."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        if not ids:
            return
        with self._lock:
            self._unacked.update(ids)
            self._retry_acks()

    def _retry_acks(self) -> None:
        # In small transactions: one delete of thousands of rows would write all their pages to the WAL at
        # once (9 MB for 5,600 telemetry rows), more than a nearly full disk has; between small ones SQLite
        # checkpoints and reuses the WAL.
        for start in range(0, len(self._unacked), _ACK_BATCH):
            batch = sorted(self._unacked)[:_ACK_BATCH]
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in batch])
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if not _disk_full(exc):
                    raise
                return  # kept in _unacked: deleted once there is room
            self._unacked.difference_update(batch)
            self._count -= max(0, cur.rowcount)

    def __len__(self) -> int:
        """Messages not yet acknowledged by the broker."""
        return self._count - len(self._unacked)

    @property
    def dropped_total(self) -> int:
        """Dropped over the outbox's whole life, across restarts."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'dropped_total'").fetchone()
        return int(row[0]) + self._unsaved_drops if row else self._unsaved_drops

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _disk_full(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL: "database or disk is full" (how SQLite reports ENOSPC on its files)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_FULL or "disk is full" in str(exc)
