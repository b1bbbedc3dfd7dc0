"""When a replica told to stop (SIGTERM, with SLAP_STOP_GRACE_S) will have been killed (`stop_by`, the database's
clock): a job it still holds past that moment is failed by any replica reading it, at once instead of after the
lease.

Idempotent (checked first, as the earlier jobs revisions are): SQLite commits an ADD COLUMN on its own, so a
start killed before the version stamp runs this again. Existing rows keep NULL (judged by the lease alone).

Revision ID: jobs_0005
Revises: jobs_0004
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "jobs_0005"
down_revision = "jobs_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "stop_by" not in {column["name"] for column in sa.inspect(op.get_bind()).get_columns("jobs")}:
        op.add_column("jobs", sa.Column("stop_by", sa.Double))


def downgrade() -> None:
    op.drop_column("jobs", "stop_by")
