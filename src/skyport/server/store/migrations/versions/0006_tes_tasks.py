"""tes_tasks: GA4GH TES tasks (one job each) with their documents, tags and callbacks

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from skyport.server.store.tables import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tes_tasks",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=256), server_default="", nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("task", sa.JSON(), nullable=False),
        sa.Column("notes", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("token_id", sa.String(length=36), nullable=True),
        sa.Column("callback_event_id", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("callback_done", sa.Boolean(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_tes_tasks_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_tes_tasks_owner_id_users")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_tes_tasks")),
        sa.UniqueConstraint("job_id", name=op.f("uq_tes_tasks_job_id")),
    )
    with op.batch_alter_table("tes_tasks", schema=None) as batch_op:
        batch_op.create_index("ix_tes_tasks_owner_seq", ["owner_id", "seq"], unique=False)
        batch_op.create_index("ix_tes_tasks_callback_done", ["callback_done"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tes_tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tes_tasks_callback_done")
        batch_op.drop_index("ix_tes_tasks_owner_seq")
    op.drop_table("tes_tasks")
