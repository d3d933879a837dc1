"""Who an ingest process is, and how healthy it says it is.

Identity: an ingest process acknowledges a message to the broker only after it is committed, so what it
had received but not written when it was killed stays with the broker, in its MQTT session, until a
process with the SAME client id comes back. Without ``--client-id`` a process therefore takes a stable
one, ``edgeopt-ingest-<host>-<slot>``, where the slot is the lowest number whose lock file under
``<data dir>/ingest/`` it can hold (``flock``: released by the kernel however the process ends). The
restarted process gets its slot, and its session, back; two processes on one host get two slots.

Health: every ``beat_every_s`` the supervisor writes one ``ingest_processes`` row per process: its
threads alive or not, restarts, connection, database state, messages in hand. A row older than three
beats means the process is gone or cannot reach the database. ``/healthz`` and
``edgeopt-dashboard ingest-status`` read them (:func:`summary`).
"""
from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgeopt.sdk.errors import UnavailableError

from . import models as m

MAX_SLOTS = 64
STALE_BEATS = 3
FORGET_AFTER = timedelta(days=1)  # a row this stale is a process that is not coming back


def claim_client_id(data_dir: Path) -> tuple[str, BinaryIO]:
    """``edgeopt-ingest-<host>-<slot>`` and the open lock file that holds the slot (keep it open)."""
    lock_dir = data_dir / "ingest"
    lock_dir.mkdir(parents=True, exist_ok=True)
    host = "".join(c if c.isalnum() or c in "-._" else "-" for c in socket.gethostname())[:64] or "host"
    for slot in range(MAX_SLOTS):
        f = open(lock_dir / f"slot-{slot}.lock", "a+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        return f"edgeopt-ingest-{host}-{slot}", f
    raise UnavailableError(f"all {MAX_SLOTS} ingest slots under {lock_dir} are taken",
                           hint="give each ingest process its own --client-id")


def beat(session: Session, row: dict[str, Any], dialect: str) -> None:
    """Upsert this process's health row; forget rows of processes silent for a day."""
    table = m.IngestProcess.__table__
    ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    session.execute(ins.on_conflict_do_update(index_elements=["client_id"], set_={
        k: ins.excluded[k] for k in row if k != "client_id"}), [row])
    session.execute(delete(table).where(table.c.beat_at < row["beat_at"] - FORGET_AFTER))


def forget(session: Session, client_id: str) -> None:
    """Remove a process's row (it stopped cleanly)."""
    session.execute(delete(m.IngestProcess.__table__).where(m.IngestProcess.client_id == client_id))


def summary(session: Session, now: datetime, details: bool = False) -> dict[str, Any]:
    """``{"status": "ok" | "degraded" | "down" | "absent", "processes": int, "healthy": int, "stale": int}``
    (plus ``"list"`` of rows with ``details``). ok: every process beats and says it is healthy; degraded:
    some do not; down: none does; absent: no ingest process has ever reported."""
    procs = session.scalars(select(m.IngestProcess).order_by(m.IngestProcess.client_id)).all()
    rows = []
    for p in procs:
        age = (now - p.beat_at).total_seconds()
        stale = age > STALE_BEATS * p.beat_every_s
        rows.append(dict(client_id=p.client_id, host=p.host, pid=p.pid, started_at=p.started_at.isoformat(),
                         beat_age_s=round(age, 1), stale=stale, healthy=p.healthy and not stale,
                         details=p.details))
    healthy = sum(r["healthy"] for r in rows)
    stale = sum(r["stale"] for r in rows)
    status = ("absent" if not rows else "ok" if healthy == len(rows) else "down" if healthy == 0 else "degraded")
    out: dict[str, Any] = dict(status=status, processes=len(rows), healthy=healthy, stale=stale)
    if details:
        out["list"] = rows
    return out
