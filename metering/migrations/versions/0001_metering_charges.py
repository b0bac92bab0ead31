"""The charge ledger: one row per request id, with the indexes the reports use.

Revision ID: 0001_metering_charges
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_metering_charges"
down_revision = None
branch_labels = None
depends_on = None

_big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "metering_charges",
        sa.Column("id", _big_id, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model_id", sa.String(256), nullable=False),
        sa.Column("revision", sa.String(128), nullable=False),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("hardware_profile", sa.String(64), nullable=False),
        sa.Column("price_usd_per_hour", sa.String(40), nullable=False),
        sa.Column("price_effective_from", sa.Date(), nullable=False),
        sa.Column("compute_ns", sa.BigInteger(), nullable=False),
        sa.Column("compute_ms", sa.BigInteger(), nullable=False),
        sa.Column("queue_ns", sa.BigInteger(), nullable=False),
        sa.Column("total_ns", sa.BigInteger(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("input_characters", sa.BigInteger(), nullable=False),
        sa.Column("input_images", sa.Integer(), nullable=False),
        sa.Column("input_audio_seconds", sa.Float(), nullable=False),
        sa.Column("cost_nanousd", sa.BigInteger(), nullable=False),
        sa.Column("user", sa.String(256), nullable=False),
        sa.Column("billed_account", sa.String(256), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("client_request_id", sa.String(256), nullable=True),
        sa.Column("extra", sa.Text(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("request_id", name="uq_metering_charges_request_id"),
    )
    # Reports: per account over an interval, grouped by day; admin-wide over an interval; per model.
    op.create_index(
        "ix_metering_charges_account_started", "metering_charges", ["billed_account", "started_at"]
    )
    op.create_index("ix_metering_charges_started", "metering_charges", ["started_at"])
    op.create_index("ix_metering_charges_account_day", "metering_charges", ["billed_account", "day"])
    op.create_index("ix_metering_charges_model_day", "metering_charges", ["model_id", "day"])


def downgrade() -> None:
    op.drop_table("metering_charges")
