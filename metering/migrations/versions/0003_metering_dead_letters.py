"""Dead letters: spooled records the ledger refused for good, kept whole so that an operator can see and fix them.

A record the database refuses (a value too long for its column, a constraint it breaks) would otherwise block the
drain for good. Every column but `error` is unbounded text, so any record fits: the record is stored as ASCII
JSON, the request id as it came (not unique).

Revision ID: 0003_metering_dead_letters
Revises: 0002_metering_batch
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_metering_dead_letters"
down_revision = "0002_metering_batch"
branch_labels = None
depends_on = None

_big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "metering_dead_letters",
        sa.Column("id", _big_id, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("error", sa.String(2000), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column("dead_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("metering_dead_letters")
