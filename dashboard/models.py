"""SQLAlchemy 2.0 typed models of the fleet dashboard.

Every timestamp is UTC-aware (:class:`UTCDateTime`), on SQLite as on PostgreSQL. Latency histograms are
stored packed (:mod:`edgeopt.dashboard.histograms`: 10-byte records of key and count of the contract's
DDSketch layout, non-empty keys ascending), so any set of rows can be merged by adding the counts of equal
keys, in one numpy call, and fleet percentiles are computed from the merged histogram (within 1%), never by
averaging percentiles. Migration 0004 converted the 1.0 layout's 29 JSON counts.

Idempotence: telemetry rows are unique on (device, session_id, seq, model, ts), events and command results
on (device, session_id, seq); the ingest inserts with ``ON CONFLICT DO NOTHING`` so QoS 1 redelivery never
double-counts. Rollups are unique on (device, model, bucket_start) and are recomputed, not incremented,
so re-running a rollup gives the same rows.

Tables (see also ``docs/dashboard.md``):

- devices, device_groups, device_group_members, device_tags, installed_packages
- telemetry_raw, rollup_1m, rollup_1h, fleet_rollup (fleet-wide per model, for the overview chart),
  rollup_state (watermarks)
- events, command_results
- packages, deployments, deployment_targets
- users, api_tokens, login_sessions, rate_limits
- alert_rules, alerts
- ingest_counters, dead_letters (messages the ingest set aside), ingest_processes (ingest health)
"""
from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary,
                        String, Text, TypeDecorator, UniqueConstraint, false, true)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """The current time, UTC-aware."""
    return datetime.now(timezone.utc)


def new_id() -> str:
    """A 32-character random id (deployments, commands)."""
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are stored as naive UTC and
    given ``tzinfo=UTC`` back on load. Naive datetimes are refused on the way in: they are a bug (local
    time silently taken as UTC).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware (UTC) datetime")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of every dashboard table."""

    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON, list[int]: JSON,
                           list[str]: JSON}


# ----------------------------------------------------------------------------------------------- enums
class DeviceStatus(str, enum.Enum):
    online = "online"
    offline = "offline"


