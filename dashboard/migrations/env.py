"""Alembic environment: runs against the engine handed over by ``edgeopt.dashboard.db.init_db`` or, when
Alembic is run by hand, the engine for ``EDGEOPT_DATABASE_URL``."""
from __future__ import annotations

from alembic import context

from edgeopt.dashboard.db import make_engine
from edgeopt.dashboard.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or make_engine()
    with engine.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against a database")
run_migrations_online()
