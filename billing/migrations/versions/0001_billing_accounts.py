"""Billing accounts: users, organizations, members, disabled models, tokens, month spend, reservations.

Revision ID: 0001_billing_accounts
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_billing_accounts"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "billing_users",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(96), nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("spending_limit_nanousd", sa.BigInteger(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_billing_users"),
        sa.UniqueConstraint("name", name="uq_billing_users_name"),
    )
    op.create_table(
        "billing_orgs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(96), nullable=False),
        sa.Column("plan", sa.String(32), nullable=False),
        sa.Column("seats", sa.Integer(), nullable=False),
        sa.Column("spending_limit_nanousd", sa.BigInteger(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_billing_orgs"),
        sa.UniqueConstraint("name", name="uq_billing_orgs_name"),
    )
    op.create_table(
        "billing_org_members",
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["billing_orgs.id"],
            ondelete="CASCADE",
            name="fk_billing_org_members_org_id_billing_orgs",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["billing_users.id"],
            ondelete="CASCADE",
            name="fk_billing_org_members_user_id_billing_users",
        ),
        sa.PrimaryKeyConstraint("org_id", "user_id", name="pk_billing_org_members"),
    )
    op.create_table(
        "billing_org_disabled_models",
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["billing_orgs.id"],
            ondelete="CASCADE",
            name="fk_billing_org_disabled_models_org_id_billing_orgs",
        ),
        sa.PrimaryKeyConstraint("org_id", "model_id", name="pk_billing_org_disabled_models"),
    )
    op.create_table(
        "billing_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("hint", sa.String(16), nullable=False),
        sa.Column("label", sa.String(100), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["billing_users.id"],
            ondelete="CASCADE",
            name="fk_billing_tokens_user_id_billing_users",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_billing_tokens"),
        sa.UniqueConstraint("token_sha256", name="uq_billing_tokens_token_sha256"),
    )
    op.create_index("ix_billing_tokens_user_id", "billing_tokens", ["user_id"])
    op.create_table(
        "billing_month_spend",
        sa.Column("account", sa.String(120), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("committed_nanousd", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account", "month", name="pk_billing_month_spend"),
    )
    op.create_table(
        "billing_reservations",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("account", sa.String(120), nullable=False),
        sa.Column("user", sa.String(120), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("estimate_nanousd", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("cost_nanousd", sa.BigInteger(), nullable=True),
        sa.Column("settled_at", TZ, nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("hardware_profile", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_billing_reservations"),
    )
    op.create_index(
        "ix_billing_reservations_account_month_state", "billing_reservations", ["account", "month", "state"]
    )
    op.create_index("ix_billing_reservations_request_id", "billing_reservations", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_billing_reservations_request_id", table_name="billing_reservations")
    op.drop_index("ix_billing_reservations_account_month_state", table_name="billing_reservations")
    op.drop_table("billing_reservations")
    op.drop_table("billing_month_spend")
    op.drop_index("ix_billing_tokens_user_id", table_name="billing_tokens")
    op.drop_table("billing_tokens")
    op.drop_table("billing_org_disabled_models")
    op.drop_table("billing_org_members")
    op.drop_table("billing_orgs")
    op.drop_table("billing_users")
