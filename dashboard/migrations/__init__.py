"""Alembic migrations of the dashboard schema (applied by ``edgeopt-dashboard init-db``)."""
