"""The job board's table, adopting a board written before alembic with its rows.

Boards from before alembic already hold a `jobs` table: it is kept, given the columns added since
(which server and worker run a job) and the states' later spelling (BentoML's `canceled`), and its
rows stay. A new database gets the table as it is now.

Revision ID: jobs_0001
Revises:
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "jobs_0001"
down_revision = None
branch_labels = ("jobs",)
depends_on = None

PROCESS_COLUMNS = ("owner", "owner_started", "worker", "worker_started")  # pids and process start times


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("jobs"):
        op.create_table(
            "jobs",
            sa.Column("task_id", sa.Text, primary_key=True),
            sa.Column("state", sa.Text),
            sa.Column("step", sa.Integer),
            sa.Column("total_steps", sa.Integer),
            sa.Column("error", sa.Text),
            sa.Column("updated_at", sa.Double),
            *(sa.Column(column, sa.BigInteger) for column in PROCESS_COLUMNS),
        )
    else:
        present = {column["name"] for column in inspector.get_columns("jobs")}
        for column in PROCESS_COLUMNS:
            if column not in present:
                op.add_column("jobs", sa.Column(column, sa.BigInteger))
        op.execute("UPDATE jobs SET state = 'canceled' WHERE state = 'cancelled'")
        op.execute("UPDATE jobs SET state = 'canceling' WHERE state = 'cancelling'")
    if "jobs_by_updated_at" not in {index["name"] for index in inspector.get_indexes("jobs")}:
        op.create_index("jobs_by_updated_at", "jobs", ["updated_at"])  # the board keeps the newest jobs


def downgrade() -> None:
    op.drop_table("jobs")