class Role(str, enum.Enum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"


class DeploymentState(str, enum.Enum):
    pending = "pending"
    running = "running"
    paused = "paused"
    completed = "completed"
    aborted = "aborted"
    rolled_back = "rolled_back"
    failed = "failed"


class TargetState(str, enum.Enum):
    pending = "pending"
    sent = "sent"
    accepted = "accepted"
    installing = "installing"
    succeeded = "succeeded"
    failed = "failed"
    rolled_back = "rolled_back"


class AlertKind(str, enum.Enum):
    offline = "offline"  # device offline longer than threshold_minutes
    p95_slo = "p95_slo"  # p95 of a model above threshold_ms
    install_failure = "install_failure"
    placement = "placement"  # the runtime did not run a package as its manifest says (agent placement check)


class AlertState(str, enum.Enum):
    open = "open"
    resolved = "resolved"


def _enum_values(e: type[enum.Enum]) -> list[str]:
    return [m.value for m in e]


# Enums are stored as plain strings with a length, not native enum types: adding a state later is then a
# code change only, with no ALTER TYPE migration on PostgreSQL.
def _enum_col(e: type[enum.Enum], default: enum.Enum, **kw) -> Any:
    return mapped_column(String(16), default=default.value, server_default=default.value, **kw)


# ------------------------------------------------------------------------------------------- devices
class Device(Base):
    """A device, created on its first message. ``device_id`` is the id the agent uses in its topics."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128), unique=True)
    fleet: Mapped[str] = mapped_column(String(128), default="default")
    status: Mapped[str] = _enum_col(DeviceStatus, DeviceStatus.offline)
    # Why the device is offline: "will" (last will / offline status) or "heartbeat" (no telemetry).
    offline_reason: Mapped[Optional[str]] = mapped_column(String(16))
    status_changed_at: Mapped[Optional[datetime]] = mapped_column()
    last_seen: Mapped[Optional[datetime]] = mapped_column()
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    # Status ordering (Sparkplug style): the session of the newest status, its largest ts and seq.
    session_id: Mapped[Optional[str]] = mapped_column(String(64))
    session_ts: Mapped[Optional[datetime]] = mapped_column()
    status_seq: Mapped[Optional[int]] = mapped_column(BigInteger)
    # Server time after which the device counts as offline without telemetry (3 intervals).
    heartbeat_deadline: Mapped[Optional[datetime]] = mapped_column()
    telemetry_interval_s: Mapped[Optional[float]] = mapped_column(Float)
    agent_version: Mapped[Optional[str]] = mapped_column(String(64))
    capabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    profile: Mapped[Optional[str]] = mapped_column(String(64))
    # Largest per-model p95 (ms) of the latest telemetry: sorts "slowest devices" without a scan.
    last_p95_ms: Mapped[Optional[float]] = mapped_column(Float)
    last_cpu_percent: Mapped[Optional[float]] = mapped_column(Float)
    last_rss_bytes: Mapped[Optional[int]] = mapped_column(BigInteger)

    packages: Mapped[list["InstalledPackage"]] = relationship(
        back_populates="device", cascade="all, delete-orphan", order_by="InstalledPackage.name")
    memberships: Mapped[list["DeviceGroupMember"]] = relationship(
        back_populates="device", cascade="all, delete-orphan")
    tag_rows: Mapped[list["DeviceTag"]] = relationship(back_populates="device", cascade="all, delete-orphan")

    __table_args__ = (
        Index("ix_devices_status_device_id", "status", "device_id"),
        Index("ix_devices_profile_device_id", "profile", "device_id"),
        Index("ix_devices_last_seen", "last_seen"),
        Index("ix_devices_last_p95_ms", "last_p95_ms"),
        Index("ix_devices_heartbeat", "status", "heartbeat_deadline"),
    )

    @property
    def groups(self) -> list[str]:
        return sorted(m.group.name for m in self.memberships)

    @property
    def tags(self) -> list[str]:
        return sorted(t.tag for t in self.tag_rows)


class DeviceGroup(Base):
    """A named group of devices (deployment target, chart filter)."""

    __tablename__ = "device_groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    members: Mapped[list["DeviceGroupMember"]] = relationship(back_populates="group",
                                                              cascade="all, delete-orphan")


class DeviceGroupMember(Base):
    """Membership of a device in a group; ``source`` is "agent" (reported in status) or "manual"."""

    __tablename__ = "device_group_members"

    group_id: Mapped[int] = mapped_column(ForeignKey("device_groups.id", ondelete="CASCADE"), primary_key=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    source: Mapped[str] = mapped_column(String(16), default="manual")

    group: Mapped[DeviceGroup] = relationship(back_populates="members")
    device: Mapped[Device] = relationship(back_populates="memberships")

    __table_args__ = (Index("ix_device_group_members_device", "device_pk"),)


class DeviceTag(Base):
    """A free-form tag of a device (deployment target)."""

    __tablename__ = "device_tags"

    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(128), primary_key=True)

    device: Mapped[Device] = relationship(back_populates="tag_rows")

    __table_args__ = (Index("ix_device_tags_tag", "tag"),)


class InstalledPackage(Base):
    """A package installed on a device, as reported in its latest status."""

    __tablename__ = "installed_packages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    profile: Mapped[Optional[str]] = mapped_column(String(64))
    runtime: Mapped[Optional[str]] = mapped_column(String(32))
    precision: Mapped[Optional[str]] = mapped_column(String(16))
    sha256: Mapped[Optional[str]] = mapped_column(String(64))
    previous_version: Mapped[Optional[str]] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    device: Mapped[Device] = relationship(back_populates="packages")

    __table_args__ = (
        UniqueConstraint("device_pk", "name", name="uq_installed_packages_device_name"),
        Index("ix_installed_packages_name_version", "name", "version"),
    )


# ----------------------------------------------------------------------------------------- telemetry
class TelemetryRaw(Base):
    """One model's statistics from one telemetry message (a message without models gives one row with
    model ``""`` carrying the system figures). On PostgreSQL the table is partitioned by day of ``ts``
    (:mod:`edgeopt.dashboard.partitions`) and its primary key is (id, ts)."""

    __tablename__ = "telemetry_raw"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[Optional[str]] = mapped_column(String(64))
    ts: Mapped[datetime] = mapped_column()
    session_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    interval_s: Mapped[float] = mapped_column(Float)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    throughput_ips: Mapped[float] = mapped_column(Float, default=0.0)
    hist_counts: Mapped[bytes] = mapped_column(LargeBinary, doc="Packed histogram (dashboard.histograms).")
    hist_sum_ms: Mapped[float] = mapped_column(Float, default=0.0)
    p50_ms: Mapped[Optional[float]] = mapped_column(Float)
    p95_ms: Mapped[Optional[float]] = mapped_column(Float)
    p99_ms: Mapped[Optional[float]] = mapped_column(Float)
    queue_depth: Mapped[int] = mapped_column(Integer, default=0)
    batch_sizes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Stateful models: sequences (streams) with state on the device at the end of the interval (schema 1.1).
    live_sequences: Mapped[Optional[int]] = mapped_column(Integer)
    # Text-generation models (schema 1.1 ``ModelStats.text``, issue 14); all None on other models' rows.
    # The two sketches are packed like hist_counts; generated_tokens IS NOT NULL marks a row that had text.
    ttft_counts: Mapped[Optional[bytes]] = mapped_column(LargeBinary, doc="Packed time-to-first-token sketch.")
    ttft_sum_ms: Mapped[Optional[float]] = mapped_column(Float)
    tpot_counts: Mapped[Optional[bytes]] = mapped_column(LargeBinary, doc="Packed time-per-output-token sketch.")
    tpot_sum_ms: Mapped[Optional[float]] = mapped_column(Float)
    prompt_tokens: Mapped[Optional[int]] = mapped_column(BigInteger)
    generated_tokens: Mapped[Optional[int]] = mapped_column(BigInteger)
    kv_cache_usage: Mapped[Optional[float]] = mapped_column(Float, doc="Share of the KV cache in use at the end.")
    kv_cache_peak: Mapped[Optional[float]] = mapped_column(Float, doc="Most of the KV cache in use at once.")
    running_requests: Mapped[Optional[int]] = mapped_column(Integer)
    waiting_requests: Mapped[Optional[int]] = mapped_column(Integer)
    cancelled: Mapped[Optional[int]] = mapped_column(BigInteger)
    preemptions: Mapped[Optional[int]] = mapped_column(BigInteger, doc="None: the runtime does not say.")
    cpu_percent: Mapped[Optional[float]] = mapped_column(Float)
    rss_bytes: Mapped[Optional[int]] = mapped_column(BigInteger)
    temperature_c: Mapped[Optional[float]] = mapped_column(Float)

    __table_args__ = (
        # ts is part of the key because PostgreSQL partitions this table by ts (migration 0005) and a
        # partitioned table's unique keys must hold the partition key; a QoS 1 redelivery repeats ts.
        UniqueConstraint("device_pk", "session_id", "seq", "model", "ts", name="uq_telemetry_raw_msg"),
        Index("ix_telemetry_raw_device_ts", "device_pk", "ts"),
        Index("ix_telemetry_raw_ts", "ts"),
    )


class _RollupMixin:
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    samples: Mapped[int] = mapped_column(Integer, default=0, doc="Raw rows merged into this bucket.")
    hist_counts: Mapped[bytes] = mapped_column(LargeBinary, doc="Packed histogram (dashboard.histograms).")
    hist_sum_ms: Mapped[float] = mapped_column(Float, default=0.0)
    cpu_avg: Mapped[Optional[float]] = mapped_column(Float)
    rss_avg: Mapped[Optional[float]] = mapped_column(Float)
    queue_depth_max: Mapped[int] = mapped_column(Integer, default=0)
    batch_sizes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    live_sequences_max: Mapped[Optional[int]] = mapped_column(Integer, doc="Most live sequences reported.")
    # Text-generation figures merged (rollup._TextAgg); generated_tokens IS NULL: no row of the bucket had text.
    ttft_counts: Mapped[Optional[bytes]] = mapped_column(LargeBinary, doc="Packed TTFT sketch (counts added).")
    ttft_sum_ms: Mapped[Optional[float]] = mapped_column(Float)
    tpot_counts: Mapped[Optional[bytes]] = mapped_column(LargeBinary, doc="Packed TPOT sketch (counts added).")
    tpot_sum_ms: Mapped[Optional[float]] = mapped_column(Float)
    prompt_tokens: Mapped[Optional[int]] = mapped_column(BigInteger)
    generated_tokens: Mapped[Optional[int]] = mapped_column(BigInteger)
    kv_cache_usage_avg: Mapped[Optional[float]] = mapped_column(Float, doc="Mean of the end-of-interval usages.")
    kv_cache_peak_max: Mapped[Optional[float]] = mapped_column(Float, doc="Highest peak reported.")
    running_max: Mapped[Optional[int]] = mapped_column(Integer)
    waiting_max: Mapped[Optional[int]] = mapped_column(Integer)
    cancelled: Mapped[Optional[int]] = mapped_column(BigInteger)
    preemptions: Mapped[Optional[int]] = mapped_column(BigInteger, doc="None: no row said.")


class Rollup1m(_RollupMixin, Base):
    """Raw telemetry summed into one-minute buckets per device and model."""

    __tablename__ = "rollup_1m"

    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)

    __table_args__ = (Index("ix_rollup_1m_bucket", "bucket_start"),
                      Index("ix_rollup_1m_device_bucket", "device_pk", "bucket_start"))


class Rollup1h(_RollupMixin, Base):
    """One-minute rollups summed into one-hour buckets per device and model."""

    __tablename__ = "rollup_1h"

    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)

    __table_args__ = (Index("ix_rollup_1h_bucket", "bucket_start"),
                      Index("ix_rollup_1h_device_bucket", "device_pk", "bucket_start"))


class FleetRollup(Base):
    """Every device's rollups of one model merged per bucket (``resolution`` "1m" or "1h").

    The fleet overview chart reads these few rows instead of merging 10,000 devices per request.
    """

    __tablename__ = "fleet_rollup"

    resolution: Mapped[str] = mapped_column(String(4), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)
    devices: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    hist_counts: Mapped[bytes] = mapped_column(LargeBinary, doc="Packed histogram (dashboard.histograms).")
    hist_sum_ms: Mapped[float] = mapped_column(Float, default=0.0)
    # Text-generation figures of every device merged; kv_cache_usage_avg is the mean over the devices.
    ttft_counts: Mapped[Optional[bytes]] = mapped_column(LargeBinary, doc="Packed TTFT sketch (counts added).")
    ttft_sum_ms: Mapped[Optional[float]] = mapped_column(Float)
    tpot_counts: Mapped[Optional[bytes]] = mapped_column(LargeBinary, doc="Packed TPOT sketch (counts added).")
    tpot_sum_ms: Mapped[Optional[float]] = mapped_column(Float)
    prompt_tokens: Mapped[Optional[int]] = mapped_column(BigInteger)
    generated_tokens: Mapped[Optional[int]] = mapped_column(BigInteger)
    kv_cache_usage_avg: Mapped[Optional[float]] = mapped_column(Float)
    kv_cache_peak_max: Mapped[Optional[float]] = mapped_column(Float)
    cancelled: Mapped[Optional[int]] = mapped_column(BigInteger)
    preemptions: Mapped[Optional[int]] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_fleet_rollup_res_bucket", "resolution", "bucket_start"),)


class RollupState(Base):
    """Watermarks of the rollup job (e.g. the last raw row id rolled up)."""

    __tablename__ = "rollup_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


# ------------------------------------------------------------------------------ events and results
class Event(Base):
    """An agent event (install, switch, self_test, rollback, error, ...)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column()
    session_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    ok: Mapped[bool] = mapped_column(Boolean, default=True)
    model: Mapped[Optional[str]] = mapped_column(String(128))
    version: Mapped[Optional[str]] = mapped_column(String(64))
    from_version: Mapped[Optional[str]] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    command_id: Mapped[Optional[str]] = mapped_column(String(64))
    deployment_id: Mapped[Optional[str]] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("device_pk", "session_id", "seq", name="uq_events_msg"),
        Index("ix_events_device_ts", "device_pk", "ts"),
        Index("ix_events_deployment", "deployment_id"),
        Index("ix_events_command", "command_id"),
    )


