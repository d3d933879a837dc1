"""Dead letters: messages the ingest could not accept, kept for inspection instead of vanishing.

Every message :func:`edgeopt.dashboard.ingest_writer.prepare` rejects (malformed, too deep, NUL, a
timestamp out of the window, a bug on one message) and every message the database refuses is counted by
reason in ``ingest_counters`` AND stored here, in the same transaction as the batch it came with, so it
is acknowledged to the broker only once it is safely set aside. ``edgeopt-dashboard dead-letters list``
/ ``show`` / ``purge`` read them; retention deletes them after ``RetentionSettings.dead_letters_days``.

Bounded on purpose: a payload is kept up to :data:`MAX_PAYLOAD_KEPT` bytes (its full size is recorded),
and each ingest process stores at most ``per_minute`` of them (:class:`Budget`); past that a message is
still counted under its reason and also as ``dead_letter_overflow``, so a flood of garbage from a broken
or hostile client cannot fill the database faster than real telemetry would.
"""
from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from . import models as m

if TYPE_CHECKING:  # the writer imports this module; only its types are needed here
    from .ingest_writer import Rejected

MAX_PAYLOAD_KEPT = 64 * 1024
MAX_TEXT = 1000


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` without control characters (NUL cannot be stored in PostgreSQL text; a newline would
    break the one-line listing), cut to ``limit`` characters."""
    if text.isprintable():
        return text[:limit]
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in text[:limit])[:limit]


class Budget:
    """At most ``per_minute`` dead letters stored per minute (a fixed one-minute window)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._window = 0.0
        self._used = 0

    def take(self) -> bool:
        now = time.monotonic()
        if now - self._window >= 60.0:
            self._window, self._used = now, 0
        if self._used >= self.per_minute:
            return False
        self._used += 1
        return True


def rows(rejected: Iterable["Rejected"], ingest: str, budget: Budget | None, counters: Counter) -> list[dict[str, Any]]:
    """The ``dead_letters`` rows for rejected messages (within the budget; the rest counted as overflow)."""
    out = []
    for r in rejected:
        if budget is not None and not budget.take():
            counters["dead_letter_overflow"] += 1
            continue
        payload = bytes(r.item.payload)
        out.append(dict(received_at=r.item.received, reason=r.reason[:64], error=printable(r.error),
                        topic=printable(r.item.topic, 512), payload=payload[:MAX_PAYLOAD_KEPT],
                        payload_bytes=len(payload), ingest=printable(ingest, 128)))
    return out


def insert(session: Session, letters: list[dict[str, Any]]) -> None:
    """Insert dead-letter rows (part of the caller's transaction)."""
    if letters:
        session.execute(m.DeadLetter.__table__.insert(), letters)


def list_letters(session: Session, reason: str | None = None, limit: int = 50,
                 before_id: int | None = None) -> list[dict[str, Any]]:
    """Newest first: ``{"id", "received_at", "reason", "error", "topic", "payload_bytes", "ingest"}``."""
    d = m.DeadLetter
    q = select(d.id, d.received_at, d.reason, d.error, d.topic, d.payload_bytes, d.ingest).order_by(d.id.desc())
    if reason:
        q = q.where(d.reason == reason)
    if before_id is not None:
        q = q.where(d.id < before_id)
    return [dict(id=i, received_at=ts.isoformat(), reason=rs, error=e, topic=t, payload_bytes=n, ingest=g)
            for i, ts, rs, e, t, n, g in session.execute(q.limit(limit))]


def get(session: Session, letter_id: int) -> m.DeadLetter | None:
    """One dead letter with its payload."""
    return session.get(m.DeadLetter, letter_id)


def summary(session: Session) -> dict[str, int]:
    """How many dead letters are kept, by reason."""
    d = m.DeadLetter
    return dict(session.execute(select(d.reason, func.count()).group_by(d.reason).order_by(d.reason)).all())


def purge(session: Session, before: datetime | None = None, reason: str | None = None) -> int:
    """Delete dead letters received before ``before`` (all when None), optionally of one reason."""
    stmt = delete(m.DeadLetter)
    if before is not None:
        stmt = stmt.where(m.DeadLetter.received_at < before)
    if reason:
        stmt = stmt.where(m.DeadLetter.reason == reason)
    return session.execute(stmt.execution_options(synchronize_session=False)).rowcount or 0
