"""Check billing's settled costs against the metering ledger's charges, request by request, for one month.

Billing keeps its own settled costs (they are the admission gate, written synchronously when a request ends);
the ledger is the record of every charge (written through metering's durable spool, so it may lag a moment).
For every request billed to one of our accounts both must hold the same cost. Routed Hugging Face requests
(`hf:` accounts) are only in the ledger and are left out.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import Engine, select

from billing.db import read_session
from billing.errors import InvalidRequest
from billing.reports import month_bounds
from billing.schema import Reservation
from billing.spend import SETTLED


@dataclass
class Reconciliation:
    """What matched and what did not, by request id."""

    month: str
    matched: int = 0
    billing_total_nanousd: int = 0
    ledger_total_nanousd: int = 0
    missing_in_ledger: list[str] = field(default_factory=list)  # settled here, no charge there (yet)
    missing_in_billing: list[str] = field(default_factory=list)  # charged there, never settled here
    different: list[tuple[str, int, int]] = field(default_factory=list)  # (request id, billing, ledger)

    @property
    def ok(self) -> bool:
        """Every request agrees."""
        return not (self.missing_in_ledger or self.missing_in_billing or self.different)


def reconcile(
    engine: Engine,
    database_url: str,
    month: str,
    *,
    routed_prefix: str = "hf:",
    pruned_before: dt.datetime | None = None,
) -> Reconciliation:
    """Compare billing's settled requests of `month` with the ledger's charges of the same month.

    `pruned_before`: reservations created before it may have been pruned, so a month that starts earlier cannot
    be compared (InvalidRequest, a 400, rather than a list of false differences).
    """
    from metering.ledger import Ledger

    start, end = month_bounds(month)
    if pruned_before is not None and start < pruned_before:
        raise InvalidRequest(
            f"month: {month} starts before {pruned_before:%Y-%m-%d %H:%M} UTC, where old reservations were "
            "pruned: only the ledger holds all its charges"
        )
    with read_session(engine) as s:
        ours = {
            (r.request_id or r.id): int(r.cost_nanousd or 0)
            for r in s.scalars(
                select(Reservation).where(Reservation.month == month, Reservation.state == SETTLED)
            )
        }
    ledger = Ledger(database_url)
    try:
        theirs = {
            c.request_id: c.cost_nanousd
            for c in ledger.charges(start, end)
            if not c.usage.billed_account.startswith(routed_prefix)
        }
    finally:
        ledger.close()
    out = Reconciliation(
        month, billing_total_nanousd=sum(ours.values()), ledger_total_nanousd=sum(theirs.values())
    )
    for rid, cost in sorted(ours.items()):
        if rid not in theirs:
            out.missing_in_ledger.append(rid)
        elif theirs[rid] != cost:
            out.different.append((rid, cost, theirs[rid]))
        else:
            out.matched += 1
    out.missing_in_billing = sorted(set(theirs) - set(ours))
    return out
