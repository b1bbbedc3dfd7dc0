"""The rating campaigns' tables, adopting those written before alembic with their rows.

Revision ID: campaigns_0001
Revises:
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "campaigns_0001"
down_revision = None
branch_labels = ("campaigns",)
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    # A database from before alembic has some or all of them, with these columns: each is kept as it is.
    if not inspector.has_table("campaigns"):
        op.create_table(
            "campaigns",
            sa.Column("name", sa.Text, primary_key=True),
            sa.Column("created_at", sa.Double),
            sa.Column("spec", sa.Text),
        )
    if not inspector.has_table("videos"):
        op.create_table(
            "videos",
            sa.Column("token", sa.Text, primary_key=True),
            sa.Column("campaign", sa.Text),
            sa.Column("system", sa.Text),
            sa.Column("item", sa.Integer),
            sa.Column("file", sa.Text),
            sa.UniqueConstraint("campaign", "system", "item"),
        )
    if not inspector.has_table("pairs"):
        op.create_table(
            "pairs",
            sa.Column("pair_id", sa.Text, primary_key=True),
            sa.Column("campaign", sa.Text),
            sa.Column("rater", sa.Text),
            sa.Column("left_system", sa.Text),
            sa.Column("right_system", sa.Text),
            sa.Column("item", sa.Integer),
            sa.Column("repeat", sa.Integer),
            sa.Column("issued_at", sa.Double),
            sa.Column("answered_at", sa.Double),
        )
        op.create_index("pairs_by_rater", "pairs", ["campaign", "rater", "answered_at"])
    if not inspector.has_table("verdicts"):
        op.create_table(
            "verdicts",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("campaign", sa.Text),
            sa.Column("pair_id", sa.Text),
            sa.Column("rater", sa.Text),
            sa.Column("criterion", sa.Text),
            sa.Column("choice", sa.Text),
            sa.Column("created_at", sa.Double),
            sqlite_autoincrement=True,
        )
        op.create_index("verdicts_by_campaign", "verdicts", ["campaign", "id"])


def downgrade() -> None:
    for table in ("verdicts", "pairs", "videos", "campaigns"):
        op.drop_table(table)
