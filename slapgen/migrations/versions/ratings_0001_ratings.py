"""The studio's ratings table, adopting one written before alembic with its rows.

Revision ID: ratings_0001
Revises:
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "ratings_0001"
down_revision = None
branch_labels = ("ratings",)
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("ratings"):
        return  # a database from before alembic: the same columns, kept as they are
    op.create_table(
        "ratings",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.Double),
        sa.Column("rater", sa.Text),
        sa.Column("criterion", sa.Text),
        sa.Column("choice", sa.Text),
        sa.Column("left_system", sa.Text),
        sa.Column("left_scale", sa.Double),
        sa.Column("right_system", sa.Text),
        sa.Column("right_scale", sa.Double),
        sa.Column("prompt", sa.Text),
        sa.Column("seed", sa.BigInteger),
        sqlite_autoincrement=True,  # an id is never reused after a delete, as before
    )


def downgrade() -> None:
    op.drop_table("ratings")
