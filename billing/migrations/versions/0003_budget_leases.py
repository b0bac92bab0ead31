"""Budget leases: admission without a database write per request.

`billing_leases` holds the slices of an account's month that processes admit from in memory; reservations record
the lease that admitted them; a reservation's request id becomes unique (a charge is adopted from the ledger at
most once, and a late insert of the same request is skipped); `billing_housekeeping.value` keeps how far the
ledger's charges have been matched with reservations (`ledger_adopted_through`).

Request ids were Inference-Ids (UUIDs) from the start; should a database hold the same one twice anyway, all but
its oldest row lose the id (they stay in the books, settled or not, only without a link to the ledger).

Revision ID: 0003_budget_leases
Revises: 0002_reservation_housekeeping
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_budget_leases"
down_revision = "0002_reservation_housekeeping"
branch_labels = None
depends_on = None

TABLE = "billing_reservations"
REQUEST_ID_INDEX = "ix_billing_reservations_request_id"


def upgrade() -> None:
    op.create_table(
        "billing_leases",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("account", sa.String(120), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("holder", sa.String(120), nullable=False),
        sa.Column("held_nanousd", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_billing_leases"),
    )
    op.create_index(
        "ix_billing_leases_account_state_expires", "billing_leases", ["account", "state", "expires_at"]
    )
    op.create_index("ix_billing_leases_state_expires", "billing_leases", ["state", "expires_at"])
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column("lease_id", sa.String(32), nullable=True))
    with op.batch_alter_table("billing_housekeeping") as batch:
        batch.add_column(sa.Column("value", sa.BigInteger(), nullable=True))
    op.execute(
        f"UPDATE {TABLE} SET request_id = NULL WHERE request_id IS NOT NULL AND id NOT IN "
        f"(SELECT MIN(id) FROM {TABLE} WHERE request_id IS NOT NULL GROUP BY request_id)"
    )
    op.drop_index(REQUEST_ID_INDEX, table_name=TABLE)
    op.create_index(REQUEST_ID_INDEX, TABLE, ["request_id"], unique=True)


def downgrade() -> None:
    op.drop_index(REQUEST_ID_INDEX, table_name=TABLE)
    op.create_index(REQUEST_ID_INDEX, TABLE, ["request_id"])
    with op.batch_alter_table("billing_housekeeping") as batch:
        batch.drop_column("value")
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column("lease_id")
    op.drop_index("ix_billing_leases_state_expires", table_name="billing_leases")
    op.drop_index("ix_billing_leases_account_state_expires", table_name="billing_leases")
    op.drop_table("billing_leases")
