"""When a job was submitted (`created_at`) and when its generation took the model (`started_at`), on the
database's clock, so every replica answers `/jobs/status` with BentoML's `created_at` and `executed_at` from
the board, alike.

Idempotent (checked first, as the earlier jobs revisions are): SQLite commits an ADD COLUMN on its own, so a
start killed before the version stamp runs this again. Existing rows keep NULL (answered null).

Revision ID: jobs_0004
Revises: jobs_0003
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "jobs_0004"
down_revision = "jobs_0003"
branch_labels = None
depends_on = None

TIMES = ("created_at", "started_at")


def upgrade() -> None:
    present = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("jobs")}
    for name in TIMES:
        if name not in present:
            op.add_column("jobs", sa.Column(name, sa.Double))


def downgrade() -> None:
    for name in TIMES:
        op.drop_column("jobs", name)
