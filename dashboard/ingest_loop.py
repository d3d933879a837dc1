"""The ingest's writer loop: takes received messages in batches, writes them, and reports each batch
done (the ingest then acknowledges it to the broker) only once it is committed.

Nothing a message contains can end this loop: :func:`~edgeopt.dashboard.ingest_writer.prepare` sets a
bad message aside (dead letter) instead of raising, and :meth:`WriterLoop.run` wraps the whole step, so
even a bug costs one batch a slower, message-by-message write, never the messages behind it. The batch
in hand lives on the loop object, not in the thread: a supervisor that restarts a dead thread with
:meth:`run` carries on with the same batch (message by message, in case it was what killed the thread).

Database errors are classified (:func:`classify`): a batch the database refuses (a constraint) is
written message by message and the refused ones dead-lettered; a deadlock is retried at once; an
unavailable database is retried with backoff while the batch, and the unacknowledged messages behind it,
wait (the broker holds everything not yet acknowledged, so a kill -9 meanwhile loses nothing).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from .db import redact
from .ingest_writer import BatchWriter, Incoming, Limits, Prepared, add_counters, prepare
from . import dead_letters

log = logging.getLogger(__name__)


def first_line(exc: BaseException) -> str:
    """The first line of a (database) error, for one-line logs."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def classify(exc: BaseException) -> str:
    """How the writer reacts to a database error: "refused" (a constraint, or a value the column cannot hold,
    such as an integer past 64 bits: write one by one), "conflict"
    (deadlock / serialization: retry now), "unavailable" (connection, timeout, locked: retry with
    backoff) or "unexpected". Errors come wrapped by SQLAlchemy or, from the COPY fast path, raw psycopg."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(exc, (IntegrityError, DataError)) or isinstance(orig, OverflowError):
        return "refused"
    try:
        import psycopg
    except ImportError:  # SQLite-only installs
        psycopg = None
    if psycopg is not None and isinstance(orig, psycopg.Error):
        if isinstance(orig, (psycopg.IntegrityError, psycopg.DataError)):
            return "refused"
        if (getattr(orig, "sqlstate", None) or "").startswith("40"):  # class 40: deadlock, serialization
            return "conflict"
        if isinstance(orig, (psycopg.OperationalError, psycopg.InterfaceError)):
            return "unavailable"
        return "unexpected"
    if isinstance(exc, OperationalError) or getattr(exc, "connection_invalidated", False):
        return "unavailable"
    return "unexpected"


class WriterLoop:
    """Batches from ``source``, written by ``writer``; ``on_done(items)`` after each commit."""

    def __init__(self, source: queue.Queue, writer: BatchWriter, limits: Limits, batch_size: int, flush_ms: int,
                 stop_event: threading.Event, on_done: Callable[[list[Incoming]], None],
                 stats: Counter, stats_lock: threading.Lock):
        self.source, self.writer, self.limits = source, writer, limits
        self.batch_size, self.flush_s = batch_size, flush_ms / 1000
        self.stop_event, self.on_done = stop_event, on_done
        self.stats, self._lock = stats, stats_lock
        self.engine = writer.engine
        # The batch in hand (survives a restart of the thread): its messages, their rows once prepared,
        # whether to write it message by message, and how far that got.
        self.items: list[Incoming] | None = None
        self.prepared: Prepared | None = None
        self.singly = False
        self.singly_pos = 0
        self.failures = 0
        self.delay = 0.5
        self.down_since: float | None = None
        self.db_ok = True

    @property
    def in_hand(self) -> int:
        return len(self.items) if self.items else 0

    # ------------------------------------------------------------------------------------------- loop
    def run(self) -> None:
        """Until ``stop_event`` is set and the source is empty. A step that raises anyway (a bug) is
        logged and counted, and its batch is then written message by message."""
        if self.items is not None:
            self.singly = True  # restarted by the supervisor: the batch in hand may be what killed us
        while True:
            try:
                if not self.step():
                    return
            except Exception:  # noqa: BLE001 - the writer must outlive any bug in one batch
                log.exception("writer step failed on a batch of %d messages; writing it message by message",
                              self.in_hand)
                self._count("writer_errors")
                self.singly = True
                self.writer.forget_devices()
                if self.stop_event.wait(0.2) and self.items is None:
                    return

    def step(self) -> bool:
        """Take (or keep) a batch and try to write it. False when stopping with nothing left."""
        if self.items is None:
            items = self._take_batch()
            if not items:
                return not self.stop_event.is_set()
            self.items, self.prepared, self.singly, self.singly_pos, self.failures = items, None, False, 0, 0
        try:
            if self.singly:
                self._write_singly()
            else:
                if self.prepared is None:
                    self.prepared = prepare(self.items, self.limits)
                res = self.writer.write(self.prepared, datetime.now(timezone.utc))
                with self._lock:
                    self.stats["written"] += self.prepared.size
                    self.stats["telemetry"] += res.telemetry_msgs
                    self.stats["duplicates"] += res.duplicates
                    self.stats["dead_letters"] += res.dead_letters
                    self.stats["rejected"] += sum(self.prepared.counters.values()) - self.prepared.counters["duplicate"]
            self._done()
        except Exception as exc:  # noqa: BLE001 - classified; nothing is dropped here
            return self._failed(exc)
        return True

    def _done(self) -> None:
        if self.down_since is not None:
            log.warning("database is back after %.1f s; writing resumed", time.monotonic() - self.down_since)
        self.down_since, self.delay, self.db_ok = None, 0.5, True
        items, self.items, self.prepared = self.items, None, None
        self.singly, self.singly_pos, self.failures = False, 0, 0
        self.on_done(items)

    def _failed(self, exc: Exception) -> bool:
        kind = classify(exc)
        self.writer.forget_devices()
        if kind == "refused":
            # A device deleted while cached, or a row no constraint allows: one by one, so one bad message
            # is set aside and the rest are written.
            log.warning("batch refused by the database (%s); writing messages one by one", first_line(exc))
            self.singly = True
        elif kind == "conflict":
            log.info("batch rolled back by the database (%s); retrying", first_line(exc))
        elif kind == "unavailable":
            self.db_ok = False
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.error("database %s unavailable (%s); holding %d messages unacknowledged and retrying",
                          redact(str(self.engine.url)), first_line(exc), self.in_hand + self.source.qsize())
            if self.stop_event.wait(self.delay):
                log.error("stopping with the database unavailable: %d messages not written (not acknowledged: "
                          "the broker delivers them again)", self.in_hand + self.source.qsize())
                return False
            self.delay = min(self.delay * 2, 10.0)
        else:
            self.failures += 1
            log.error("unexpected error writing a batch of %d messages (attempt %d): %s: %s", self.in_hand,
                      self.failures, type(exc).__name__, first_line(exc))
            if self.failures >= 3:  # give the batch one message at a time rather than block ingest
                self.singly = True
            elif self.stop_event.wait(self.delay):
                return False
        return True

    def _take_batch(self) -> list[Incoming]:
        batch: list[Incoming] = []
        deadline = time.monotonic() + self.flush_s
        while len(batch) < self.batch_size:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                batch.append(self.source.get(timeout=timeout))
            except queue.Empty:
                break
            while len(batch) < self.batch_size:  # drain what is already there without waiting
                try:
                    batch.append(self.source.get_nowait())
                except queue.Empty:
                    break
        return batch

    # ------------------------------------------------------------------------------ message by message
    def _write_singly(self) -> None:
        """Write the batch in hand one message at a time, from where an earlier attempt stopped. A message
        the database refuses is dead-lettered (reason ``db_refused``); an unavailable database raises, and
        the next attempt resumes at the same message."""
        while self.singly_pos < len(self.items):
            item = self.items[self.singly_pos]
            try:
                res = self.writer.write(prepare([item], self.limits), datetime.now(timezone.utc))
                self._count("telemetry", res.telemetry_msgs)
                self._count("dead_letters", res.dead_letters)
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = classify(exc)
                if kind in ("unavailable", "conflict"):
                    raise
                self.writer.forget_devices()
                log.warning("message from %r refused by the database: %s", item.topic[:200], first_line(exc))
                self._set_aside(item, "db_refused" if kind == "refused" else "ingest_error",
                                f"{type(exc).__name__}: {first_line(exc)}")
            self.singly_pos += 1
            self._count("written")

    def _set_aside(self, item: Incoming, reason: str, error: str) -> None:
        """Dead-letter one message in a transaction of its own; if even that fails, log it loudly and count
        it as ``lost`` (acknowledging it is the only way to stop the broker sending it forever)."""
        from .ingest_writer import Rejected

        counters: Counter = Counter({reason: 1})
        try:
            with Session(self.engine) as session, session.begin():
                dead_letters.insert(session, dead_letters.rows([Rejected(item, reason, error)], self.writer.name,
                                                               self.writer.dead_letter_budget, counters))
                add_counters(session, counters, datetime.now(timezone.utc), self.engine.dialect.name)
            self._count("dead_letters")
        except Exception as exc:  # noqa: BLE001
            if classify(exc) in ("unavailable", "conflict"):
                raise
            log.error("message from %r (%d bytes) can be neither written nor set aside (%s): dropped",
                      item.topic[:200], len(item.payload), first_line(exc))
            self._count("lost")

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n