class CommandResult(Base):
    """An agent's answer on ``cmd/result`` to a command id."""

    __tablename__ = "command_results"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column()
    session_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    command_id: Mapped[str] = mapped_column(String(64))
    command: Mapped[Optional[str]] = mapped_column(String(32))
    ok: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    deployment_id: Mapped[Optional[str]] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("device_pk", "session_id", "seq", name="uq_command_results_msg"),
        Index("ix_command_results_command", "command_id"),
        Index("ix_command_results_deployment", "deployment_id"),
    )


# ------------------------------------------------------------------------- packages and deployments
class Package(Base):
    """An uploaded ``.eopkg`` (signature and hashes checked on upload)."""

    __tablename__ = "packages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(32))
    precision: Mapped[Optional[str]] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    signer_key_id: Mapped[Optional[str]] = mapped_column(String(128))
    storage_path: Mapped[str] = mapped_column(Text)
    uploaded_at: Mapped[datetime] = mapped_column(default=utcnow)
    uploaded_by_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))

    uploaded_by: Mapped[Optional["User"]] = relationship()
    deployments: Mapped[list["Deployment"]] = relationship(back_populates="package")

    __table_args__ = (UniqueConstraint("name", "version", "profile", name="uq_packages_name_version_profile"),)


class Deployment(Base):
    """Rollout of one package to a target (devices, a group or a tag), in two stages.

    Stage 1 goes to ``stage_percent`` of the targets; stage 2 to the rest once stage 1 succeeded. The
    deployment stops (state ``failed``) when more than ``failure_threshold`` (a share, 0..1) of the
    targets that finished have failed.
    """

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    package_id: Mapped[int] = mapped_column(ForeignKey("packages.id", ondelete="RESTRICT"))
    target_kind: Mapped[str] = mapped_column(String(16))  # "devices" | "group" | "tag"
    target_value: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"devices": [...]} / {"group": ..}
    stage_percent: Mapped[int] = mapped_column(Integer, default=100)
    current_stage: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = _enum_col(DeploymentState, DeploymentState.pending)
    failure_threshold: Mapped[float] = mapped_column(Float, default=0.2)
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[Optional[datetime]] = mapped_column()
    created_by_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))

    package: Mapped[Package] = relationship(back_populates="deployments")
    created_by: Mapped[Optional["User"]] = relationship()
    targets: Mapped[list["DeploymentTarget"]] = relationship(
        back_populates="deployment", cascade="all, delete-orphan", order_by="DeploymentTarget.id")

    __table_args__ = (Index("ix_deployments_state", "state"), Index("ix_deployments_created_at", "created_at"))


