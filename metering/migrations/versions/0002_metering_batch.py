"""Batch traceability: the batch a charge's request ran in and the whole batch's compute time.

Rows that share a `batch_id` have `compute_ns` adding up exactly to their `batch_compute_ns`, so the split of a
batched forward pass can be audited from the ledger alone. Both columns are NULL for a request that ran alone and
for charges recorded before this revision.

Revision ID: 0002_metering_batch
Revises: 0001_metering_charges
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_metering_batch"
down_revision = "0001_metering_charges"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (nullable): no table rebuild on SQLite, no rewrite on PostgreSQL.
    op.add_column("metering_charges", sa.Column("batch_id", sa.String(64), nullable=True))
    op.add_column("metering_charges", sa.Column("batch_compute_ns", sa.BigInteger(), nullable=True))
    op.create_index("ix_metering_charges_batch_id", "metering_charges", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_metering_charges_batch_id", table_name="metering_charges")
    with op.batch_alter_table("metering_charges") as batch:
        batch.drop_column("batch_compute_ns")
        batch.drop_column("batch_id")
