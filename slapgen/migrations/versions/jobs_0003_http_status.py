"""The HTTP status of a failed job's error (`http_status`), so every replica answers a failed job's
`/jobs/get` alike from the board: the one that ran it and the others.

Idempotent (checked first, as jobs_0001 and jobs_0002 are): SQLite commits an ADD COLUMN on its own, so a
start killed before the version stamp runs this again. Existing failed rows keep NULL (answered 500).

Revision ID: jobs_0003
Revises: jobs_0002
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "jobs_0003"
down_revision = "jobs_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "http_status" not in {column["name"] for column in sa.inspect(op.get_bind()).get_columns("jobs")}:
        op.add_column("jobs", sa.Column("http_status", sa.Integer))


def downgrade() -> None:
    op.drop_column("jobs", "http_status")