class DeploymentTarget(Base):
    """One device of a deployment and its progress."""

    __tablename__ = "deployment_targets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    stage: Mapped[int] = mapped_column(Integer, default=1)
    command_id: Mapped[Optional[str]] = mapped_column(String(64), unique=True)
    state: Mapped[str] = _enum_col(TargetState, TargetState.pending)
    message: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[Optional[datetime]] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    deployment: Mapped[Deployment] = relationship(back_populates="targets")
    device: Mapped[Device] = relationship()

    __table_args__ = (
        UniqueConstraint("deployment_id", "device_pk", name="uq_deployment_targets_device"),
        Index("ix_deployment_targets_state", "deployment_id", "state"),
    )


# ------------------------------------------------------------------------------------------- users
class User(Base):
    """A dashboard user; ``password_hash`` only, never the password."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = _enum_col(Role, Role.viewer)
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login: Mapped[Optional[datetime]] = mapped_column()

    tokens: Mapped[list["ApiToken"]] = relationship(back_populates="user", cascade="all, delete-orphan")
    sessions: Mapped[list["LoginSession"]] = relationship(back_populates="user", cascade="all, delete-orphan")


class LoginSession(Base):
    """One browser login, kept server-side so that logout and a password change end it for good.

    The signed session (and remember-me) cookie carries a random token; only its SHA-256 is stored.
    Every request looks the token up, so a copied cookie stops working the moment its row is gone.
    """

    __tablename__ = "login_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    user: Mapped[User] = relationship(back_populates="sessions")


class RateLimitCounter(Base):
    """A fixed-window counter of the login rate limits (see ``ratelimit.py``), shared by every web worker."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    hits: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class ApiToken(Base):
    """An API token for scripts; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used: Mapped[Optional[datetime]] = mapped_column()
    revoked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    user: Mapped[User] = relationship(back_populates="tokens")


# ------------------------------------------------------------------------------------------ alerts
class AlertRule(Base):
    """offline: ``threshold_minutes``; p95_slo: ``model`` (None = any) and ``threshold_ms``;
    install_failure: no threshold."""

    __tablename__ = "alert_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[Optional[str]] = mapped_column(String(128))
    threshold_minutes: Mapped[Optional[float]] = mapped_column(Float)
    threshold_ms: Mapped[Optional[float]] = mapped_column(Float)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    alerts: Mapped[list["Alert"]] = relationship(back_populates="rule", cascade="all, delete-orphan")


class Alert(Base):
    """An alert raised by a rule for a device; open until its condition clears."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_id: Mapped[int] = mapped_column(ForeignKey("alert_rules.id", ondelete="CASCADE"))
    device_pk: Mapped[Optional[int]] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    state: Mapped[str] = _enum_col(AlertState, AlertState.open)
    model: Mapped[Optional[str]] = mapped_column(String(128))
    value: Mapped[Optional[float]] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text, default="")
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[Optional[datetime]] = mapped_column()

    rule: Mapped[AlertRule] = relationship(back_populates="alerts")
    device: Mapped[Optional[Device]] = relationship()

    __table_args__ = (Index("ix_alerts_state_opened", "state", "opened_at"),
                      Index("ix_alerts_rule_device_state", "rule_id", "device_pk", "state"))


