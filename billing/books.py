"""The low-level writes of the spend book, shared by leases, the batched writer and housekeeping.

Every writer follows one lock order, so PostgreSQL never deadlocks two of them: lease rows, then reservation rows
(inserted in request-id order), then the month totals (in (account, month) order).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import BigInteger, DateTime, String, column, table, update
from sqlalchemy.orm import Session

from billing.schema import MonthSpend, Reservation
from core.utc import as_utc

OPEN, SETTLED, RELEASED, EXPIRED = "open", "settled", "released", "expired"
FINISHED = (SETTLED, RELEASED, EXPIRED)
# The columns of metering's ledger that billing reads: plain SQL, no import of metering's code.
LEDGER_CHARGES = table(
    "metering_charges",
    column("id", BigInteger),
    column("request_id", String),
    column("cost_nanousd", BigInteger),
    column("hardware_profile", String),
    column("billed_account", String),
    column("user", String),
    column("model_id", String),
    column("started_at", DateTime),
    column("recorded_at", DateTime),
)
_INSERT_CHUNK_ROWS = 500  # 15 columns a row: far below SQLite's bound-parameter limit

Deltas = defaultdict[tuple[str, str], int]


def month_of(when: dt.datetime) -> str:
    """The calendar month (UTC) a request started in, as YYYY-MM: the month it is charged in."""
    utc = as_utc(when)
    return f"{utc.year:04d}-{utc.month:02d}"  # strftime's result, without its cost on every admission


def new_deltas() -> Deltas:
    """Changes of month totals, by (account, month), to apply together with `apply_deltas`."""
    return defaultdict(int)


def dialect_insert(session: Session) -> Any:
    """The dialect's `insert` (it has `on_conflict_do_nothing`)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def insert_month_row(session: Session, account: str, month: str) -> None:
    """Create the (account, month) total at 0 unless it exists."""
    insert = dialect_insert(session)
    values = {"account": account, "month": month, "committed_nanousd": 0}
    session.execute(insert(MonthSpend.__table__).values(**values).on_conflict_do_nothing())


def apply_deltas(session: Session, deltas: Mapping[tuple[str, str], int], *, touch: Iterable = ()) -> None:
    """Add each delta to its month total, in (account, month) order (one lock order for every writer).

    `touch`: keys to lock (and create) even when their delta is 0, so a caller can read them afterwards without
    taking a lock out of order."""
    table = MonthSpend.__table__
    keys = sorted(set(deltas) | set(touch))
    for account, month in keys:
        insert_month_row(session, account, month)
        session.execute(
            update(table)
            .where(table.c.account == account, table.c.month == month)
            .values(committed_nanousd=table.c.committed_nanousd + deltas.get((account, month), 0))
        )


def insert_reservations(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Insert reservation rows, skipping any whose request id already has one (a charge the sweep adopted
    from the ledger first) or whose id is there already (a write whose commit was in doubt, repeated); the ids
    of the rows inserted."""
    if not rows:
        return set()
    table = Reservation.__table__
    # One statement for any number of rows (executemany): compiled once and cached, sent as multi-row VALUES
    # batches ("insertmanyvalues"); RETURNING names the rows that were new. A statement with the rows' values
    # in it would be compiled afresh for every batch, which cost most of the writer's time.
    stmt = (
        dialect_insert(session)(table)
        .on_conflict_do_nothing()  # either unique key: the id, or the request id
        .returning(table.c.id)
    )
    ordered = sorted(rows, key=lambda r: (r["request_id"] is None, r["request_id"] or "", r["id"]))
    inserted: set[str] = set()
    for i in range(0, len(ordered), _INSERT_CHUNK_ROWS):
        inserted.update(session.scalars(stmt, ordered[i : i + _INSERT_CHUNK_ROWS]))
    return inserted


def reservation_row(
    *,
    reservation_id: str,
    account: str,
    user: str,
    kind: str,
    model_id: str,
    month: str,
    started_at: dt.datetime,
    created_at: dt.datetime,
    estimate_nanousd: int,
    state: str,
    request_id: str | None,
    cost_nanousd: int | None = None,
    settled_at: dt.datetime | None = None,
    hardware_profile: str | None = None,
    lease_id: str | None = None,
) -> dict[str, Any]:
    """The values of one billing_reservations row."""
    return {
        "id": reservation_id,
        "account": account,
        "user": user,
        "kind": kind,
        "model_id": model_id,
        "month": month,
        "started_at": as_utc(started_at),
        "created_at": as_utc(created_at),
        "estimate_nanousd": estimate_nanousd,
        "state": state,
        "cost_nanousd": cost_nanousd,
        "settled_at": settled_at,
        "request_id": request_id,
        "hardware_profile": hardware_profile,
        "lease_id": lease_id,
    }
