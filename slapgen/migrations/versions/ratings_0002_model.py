"""Which model a rating's videos came from (`model`, the served model's name as /info gives it): a store shared
by servers of two models (one SLAP_DATA_DIR or one PostgreSQL) mixed their ratings into one summary, as if
tiny-wan's `base` were tiny's. Ratings written before keep NULL: which model made them is not known, so the
summary of a model leaves them out and counts them apart (`RatingStore.summary`); the CSV keeps them all.

Idempotent (checked first, as the jobs revisions are): SQLite commits an ADD COLUMN on its own, so a start killed
before the version stamp runs this again.

Revision ID: ratings_0002
Revises: ratings_0001
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "ratings_0002"
down_revision = "ratings_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "model" not in {column["name"] for column in sa.inspect(op.get_bind()).get_columns("ratings")}:
        op.add_column("ratings", sa.Column("model", sa.Text))


def downgrade() -> None:
    op.drop_column("ratings", "model")
