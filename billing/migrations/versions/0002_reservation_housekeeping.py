"""Reservation indexes for expiry, the background sweep, pruning and paged reports; the housekeeping marks.

The expiry query of every admission (an account's open reservations older than the TTL) had no matching
index, nor did a global look at open or old reservations; a report page needs (started_at, id) order within an
account's month. The old (account, month, state) index is a prefix of the new report index, which replaces it.
`billing_housekeeping` records how far pruning went (`pruned_before`).

Revision ID: 0002_reservation_housekeeping
Revises: 0001_billing_accounts
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_reservation_housekeeping"
down_revision = "0001_billing_accounts"
branch_labels = None
depends_on = None

TABLE = "billing_reservations"


def upgrade() -> None:
    op.drop_index("ix_billing_reservations_account_month_state", table_name=TABLE)
    op.create_index(
        "ix_billing_reservations_account_month_state_started",
        TABLE,
        ["account", "month", "state", "started_at", "id"],
    )
    op.create_index(
        "ix_billing_reservations_account_state_created", TABLE, ["account", "state", "created_at"]
    )
    op.create_index("ix_billing_reservations_state_created", TABLE, ["state", "created_at"])
    op.create_table(
        "billing_housekeeping",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_billing_housekeeping"),
    )


def downgrade() -> None:
    op.drop_table("billing_housekeeping")
    op.drop_index("ix_billing_reservations_state_created", table_name=TABLE)
    op.drop_index("ix_billing_reservations_account_state_created", table_name=TABLE)
    op.drop_index("ix_billing_reservations_account_month_state_started", table_name=TABLE)
    op.create_index("ix_billing_reservations_account_month_state", TABLE, ["account", "month", "state"])
