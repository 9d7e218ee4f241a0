"""the jobs' partition and array indexes hold only the jobs that have one

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 08:10:00

``ix_jobs_partition_id`` and ``ix_jobs_array_id`` indexed every job, NULL included, and most jobs run on
no elastic partition and are no array's tasks: each submission inserted two index entries for nothing,
and each placement (which sets ``partition_id``, to NULL on a static node) rewrote one. Both are now
partial (``WHERE ... IS NOT NULL``), which every query on them implies (equality, IN, IS NOT NULL).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("partition_id", "array_id")


def upgrade() -> None:
    for column in COLUMNS:
        op.drop_index(f"ix_jobs_{column}", table_name="jobs")
        where = sa.text(f"{column} IS NOT NULL")
        op.create_index(f"ix_jobs_{column}", "jobs", [column], sqlite_where=where, postgresql_where=where)


def downgrade() -> None:
    for column in COLUMNS:
        op.drop_index(f"ix_jobs_{column}", table_name="jobs")
        op.create_index(f"ix_jobs_{column}", "jobs", [column])
