"""At most one open (unanswered) pair per rater and campaign: a unique partial index, so two replicas (or
workers) answering one rater's `GET /pair` at once cannot both issue a pair; the second insert fails and
that request returns the rater's open pair (`CampaignStore.issue_pair`).

Idempotent (a start killed part-way runs it again): open pairs issued twice before the index (the race it
closes) are removed first, keeping each rater's oldest (an unanswered pair has no verdicts), and the index
is created only when absent.

Revision ID: campaigns_0002
Revises: campaigns_0001
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "campaigns_0002"
down_revision = "campaigns_0001"
branch_labels = None
depends_on = None

INDEX = "pairs_one_open_per_rater"


def upgrade() -> None:
    if INDEX in {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("pairs")}:
        return
    op.execute(
        "DELETE FROM pairs WHERE answered_at IS NULL AND EXISTS (SELECT 1 FROM pairs AS older "
        "WHERE older.campaign = pairs.campaign AND older.rater = pairs.rater AND older.answered_at IS NULL "
        "AND (older.issued_at < pairs.issued_at "
        "OR (older.issued_at = pairs.issued_at AND older.pair_id < pairs.pair_id)))")
    op.create_index(INDEX, "pairs", ["campaign", "rater"], unique=True,
                    sqlite_where=sa.text("answered_at IS NULL"), postgresql_where=sa.text("answered_at IS NULL"))


def downgrade() -> None:
    op.drop_index(INDEX, "pairs")
