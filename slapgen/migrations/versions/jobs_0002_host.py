"""The machine of each job (`host`): replicas sharing one database judge only their own machine's jobs
at start-up (pids say nothing across machines, and every container's server is pid 1).

Revision ID: jobs_0002
Revises: jobs_0001
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "jobs_0002"
down_revision = "jobs_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows keep NULL: they were written when the board was one per machine, so they are this one's.
    # Checked first: SQLite commits an ADD COLUMN on its own, so a start killed before the version stamp
    # left the column and runs this again.
    if "host" not in {column["name"] for column in sa.inspect(op.get_bind()).get_columns("jobs")}:
        op.add_column("jobs", sa.Column("host", sa.Text))


def downgrade() -> None:
    op.drop_column("jobs", "host")
