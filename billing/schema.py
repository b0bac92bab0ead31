"""The billing tables (SQLAlchemy 2), in the same database as the metering ledger.

Every table is prefixed `billing_`; billing's Alembic migrations keep their own version table
(`billing_alembic_version`) so they never meet metering's.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.migrations import Migrations

VERSION_TABLE = "billing_alembic_version"
# Run by core.migrations (billing.db.LazyMigrations). Billing's engine takes SQLite's write lock up front, so a
# migration never loses a race to another process: one attempt.
MIGRATIONS = Migrations(
    "billing", Path(__file__).parent / "migrations", VERSION_TABLE, pg_lock_key=0x6266_6962_696C
)


class Base(DeclarativeBase):
    """Declarative base with billing's own metadata."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class User(Base):
    """A user: a tier, and optionally a monthly pay-as-you-go spending limit."""

    __tablename__ = "billing_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(96), unique=True)
    tier: Mapped[str] = mapped_column(String(32))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    spending_limit_nanousd: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Org(Base):
    """An organization: a plan, seats, a spending limit; members and disabled models in their own tables."""

    __tablename__ = "billing_orgs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(96), unique=True)
    plan: Mapped[str] = mapped_column(String(32))
    seats: Mapped[int] = mapped_column(Integer)
    spending_limit_nanousd: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class OrgMember(Base):
    """Membership of a user in an organization (an org admin manages its limit, models and usage)."""

    __tablename__ = "billing_org_members"

    org_id: Mapped[int] = mapped_column(ForeignKey("billing_orgs.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("billing_users.id", ondelete="CASCADE"), primary_key=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)


class DisabledModel(Base):
    """A model an organization refuses to be billed for (lower-case: ids match case-insensitively)."""

    __tablename__ = "billing_org_disabled_models"

    org_id: Mapped[int] = mapped_column(ForeignKey("billing_orgs.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)


class Token(Base):
    """An access token: only its SHA-256 is stored; `id` is a public handle for listing and revoking."""

    __tablename__ = "billing_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("billing_users.id", ondelete="CASCADE"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(16))  # prefix + first characters, for listings
    label: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class MonthSpend(Base):
    """The admission gate: settled costs plus open reservations of one account in one month (UTC)."""

    __tablename__ = "billing_month_spend"

    account: Mapped[str] = mapped_column(String(120), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    committed_nanousd: Mapped[int] = mapped_column(BigInteger, default=0)


class Reservation(Base):
    """One admitted request: its estimate while open, its true cost once settled, nothing once released.

    Written behind the response, in batches (billing/spend.py): a request that ends within its budget's lease
    is inserted settled; one still running when the lease rolls over is inserted open and settled later.
    `request_id` is the request's Inference-Id, the key of its charge in the metering ledger, unique: a charge
    whose row never came (a crashed replica) is adopted from the ledger once, and a late insert of the same
    request is skipped. `lease_id`: the lease that admitted it (None before leases, or adopted).
    """

    __tablename__ = "billing_reservations"
    __table_args__ = (
        # reports: one account's month, page by page in (started_at, id) order
        Index(
            "ix_billing_reservations_account_month_state_started",
            "account",
            "month",
            "state",
            "started_at",
            "id",
        ),
        # admission: the account's stale open reservations (expiry)
        Index("ix_billing_reservations_account_state_created", "account", "state", "created_at"),
        # the background sweep (open past the grace, recently expired) and pruning (old terminal rows)
        Index("ix_billing_reservations_state_created", "state", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account: Mapped[str] = mapped_column(String(120))
    user: Mapped[str] = mapped_column(String(120))
    kind: Mapped[str] = mapped_column(String(16))
    model_id: Mapped[str] = mapped_column(String(200))
    month: Mapped[str] = mapped_column(String(7))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    estimate_nanousd: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(10))  # open | settled | released | expired
    cost_nanousd: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    settled_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True, unique=True)
    hardware_profile: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Lease(Base):
    """A slice of one account's month that one process admits from in memory (billing/leases.py).

    `held_nanousd` is what the lease adds to the month's committed total: its unspent part plus the estimates
    of the requests it admitted that are still running there. The holder returns it when it expires or is used
    up (`returned`); a lease still open `LEASE_RECLAIM_GRACE_S` past `expires_at` belonged to a process that
    died, and any other process gives its amount back (`reclaimed`).
    """

    __tablename__ = "billing_leases"
    __table_args__ = (
        # admission: an account's dead leases; housekeeping: every dead lease
        Index("ix_billing_leases_account_state_expires", "account", "state", "expires_at"),
        Index("ix_billing_leases_state_expires", "state", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account: Mapped[str] = mapped_column(String(120))
    month: Mapped[str] = mapped_column(String(7))
    holder: Mapped[str] = mapped_column(String(120))  # host:pid, for an operator
    held_nanousd: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(10))  # open | returned | reclaimed
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class HousekeepingMark(Base):
    """A fact housekeeping leaves for readers: `pruned_before`, the instant before which finished reservations
    may have been deleted (so older months are read from the metering ledger); `ledger_adopted_through`, the
    ledger id up to which every charge has its reservation row (`value`)."""

    __tablename__ = "billing_housekeeping"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    value: Mapped[int | None] = mapped_column(
        BigInteger, nullable=True
    )  # ledger_adopted_through: a ledger id


class AuditEntry(Base):
    """One admin action (billing/audit.py): who, what, when, from where, and the status it was answered with."""

    __tablename__ = "billing_audit"
    __table_args__ = (Index("ix_billing_audit_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(120))  # the caller's account, `(admin)` for the admin token
    action: Mapped[str] = mapped_column(String(300))  # `POST /admin/users`, `cli create-user`
    target: Mapped[str | None] = mapped_column(String(300), nullable=True)
    status: Mapped[int] = mapped_column(Integer)  # the HTTP status (a command: 0 done, 1 refused)
    source: Mapped[str] = mapped_column(String(120))  # `http 10.0.0.7`, `cli alice@host`