# ------------------------------------------------------------------------------------------ ingest
class IngestCounter(Base):
    """Counts of ingest outcomes by reason: accepted kinds and rejections (bad_json, bad_schema,
    bad_version, oversize, bad_topic, duplicate, ...)."""

    __tablename__ = "ingest_counters"

    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeadLetter(Base):
    """A message the ingest could not accept, kept for inspection (``edgeopt-dashboard dead-letters``):
    malformed, too deep, out-of-window timestamps, refused by the database. The payload is kept as
    received, up to ``DEAD_LETTER_MAX_BYTES``; ``payload_bytes`` is its full size."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    received_at: Mapped[datetime] = mapped_column()
    reason: Mapped[str] = mapped_column(String(64))
    error: Mapped[str] = mapped_column(Text, default="")
    topic: Mapped[str] = mapped_column(String(512))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    payload_bytes: Mapped[int] = mapped_column(Integer)
    ingest: Mapped[str] = mapped_column(String(128), default="")

    __table_args__ = (Index("ix_dead_letters_received", "received_at"),
                      Index("ix_dead_letters_reason_received", "reason", "received_at"))


class IngestProcess(Base):
    """Health of one ingest process (keyed by its MQTT client id), written by the process itself every
    few seconds: a stale ``beat_at`` means the process is gone or cannot reach the database."""

    __tablename__ = "ingest_processes"

    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    beat_at: Mapped[datetime] = mapped_column()
    beat_every_s: Mapped[float] = mapped_column(Float)
    healthy: Mapped[bool] = mapped_column(Boolean)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
