"""Login rate limits: failed attempts counted per client IP and per username, shared by every web worker.

The counting is the ``limits`` library's (the engine of Flask-Limiter), with a fixed-window strategy.
Its counters live, by default, in the dashboard's own database (:class:`DatabaseStorage`, URI
``edgeopt+db://``): several gunicorn workers, or several hosts behind a load balancer, then share one
count, which an in-memory counter would not (with N workers, ``memory://`` lets N times the limit
through). ``EDGEOPT_RATELIMIT_STORAGE_URI`` selects another ``limits`` storage (``memory://`` for a
single worker, ``redis://host:6379`` where Redis is at hand).

Only failures count: a user who logs in correctly never uses up the limit. While a limit is exhausted
the password is not even checked, so guessing on cannot reveal a right guess.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

from limits import RateLimitItem, parse_many
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter
from sqlalchemy import case, delete, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from .models import RateLimitCounter

log = logging.getLogger(__name__)

DB_SCHEME = "edgeopt+db"
DEFAULT_PER_IP = "20 per minute; 200 per hour"
DEFAULT_PER_USER = "5 per minute; 30 per hour"
# Expired counters are deleted once they are this old (a day of history costs nothing and helps forensics).
PURGE_AFTER = timedelta(days=1)


class DatabaseStorage(Storage):
    """A ``limits`` storage on the dashboard's SQLAlchemy engine (SQLite or PostgreSQL).

    ``incr`` is one atomic upsert (``INSERT .. ON CONFLICT DO UPDATE .. RETURNING``), so concurrent
    workers never lose a hit. Fixed-window only: the moving window needs per-hit entries.
    """

    STORAGE_SCHEME = [DB_SCHEME]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, engine: Engine | None = None,
                 **_options):
        if engine is None:
            raise ValueError(f"{DB_SCHEME}:// needs the dashboard's engine (storage option 'engine')")
        super().__init__(uri, wrap_exceptions)
        self.engine = engine
        self.table = RateLimitCounter.__table__

    @property
    def base_exceptions(self) -> type[Exception]:
        return SQLAlchemyError

    def _insert(self):
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(self.table)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = datetime.now(timezone.utc)
        new_expiry = now + timedelta(seconds=expiry)
        t = self.table
        stmt = self._insert().values(key=key, hits=amount, expires_at=new_expiry)
        expired = t.c.expires_at <= now
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.key],
            set_={"hits": case((expired, amount), else_=t.c.hits + amount),
                  "expires_at": case((expired, new_expiry), else_=t.c.expires_at)},
        ).returning(t.c.hits)
        with self.engine.begin() as conn:
            hits = conn.execute(stmt).scalar_one()
            conn.execute(delete(t).where(t.c.expires_at < now - PURGE_AFTER))
        return int(hits)

    def _row(self, key: str):
        with self.engine.connect() as conn:
            return conn.execute(select(self.table.c.hits, self.table.c.expires_at)
                                .where(self.table.c.key == key)).first()

    def get(self, key: str) -> int:
        row = self._row(key)
        if row is None or row.expires_at <= datetime.now(timezone.utc):
            return 0
        return int(row.hits)

    def get_expiry(self, key: str) -> float:
        row = self._row(key)
        if row is None:
            return time.time()
        return row.expires_at.timestamp()

    def check(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    def reset(self) -> int | None:
        with self.engine.begin() as conn:
            return conn.execute(delete(self.table)).rowcount

    def clear(self, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(self.table).where(self.table.c.key == key))


class LoginGuard:
    """The login limits of one app: ``blocked()`` before checking a password, ``failed()`` after a miss."""

    def __init__(self, storage: Storage, per_ip: str = DEFAULT_PER_IP, per_user: str = DEFAULT_PER_USER):
        self.limiter = FixedWindowRateLimiter(storage)
        self.per_ip: list[RateLimitItem] = parse_many(per_ip)
        self.per_user: list[RateLimitItem] = parse_many(per_user)

    def _checks(self, ip: str, username: str):
        for item in self.per_ip:
            yield item, ("login-ip", ip)
        for item in self.per_user:
            # Case-folded: "Admin" and "admin" are one account to an attacker guessing passwords.
            yield item, ("login-user", username.strip().casefold())

    def blocked(self, ip: str, username: str) -> int | None:
        """Seconds until the next attempt is allowed, or None when no limit is exhausted."""
        waits = [self.limiter.get_window_stats(item, *ids).reset_time - time.time()
                 for item, ids in self._checks(ip, username) if not self.limiter.test(item, *ids)]
        return max(1, int(max(waits)) + 1) if waits else None

    def failed(self, ip: str, username: str) -> None:
        """Count one failed attempt against every limit."""
        for item, ids in self._checks(ip, username):
            self.limiter.hit(item, *ids)


def make_guard(uri: str, engine: Engine, per_ip: str, per_user: str) -> LoginGuard:
    """The app's :class:`LoginGuard` on storage ``uri`` (``edgeopt+db://`` = the dashboard's database)."""
    options = {"engine": engine} if uri.split(":", 1)[0] == DB_SCHEME else {}
    return LoginGuard(storage_from_string(uri, **options), per_ip, per_user)
