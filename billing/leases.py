"""Budget leases: one process's share of one account's month, spent in memory.

A `Budget` is what this process holds for one (account, month): a lease (a row of `billing_leases` whose
`held_nanousd` is counted in the month's committed total), the unspent part of it, and the requests it admitted
that are still running. Admission takes an estimate from the unspent part under a lock, with no database work.

When the lease has expired or cannot cover the next estimate, the budget *rolls over* in one transaction
(`roll_over`): its running requests become open reservation rows (their estimates move from the lease to the
rows: the month's total does not change), the lease's amount is given back, and, when an admission asked, a new
slice is taken with the same conditional check as a single reservation: committed + slice <= cap + allowance,
the slice being `lease_slice_estimates` estimates or what is left, if less but at least the one estimate asked
for. The same transaction gives back the account's leases that are `LEASE_RECLAIM_GRACE_S` past their expiry
(their process died) and resolves its stale open reservations.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.books import OPEN, Deltas, apply_deltas, insert_reservations, new_deltas, reservation_row
from billing.schema import Lease, MonthSpend

RETURNED, RECLAIMED = "returned", "reclaimed"
# A lease still open this long past its expiry is given back by any process: its holder returns it within a flush
# interval of expiry when alive, so only a dead (or cut-off) holder leaves one behind.
LEASE_RECLAIM_GRACE_S = 2.0
HOLDER = f"{socket.gethostname()}:{os.getpid()}"[:120]


@dataclass(eq=False)
class Held:
    """A request admitted in memory and still running: what its reservation row will say."""

    reservation_id: str
    account: str
    user: str
    kind: str
    model_id: str
    month: str
    started_at: dt.datetime
    admitted_at: dt.datetime
    estimate_nanousd: int
    request_id: str | None
    covered: bool  # its estimate came out of the budget's lease (False: an account without a cap)
    # A settle ("settle", cost, request_id, profile) or ("release",) that arrived while its budget rolled over.
    outcome: tuple | None = None

    def row(
        self, state: str, lease_id: str | None, *, request_id: str | None = None, **extra: object
    ) -> dict:
        """Its billing_reservations row in `state` (`request_id`: the one its settlement names, if any)."""
        return reservation_row(
            reservation_id=self.reservation_id,
            account=self.account,
            user=self.user,
            kind=self.kind,
            model_id=self.model_id,
            month=self.month,
            started_at=self.started_at,
            created_at=self.admitted_at,
            estimate_nanousd=self.estimate_nanousd,
            state=state,
            request_id=request_id or self.request_id,
            lease_id=lease_id if self.covered else None,
            **extra,  # type: ignore[arg-type]
        )


class Budget:
    """One (account, month) of this process: its lease and the requests it admitted that still run."""

    def __init__(self, account: str, month: str) -> None:
        self.account = account
        self.month = month
        self.lease_id = secrets.token_hex(16)
        self.held_db_nanousd = 0  # what the lease adds to the month's total, as of its last roll-over
        self.unspent_nanousd = 0
        self.expires_at: dt.datetime | None = None
        self.running: dict[str, Held] = {}
        self.converting: dict[str, Held] | None = None  # while a roll-over writes them
        self.roll_lock = threading.Lock()  # one roll-over (or top-up) at a time
        # The last roll-over's terms, for a top-up in the background before the lease runs out.
        self.limit_nanousd: int | None = None
        self.slice_nanousd = 0
        self.top_up_wanted = False
        self.topped_out = False  # a top-up found nothing left under the limit: none until the next roll-over

    def can_cover(self, estimate_nanousd: int, now: dt.datetime) -> bool:
        """Whether an estimate can come out of the lease now, without the database."""
        return (
            self.converting is None
            and self.expires_at is not None
            and now < self.expires_at
            and self.unspent_nanousd >= estimate_nanousd
        )

    def expired(self, now: dt.datetime) -> bool:
        """Past its lease (or, without one, past the time its running requests get rows)."""
        return self.expires_at is None or now >= self.expires_at

    def idle(self) -> bool:
        """Nothing held: no lease amount, no running request."""
        return not self.running and not self.converting and self.held_db_nanousd == 0

    def wants_top_up(self, estimate_nanousd: int, now: dt.datetime) -> bool:
        """Whether the lease, still valid, is down to less than half a slice but still covers another estimate
        (once it is spent, the next admission rolls it over instead)."""
        return (
            not self.top_up_wanted
            and not self.topped_out
            and self.held_db_nanousd > 0
            and not self.expired(now)
            and estimate_nanousd <= self.unspent_nanousd < self.slice_nanousd / 2
        )


@dataclass
class Rollover:
    """What a roll-over asks for and what it got."""

    need_nanousd: int  # the estimate of the admission that asked (0: only give back and write rows)
    limit_nanousd: int | None  # cap + allowance; None: no cap, no lease
    slice_nanousd: int
    lease_ttl_s: float
    granted_nanousd: int = 0
    expires_at: dt.datetime | None = None


def reclaim_dead_leases(
    s: Session, now: dt.datetime, deltas: Deltas, *, account: str | None = None, exclude: str | None = None
) -> int:
    """Give back the leases `LEASE_RECLAIM_GRACE_S` past their expiry (one account's, or all); how many."""
    cutoff = now - dt.timedelta(seconds=LEASE_RECLAIM_GRACE_S)
    stmt = select(Lease).where(Lease.state == OPEN, Lease.expires_at < cutoff)
    if account is not None:
        stmt = stmt.where(Lease.account == account)
    if exclude is not None:
        stmt = stmt.where(Lease.id != exclude)
    dead = s.scalars(stmt.order_by(Lease.id).with_for_update(skip_locked=True)).all()
    for lease in dead:
        deltas[(lease.account, lease.month)] -= lease.held_nanousd
        lease.state, lease.held_nanousd, lease.updated_at = RECLAIMED, 0, now
    return len(dead)


def roll_over(
    s: Session,
    budget: Budget,
    converting: Sequence[Held],
    ask: Rollover,
    now: dt.datetime,
    resolve_stale: Callable[[Session, str, dt.datetime, Deltas], object],
) -> None:
    """In one write transaction: write the running requests as open rows, give the lease back, and take a new
    slice when `ask.need_nanousd` fits under the limit (`ask.granted_nanousd`, 0 when it does not).

    `resolve_stale(s, account, now, deltas)` resolves the account's stale open reservations into `deltas`
    (the rows just written among them: a request admitted before the reservation TTL), when an admission asks,
    as a reservation did before leases; giving a lease back only writes (the sweep resolves the rest).
    """
    account, month = budget.account, budget.month
    lease = s.get(Lease, budget.lease_id, with_for_update=True)
    # A lease another process reclaimed (this one was cut off past the grace) no longer counts in the total.
    lease_held = lease.held_nanousd if lease is not None and lease.state == OPEN else 0
    deltas = new_deltas()
    reclaim_dead_leases(s, now, deltas, account=account, exclude=budget.lease_id)
    inserted = insert_reservations(s, [h.row(OPEN, budget.lease_id) for h in converting])
    # The rows now hold their estimates (a row already there, adopted from the ledger, holds its cost instead).
    deltas[(account, month)] += sum(h.estimate_nanousd for h in converting if h.reservation_id in inserted)
    deltas[(account, month)] -= lease_held
    if ask.need_nanousd > 0:
        resolve_stale(s, account, now, deltas)
    apply_deltas(s, deltas, touch=[(account, month)])
    committed = s.scalar(
        select(MonthSpend.committed_nanousd).where(MonthSpend.account == account, MonthSpend.month == month)
    )
    room = None if ask.limit_nanousd is None else ask.limit_nanousd - int(committed or 0)
    grant = 0
    if ask.need_nanousd > 0 and room is not None and room >= ask.need_nanousd:
        grant = min(ask.slice_nanousd, room)
        apply_deltas(s, {(account, month): grant})
    ask.granted_nanousd = grant
    ask.expires_at = now + dt.timedelta(seconds=ask.lease_ttl_s)
    if lease is None and grant > 0:
        lease = Lease(id=budget.lease_id, account=account, month=month, holder=HOLDER)
        s.add(lease)
    if lease is not None:
        lease.held_nanousd, lease.expires_at, lease.updated_at = grant, ask.expires_at, now
        lease.state = OPEN if grant > 0 else RETURNED


def top_up(s: Session, budget: Budget, now: dt.datetime) -> int:
    """Add up to a slice to the budget's open lease, as far as the limit allows (the same conditional check as
    a roll-over); the amount added. Nothing else changes: admissions go on from the lease meanwhile."""
    account, month = budget.account, budget.month
    lease = s.get(Lease, budget.lease_id, with_for_update=True)
    if lease is None or lease.state != OPEN or budget.limit_nanousd is None:
        return 0
    apply_deltas(s, {}, touch=[(account, month)])  # lock the month's total
    committed = s.scalar(
        select(MonthSpend.committed_nanousd).where(MonthSpend.account == account, MonthSpend.month == month)
    )
    extra = min(budget.slice_nanousd, budget.limit_nanousd - int(committed or 0))
    if extra > 0:
        apply_deltas(s, {(account, month): extra})
        lease.held_nanousd += extra
        lease.updated_at = now
    return max(extra, 0)
