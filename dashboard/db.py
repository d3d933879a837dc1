"""Database engine, sessions and migrations of the dashboard.

The URL comes from ``EDGEOPT_DATABASE_URL``; without it the dashboard uses SQLite in its data directory
(``EDGEOPT_DATA_DIR``, else ``$XDG_DATA_HOME/edgeopt``, i.e. ``~/.local/share/edgeopt``). PostgreSQL is
reached through psycopg 3: ``postgresql+psycopg://user@host:5432/name`` (a plain ``postgresql://`` URL is
taken to mean the same).

SQLite runs in WAL mode with a busy timeout and foreign keys on, so the web workers read while the ingest
process writes. :func:`init_db` applies the Alembic migrations shipped inside the package (``upgrade
head``); the application never calls ``create_all`` on a real database.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from edgeopt.sdk.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
ALEMBIC_INI = PACKAGE_DIR / "alembic.ini"
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def data_dir() -> Path:
    """The dashboard's data directory (SQLite file, uploaded packages); created on first use."""
    env = os.environ.get("EDGEOPT_DATA_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        path = Path(base) / "edgeopt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url(url: str | None = None) -> str:
    """The database URL to use: ``url``, else ``EDGEOPT_DATABASE_URL``, else SQLite in :func:`data_dir`."""
    url = url or os.environ.get("EDGEOPT_DATABASE_URL")
    if not url:
        return f"sqlite:///{data_dir() / 'edgeopt.db'}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    # WAL + NORMAL is durable across application crashes; only an OS crash can lose the last commits.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str | None = None, **kwargs) -> Engine:
    """A new engine for ``url`` (see :func:`database_url`) with the dashboard's connection settings."""
    url = database_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"invalid database URL {url!r}",
                          hint="expected e.g. sqlite:///path/edgeopt.db or "
                               "postgresql+psycopg://user@host:5432/name") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"unsupported database URL {redact(url)!r}: only SQLite and PostgreSQL are supported",
                          hint="use sqlite:///path/edgeopt.db or postgresql+psycopg://user@host:5432/name")
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, **kwargs)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            kwargs.setdefault("pool_pre_ping", True)
            kwargs.setdefault("connect_args", {"connect_timeout": 5})
            engine = create_engine(parsed, **kwargs)
    except NoSuchModuleError:
        raise ConfigError(f"unsupported database URL {redact(url)!r}",
                          hint="use sqlite:///... or postgresql+psycopg://...") from None
    return engine


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (created once per URL)."""
    url = database_url(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def dispose_engines() -> None:
    """Close every cached engine (tests, forked workers)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    """A sessionmaker bound to ``engine`` (default :func:`get_engine`); objects stay usable after commit."""
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with session_factory(engine)() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def unavailable(engine_or_url: Engine | str, exc: BaseException) -> UnavailableError:
    """The one-line error for a database that cannot be reached."""
    url = engine_or_url if isinstance(engine_or_url, str) else str(engine_or_url.url)
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    reason_line = reason[0] if reason else exc.__class__.__name__
    return UnavailableError(f"database {redact(url)} is unreachable: {reason_line}",
                            hint="check that the server runs and EDGEOPT_DATABASE_URL is right")


def check_connection(engine: Engine) -> None:
    """Raise :class:`UnavailableError` when the database does not answer ``SELECT 1``."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise unavailable(engine, exc) from None


def alembic_config(engine: Engine | None = None):
    """The Alembic config of the shipped migrations, bound to ``engine`` when given."""
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def init_db(url: str | Engine | None = None) -> str:
    """Create or upgrade the schema to the newest migration (``alembic upgrade head``).

    Returns the revision now applied. Raises :class:`UnavailableError` when the database is unreachable.
    """
    from alembic import command

    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        check_connection(engine)
        cfg = alembic_config(engine)
        command.upgrade(cfg, "head")
        return current_revision(engine) or ""
    except DBAPIError as exc:
        raise unavailable(engine, exc) from None
    finally:
        if not isinstance(url, Engine):
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest migration shipped with this version."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""
