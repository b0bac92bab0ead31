"""The audit log of admin actions (`billing_audit`): who, what, when, from where, answered with which status.

Revision ID: 0004_admin_audit
Revises: 0003_budget_leases
Create Date: 2026-12-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_admin_audit"
down_revision = "0003_budget_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "billing_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("action", sa.String(300), nullable=False),
        sa.Column("target", sa.String(300), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(120), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_billing_audit"),
    )
    op.create_index("ix_billing_audit_at", "billing_audit", ["at"])


def downgrade() -> None:
    op.drop_index("ix_billing_audit_at", table_name="billing_audit")
    op.drop_table("billing_audit")
