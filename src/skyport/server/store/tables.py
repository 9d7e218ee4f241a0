"""The store's tables (SQLAlchemy Core). The schema itself is created by the alembic migrations.

Core, not the ORM: the hot paths (submit, claim, transition) are single statements over many rows, and
the rows map to pydantic models in :mod:`skyport.server.store.jobs` and friends.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use the injected clock (UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # SQLite may hand back text for computed values
            value = datetime.fromisoformat(value)
        aware: datetime = value.replace(tzinfo=UTC)
        return aware


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("roles", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("budget", Float, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    # Fair share: the account's target weight, and its recent use in CPU-seconds, decayed with the
    # policy's half-life as of ``usage_at`` (decay is applied whenever it is charged or read).
    Column("share", Float, nullable=False, server_default="1.0"),
    Column("usage", Float, nullable=False, server_default="0.0"),
    Column("usage_at", UTCDateTime, nullable=True),
    # What its jobs' elastic capacity has cost (same currency as the prices); budgets are checked on it.
    Column("spend", Float, nullable=False, server_default="0"),
)

account_members = Table(
    "account_members",
    metadata,
    Column("account_id", String(36), ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)

certificates = Table(
    "certificates",
    metadata,
    Column("serial", String(64), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("fingerprint", String(64), nullable=False),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

tokens = Table(
    "tokens",
    metadata,
    # Secrets are random (256 bits), so a plain SHA-256 of the secret is a safe and fast lookup key.
    Column("id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),  # api | bootstrap
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("name", String(128), nullable=False, server_default=""),
    Column("scopes", JSON, nullable=False),
    # A bootstrap token enrols one node of one remote, once.
    Column("remote_id", String(36), ForeignKey("remotes.id", ondelete="CASCADE"), nullable=True),
    Column("node_name", String(255), nullable=True),
    # For a node of an elastic partition: which one it joins.
    Column("partition_id", String(36), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("used_at", UTCDateTime, nullable=True),
)

remotes = Table(
    "remotes",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=True),
    Column("server", String(255), nullable=False, default=""),
    Column("port", Integer, nullable=False, default=0),
    Column("settings", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

flavors = Table(
    "flavors",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("remote_id", String(36), ForeignKey("remotes.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("cpus", Integer, nullable=False),
    Column("mem", BigInteger, nullable=False),
    Column("gpus", Integer, nullable=False, default=0),
    Column("storage", BigInteger, nullable=False, default=0),
    Column("price", Float, nullable=False, default=0.0),
    UniqueConstraint("remote_id", "name"),
)

images = Table(
    "images",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("remote_id", String(36), ForeignKey("remotes.id", ondelete="CASCADE"), nullable=True),
    Column("name", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("comment", Text, nullable=False, default=""),
)

partitions = Table(
    "partitions",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("remote_id", String(36), ForeignKey("remotes.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("static", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # Elastic partitions (static: False): what was asked of the provider, for whom, and where it is.
    Column("flavor_id", String(128), nullable=True),
    Column("image", String(255), nullable=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=True),
    Column("job_id", String(36), nullable=True),  # the job it was created for, or runs now
    Column("node_count", Integer, nullable=False, server_default="1"),
    Column("price", Float, nullable=False, server_default="0"),  # per node-hour
    Column("provider_id", String(255), nullable=False, server_default=""),
    Column("message", Text, nullable=False, server_default=""),
    Column("step_deadline", UTCDateTime, nullable=True),  # the current step must be done by then
    Column("attempts", Integer, nullable=False, server_default="0"),  # failed tries of the current step
    Column("next_try_at", UTCDateTime, nullable=True),  # backoff
    Column("idle_since", UTCDateTime, nullable=True),
    Column("charged_until", UTCDateTime, nullable=True),  # cost recorded up to then
)
Index("ix_partitions_state", partitions.c.state)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("remote_id", String(36), ForeignKey("remotes.id", ondelete="CASCADE"), nullable=False),
    Column("partition_id", String(36), ForeignKey("partitions.id", ondelete="SET NULL"), nullable=True),
    Column("name", String(255), nullable=False),
    Column("host", String(255), nullable=False),
    Column("ip", String(64), nullable=False, default=""),
    Column("state_power", String(8), nullable=False),
    Column("state_alloc", String(16), nullable=False),
    Column("cpus", Integer, nullable=False),
    Column("mem", BigInteger, nullable=False),
    Column("gpus", Integer, nullable=False, default=0),
    Column("storage", BigInteger, nullable=False, default=0),
    Column("labels", JSON, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("remote_id", "name"),
)

arrays = Table(
    "arrays",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("owner_id", String(36), ForeignKey("users.id"), nullable=False, index=True),
    Column("name", String(256), nullable=False),
    Column("range", String(256), nullable=False),  # as the user wrote it, e.g. 1-1000%50
    Column("size", Integer, nullable=False),
    Column("throttle", Integer, nullable=True),
    Column("submit_time", UTCDateTime, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    # Monotonic insertion order: stable pagination cursor and FCFS tie-break.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("owner_id", String(36), ForeignKey("users.id"), nullable=False, index=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=False),
    Column("name", String(256), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", String(64), nullable=False, default=""),
    Column("state_details", Text, nullable=False, default=""),
    Column("attempt", Integer, nullable=False, default=1),
    Column("spec", JSON, nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("cpus", Integer, nullable=False),
    Column("mem", BigInteger, nullable=False),
    Column("gpus", Integer, nullable=False),
    Column("node_count", Integer, nullable=False),
    Column("walltime", Integer, nullable=True),
    Column("labels", JSON, nullable=False),  # placement constraints, read by the scheduler
    Column("depends", JSON, nullable=False, server_default="[]"),  # job ids it waits for (after ok)
    Column("depends_any", JSON, nullable=False, server_default="[]"),  # ... (after any end)
    Column("exclusive", Boolean, nullable=False, server_default="0"),  # whole nodes
    Column("flavor", String(128), nullable=True),  # an elastic flavor asked for (#SWM flavor)
    Column("partition_id", String(36), nullable=True),  # the elastic partition it runs on
    Column("cost", Float, nullable=False, server_default="0"),  # flavor price x node-hours used
    Column("estimated_start", UTCDateTime, nullable=True),  # while queued, when known
    # A task of an array job: which array, which index, and how many of its tasks may run at once.
    Column("array_id", String(36), ForeignKey("arrays.id", ondelete="CASCADE"), nullable=True),
    Column("array_index", Integer, nullable=True),
    Column("array_throttle", Integer, nullable=True),
    # The remote the user asked for (None: any); remote_id is where the job was placed.
    Column("requested_remote_id", String(36), ForeignKey("remotes.id"), nullable=True),
    Column("remote_id", String(36), ForeignKey("remotes.id"), nullable=True),
    Column("node_ids", JSON, nullable=False),
    Column("node_names", JSON, nullable=False),
    Column("node_ips", JSON, nullable=False),
    # What the gate needs to find the job's processes again after a restart.
    Column("handle", JSON(none_as_null=True), nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("requeue_requested", Boolean, nullable=False, default=False),
    Column("canceled_by", String(64), nullable=True),
    Column("submit_time", UTCDateTime, nullable=False),
    Column("scheduled_time", UTCDateTime, nullable=True),
    Column("start_time", UTCDateTime, nullable=True),
    Column("end_time", UTCDateTime, nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("signal", Integer, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)
# The queue in scheduling order (priority first, then first come): the scheduler reads its head. A batch
# migration of the jobs table on SQLite recreates it without its DESC (see migration 0008): recreate it
# after any such migration (test_store checks it).
Index("ix_jobs_queue", jobs.c.state, jobs.c.priority.desc(), jobs.c.seq)
# Most jobs run on no elastic partition and are no array's tasks: these indexes hold only the jobs that
# are (migration 0009; every submission and placement wrote both for NULLs).
Index(
    "ix_jobs_partition_id",
    jobs.c.partition_id,
    sqlite_where=jobs.c.partition_id.is_not(None),
    postgresql_where=jobs.c.partition_id.is_not(None),
)
Index(
    "ix_jobs_array_id",
    jobs.c.array_id,
    sqlite_where=jobs.c.array_id.is_not(None),
    postgresql_where=jobs.c.array_id.is_not(None),
)

job_files = Table(
    "job_files",
    metadata,
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("kind", String(8), primary_key=True),  # input | output
    Column("name", String(1024), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("time", UTCDateTime, nullable=False),
    Column("from_state", String(16), nullable=True),
    Column("to_state", String(16), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("message", Text, nullable=False),
)

tes_tasks = Table(
    "tes_tasks",
    metadata,
    # Creation order: the stable page cursor of GET /ga4gh/tes/v1/tasks.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    # A TES task is one job; its TES id is the job's id.
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, unique=True),
    Column("owner_id", String(36), ForeignKey("users.id"), nullable=False),
    Column("name", String(256), nullable=False, server_default=""),
    Column("tags", JSON, nullable=False),
    # The task document as accepted (what GET shows back), and notes for its system_logs.
    Column("task", JSON, nullable=False),
    Column("notes", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # The callback_url extension: where state changes are POSTed, signed with the token the task was
    # created with (or the core's key); the last event delivered, and whether the final one was (true
    # from the start for tasks without a callback, so the loop's index holds only the pending ones).
    Column("callback_url", Text, nullable=True),
    Column("token_id", String(36), nullable=True),
    Column("callback_event_id", BigInteger, nullable=False, server_default="0"),
    Column("callback_done", Boolean, nullable=False, server_default="0"),
)
# A user's tasks newest first (the list's common query), and the callback loop's pending tasks.
Index("ix_tes_tasks_owner_seq", tes_tasks.c.owner_id, tes_tasks.c.seq)
Index("ix_tes_tasks_callback_done", tes_tasks.c.callback_done)
