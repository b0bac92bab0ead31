"""Settlements written behind the response: what a request's end changes in the books, applied in batches.

Three kinds of write, queued by SpendBook.settle / release and applied in order, many per transaction:

- `SettledRow`: a request that ended within its budget's lease: its row is inserted settled, and its cost is
  added to the month's total (its estimate stays in the lease until the lease rolls over).
- `SettleOpen`: the true cost of a request that already has an open (or expired) row, as before leases.
- `ReleaseOpen`: an open row given back whole (the request failed).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.books import (
    EXPIRED,
    OPEN,
    RELEASED,
    SETTLED,
    Deltas,
    apply_deltas,
    insert_reservations,
    new_deltas,
)
from billing.schema import Reservation


@dataclass(frozen=True)
class SettledRow:
    """Insert a request's row, settled at its cost (skipped when the request already has a row)."""

    row: dict[str, Any]


@dataclass(frozen=True)
class SettleOpen:
    """Settle an open or expired row at the request's true cost."""

    reservation_id: str
    cost_nanousd: int
    request_id: str | None
    hardware_profile: str | None


@dataclass(frozen=True)
class ReleaseOpen:
    """Give back an open row whole."""

    reservation_id: str


Op = SettledRow | SettleOpen | ReleaseOpen


def write_batch(s: Session, ops: list[Op], now: dt.datetime) -> None:
    """Apply `ops` in one transaction: inserts first (a later settle of the same request finds its row), then
    the row updates in queue order, then the month totals."""
    deltas = new_deltas()
    rows = [op.row for op in ops if isinstance(op, SettledRow)]
    inserted = insert_reservations(s, rows)
    for row in rows:
        if row["id"] in inserted:
            deltas[(row["account"], row["month"])] += int(row["cost_nanousd"])
    updates = [op for op in ops if not isinstance(op, SettledRow)]
    if updates:
        ids = sorted({op.reservation_id for op in updates})
        found = {
            r.id: r
            for r in s.scalars(
                select(Reservation).where(Reservation.id.in_(ids)).order_by(Reservation.id).with_for_update()
            )
        }
        for op in updates:
            r = found.get(op.reservation_id)
            if r is not None:
                _update(r, op, now, deltas)
    apply_deltas(s, deltas)


def _update(r: Reservation, op: SettleOpen | ReleaseOpen, now: dt.datetime, deltas: Deltas) -> None:
    if isinstance(op, ReleaseOpen):
        if r.state == OPEN:
            r.state, r.settled_at = RELEASED, now
            deltas[(r.account, r.month)] -= r.estimate_nanousd
        return
    if r.state not in (OPEN, EXPIRED):
        return  # settled already (by the sweep from the ledger, or twice), or released
    # An expired reservation no longer counts; a request that ran is still charged in full.
    held = r.estimate_nanousd if r.state == OPEN else 0
    r.state, r.cost_nanousd, r.settled_at = SETTLED, op.cost_nanousd, now
    r.request_id = r.request_id or op.request_id
    r.hardware_profile = op.hardware_profile or r.hardware_profile
    deltas[(r.account, r.month)] += op.cost_nanousd - held
