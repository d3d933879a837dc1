"""Schema: the Alembic migrations give exactly the models' schema; timestamps stay UTC-aware."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, StatementError

from edgeopt.dashboard import models as m


def test_migrations_match_models(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from edgeopt.dashboard.partitions import DEFAULT, _NAME

    def not_a_partition(name, type_, parent_names):
        # PostgreSQL's daily partitions of telemetry_raw (and their indexes) are made at run time
        table = name if type_ == "table" else (parent_names or {}).get("table_name")
        return not (table and (table == DEFAULT or _NAME.match(table)))

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False,
                                                     "include_name": not_a_partition})
        diff = compare_metadata(ctx, m.Base.metadata)
    assert diff == []


def test_init_db_is_at_head_and_idempotent(db_url, engine):
    from edgeopt.dashboard.db import current_revision, head_revision, init_db

    assert current_revision(engine) == head_revision() != ""
    assert init_db(db_url) == head_revision()


def test_timestamps_are_utc_aware(session):
    cet = timezone(timedelta(hours=1))
    seen = datetime(2026, 1, 2, 13, 0, tzinfo=cet)
    session.add(m.Device(device_id="d1", last_seen=seen))
    session.commit()
    session.expire_all()
    dev = session.scalars(select(m.Device).where(m.Device.device_id == "d1")).one()
    assert dev.last_seen == seen
    assert dev.last_seen.tzinfo is not None and dev.last_seen.utcoffset() == timedelta(0)
    assert dev.last_seen.hour == 12
    assert dev.first_seen.tzinfo is not None


def test_naive_datetime_is_refused(session):
    session.add(m.Device(device_id="d2", last_seen=datetime(2026, 1, 2, 12, 0)))
    with pytest.raises(StatementError, match="naive datetime"):
        session.commit()


def test_relationships_and_unique_keys(session):
    dev = m.Device(device_id="d3", fleet="f")
    grp = m.DeviceGroup(name="line-1")
    session.add_all([dev, grp])
    session.flush()
    session.add(m.DeviceGroupMember(group=grp, device=dev, source="agent"))
    dev.tag_rows.append(m.DeviceTag(tag="canary"))
    dev.packages.append(m.InstalledPackage(name="digits", version="1.0", profile="cpu", runtime="onnxruntime"))
    session.commit()
    assert dev.groups == ["line-1"] and dev.tags == ["canary"]
    assert [p.version for p in dev.packages] == ["1.0"]
    session.add(m.Device(device_id="d3"))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()


def test_deployment_defaults(session):
    user = m.User(username="ops", password_hash="x", role="operator")
    pkg = m.Package(name="digits", version="1.0", profile="cpu", runtime="onnxruntime", sha256="a" * 64,
                    size=10, storage_path="/tmp/x.eopkg", uploaded_by=user)
    dep = m.Deployment(package=pkg, target_kind="group", target_value={"group": "line-1"}, created_by=user)
    session.add(dep)
    session.commit()
    session.expire_all()
    dep = session.get(m.Deployment, dep.id)
    assert len(dep.id) == 32 and dep.state == "pending" and dep.stage_percent == 100
    assert dep.package.name == "digits" and dep.created_by.username == "ops"
