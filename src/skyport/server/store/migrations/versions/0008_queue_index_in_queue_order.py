"""the queue index in queue order again (priority descending)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 03:30:00

0001 created ``ix_jobs_queue`` on (state, priority DESC, seq). On SQLite, every later batch migration of
the jobs table (0002, 0003, 0004, 0007) copies the table and recreates its indexes from reflection, which
does not return the DESC: the index became (state, priority, seq). Queue order is priority descending,
then submission order, so SQLite read every queued job of the head's priority and sorted them by seq
("USE TEMP B-TREE FOR RIGHT PART OF ORDER BY") on every scheduling pass, to return a page of 16-64:
about 3 ms per 3,000 queued jobs. Recreated outside batch mode, on both backends.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.create_index("ix_jobs_queue", "jobs", ["state", sa.text("priority DESC"), "seq"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.create_index("ix_jobs_queue", "jobs", ["state", "priority", "seq"], unique=False)
