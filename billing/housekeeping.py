"""Housekeeping of the spend book: what keeps billing's books equal to the metering ledger's charges.

- Dead leases: a lease `LEASE_RECLAIM_GRACE_S` past its expiry belonged to a process that died (or was cut off);
  its amount is given back to the month (billing/leases.py).
- Orphan charges: a charge of one of our accounts with no reservation row (its replica died before writing it) is
  adopted from the ledger (billing/adoption.py).
- Lost settlements: an open reservation past `settle_grace_s` whose charge is in the ledger is settled at that
  cost; one with no charge is expired after `reservation_ttl_s` (its estimate given back); an expired one whose
  charge arrives within `late_charge_window_s` is still settled.
- Pruning: finished reservations past the retention, and finished leases after a day.

It runs in a background thread of each process, started by admissions at most every `sweep_interval_s` /
`prune_interval_s`, never on the request path; `hfi billing sweep|prune` run it by hand.
"""

from __future__ import annotations

import abc
import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine, and_, func, inspect, or_, select
from sqlalchemy.orm import Session

from billing.adoption import adopt_orphan_charges
from billing.books import EXPIRED, FINISHED, LEDGER_CHARGES, OPEN, SETTLED, Deltas, apply_deltas, new_deltas
from billing.db import read_session, write_session
from billing.leases import LEASE_RECLAIM_GRACE_S, reclaim_dead_leases
from billing.schema import HousekeepingMark, Lease, Reservation
from core.utc import as_utc

if TYPE_CHECKING:
    from billing.config import BillingSettings

log = logging.getLogger(__name__)

PRUNED_BEFORE = "pruned_before"
_LOOKUP_CHUNK_IDS = 500  # far below SQLite's bound-parameter limit
SWEEP_BATCH_ROWS = 1000
PRUNE_BATCH_ROWS = 5000  # rows per delete transaction: a short write lock at a time
LEASE_RETENTION_S = 86400  # returned and reclaimed lease rows are pruned after a day


@dataclass(frozen=True)
class Housekeeping:
    """When the sweep settles lost settlements from the ledger, and when old reservations are pruned."""

    settle_grace_s: float = 60
    sweep_interval_s: float = 30
    late_charge_window_s: float = 86400
    retention_s: float = 70 * 86400
    prune_interval_s: float = 3600  # 0: never in the background
    background: bool = True  # False: only explicit sweep() / prune() calls (the CLI, tests)

    @classmethod
    def from_settings(cls, settings: BillingSettings) -> Housekeeping:
        """The housekeeping of `billing.*` settings."""
        return cls(
            settle_grace_s=settings.settle_grace_s,
            sweep_interval_s=settings.sweep_interval_s,
            late_charge_window_s=settings.late_charge_window_s,
            retention_s=settings.reservation_retention_days * 86400,
            prune_interval_s=settings.prune_interval_s,
        )


@dataclass
class SweepResult:
    """What one sweep changed."""

    settled_from_ledger: int = 0
    expired: int = 0
    adopted_from_ledger: int = 0
    leases_reclaimed: int = 0

    def add(self, other: SweepResult) -> None:
        """Count `other` in this one."""
        self.settled_from_ledger += other.settled_from_ledger
        self.expired += other.expired
        self.adopted_from_ledger += other.adopted_from_ledger
        self.leases_reclaimed += other.leases_reclaimed


class Housekeeper(abc.ABC):
    """The housekeeping half of SpendBook (its base class: SpendBook holds the state read here, sets up this
    half with `_init_housekeeping`, and provides `sweep`, which first writes what it holds in memory)."""

    engine: Engine
    clock: Callable[[], dt.datetime]
    reservation_ttl_s: float
    housekeeping: Housekeeping
    _closed: bool
    _stop: threading.Event

    def _init_housekeeping(self) -> None:
        self._ledger_present = False
        self._housekeeping_lock = threading.Lock()
        self._housekeeping_thread: threading.Thread | None = None
        self._next_sweep_at: dt.datetime | None = None  # None: due at the first admission
        self._next_prune_at: dt.datetime | None = None

    @abc.abstractmethod
    def sweep(self, now: dt.datetime | None = None) -> SweepResult:
        """Bring the books back to the ledger (SpendBook.sweep)."""

    def _resolve_stale(self, s: Session, account: str, now: dt.datetime, deltas: Deltas) -> SweepResult:
        """Resolve the account's open reservations past the TTL: settled from the ledger, or expired."""
        cutoff = now - dt.timedelta(seconds=self.reservation_ttl_s)
        stale = s.scalars(
            select(Reservation)
            .where(Reservation.account == account, Reservation.state == OPEN, Reservation.created_at < cutoff)
            .order_by(Reservation.id)
            # PostgreSQL: lock them, so two admissions never expire the same one twice (SQLite is serial)
            .with_for_update(skip_locked=True)
        ).all()
        return self._resolve(s, stale, now, deltas) if stale else SweepResult()

    def _resolve(
        self, s: Session, rows: Sequence[Reservation], now: dt.datetime, deltas: Deltas
    ) -> SweepResult:
        """Settle each open or expired reservation whose charge is in the ledger at that cost; expire the open
        ones past the TTL that have none. The rows must be locked by `s`; month changes go to `deltas`."""
        charges = self._ledger_charges(s, [r.request_id for r in rows if r.request_id])
        ttl_cutoff = now - dt.timedelta(seconds=self.reservation_ttl_s)
        out = SweepResult()
        for r in rows:
            charge = charges.get(r.request_id) if r.request_id else None
            if charge is not None and r.state in (OPEN, EXPIRED):
                cost_nanousd, profile = charge
                # An expired reservation no longer counts; a request that ran is still charged in full.
                held = r.estimate_nanousd if r.state == OPEN else 0
                r.state, r.cost_nanousd, r.settled_at = SETTLED, cost_nanousd, now
                r.hardware_profile = r.hardware_profile or profile
                deltas[(r.account, r.month)] += cost_nanousd - held
                out.settled_from_ledger += 1
            elif r.state == OPEN and as_utc(r.created_at) < ttl_cutoff:
                r.state = EXPIRED
                deltas[(r.account, r.month)] -= r.estimate_nanousd
                out.expired += 1
        return out

    def _ledger_charges(self, s: Session, request_ids: Sequence[str]) -> dict[str, tuple[int, str | None]]:
        """(cost, hardware profile) of the ids that have a charge in the metering ledger."""
        ids = list(dict.fromkeys(request_ids))
        if not ids:
            return {}
        conn = s.connection()
        if not self._ledger_present:
            # Before metering's first migration there is no ledger, hence no charge (and on PostgreSQL a query
            # of a missing table would abort the whole transaction).
            if not inspect(conn).has_table(LEDGER_CHARGES.name):
                return {}
            self._ledger_present = True
        t = LEDGER_CHARGES
        found: dict[str, tuple[int, str | None]] = {}
        for i in range(0, len(ids), _LOOKUP_CHUNK_IDS):
            stmt = select(t.c.request_id, t.c.cost_nanousd, t.c.hardware_profile).where(
                t.c.request_id.in_(ids[i : i + _LOOKUP_CHUNK_IDS])
            )
            found.update((rid, (int(cost), profile)) for rid, cost, profile in conn.execute(stmt))
        return found

    # --- housekeeping

    def _sweep_books(self, now: dt.datetime) -> SweepResult:
        """Dead leases given back, orphan ledger charges adopted, stale reservations resolved (see sweep)."""
        hk = self.housekeeping
        out = SweepResult(leases_reclaimed=self._reclaim_dead_leases(now))
        out.adopted_from_ledger = adopt_orphan_charges(
            self.engine, now, grace_s=hk.settle_grace_s, window_s=hk.late_charge_window_s
        )
        out.add(self._sweep_reservations(now))
        return out

    def _reclaim_dead_leases(self, now: dt.datetime) -> int:
        with read_session(self.engine) as s:
            cutoff = now - dt.timedelta(seconds=LEASE_RECLAIM_GRACE_S)
            dead = s.scalar(select(Lease.id).where(Lease.state == OPEN, Lease.expires_at < cutoff).limit(1))
        if dead is None:
            return 0
        with write_session(self.engine) as s:
            deltas = new_deltas()
            n = reclaim_dead_leases(s, now, deltas)
            apply_deltas(s, deltas)
        if n:
            log.info("billing: gave back %d lease(s) of processes that stopped", n)
        return n

    def _sweep_reservations(self, now: dt.datetime) -> SweepResult:
        hk = self.housekeeping
        open_cutoff = now - dt.timedelta(seconds=min(hk.settle_grace_s, self.reservation_ttl_s))
        ttl_cutoff = now - dt.timedelta(seconds=self.reservation_ttl_s)
        late_since = now - dt.timedelta(seconds=hk.late_charge_window_s)
        wanted = or_(
            and_(Reservation.state == OPEN, Reservation.created_at < open_cutoff),
            and_(
                Reservation.state == EXPIRED,
                Reservation.created_at >= late_since,
                Reservation.request_id.is_not(None),
            ),
        )
        out, after = SweepResult(), ""
        while True:
            with read_session(self.engine) as s:
                batch = s.execute(
                    select(Reservation.id, Reservation.request_id, Reservation.state, Reservation.created_at)
                    .where(wanted, Reservation.id > after)
                    .order_by(Reservation.id)
                    .limit(SWEEP_BATCH_ROWS)
                ).all()
                charged = self._ledger_charges(s, [b.request_id for b in batch if b.request_id])
            change = [
                b.id
                for b in batch
                if b.request_id in charged or (b.state == OPEN and as_utc(b.created_at) < ttl_cutoff)
            ]
            if change:
                with write_session(self.engine) as s:
                    rows = s.scalars(
                        select(Reservation)
                        .where(Reservation.id.in_(change))
                        .order_by(Reservation.id)
                        .with_for_update(skip_locked=True)
                    ).all()
                    deltas = new_deltas()
                    out.add(self._resolve(s, rows, now, deltas))
                    apply_deltas(s, deltas)
            if len(batch) < SWEEP_BATCH_ROWS:
                return out
            after = batch[-1].id

    def pruned_before(self) -> dt.datetime | None:
        """Finished reservations created before this instant may have been pruned (None: never pruned)."""
        with read_session(self.engine) as s:
            mark = s.get(HousekeepingMark, PRUNED_BEFORE)
            return as_utc(mark.at) if mark else None

    def prune(
        self, now: dt.datetime | None = None, *, batch_rows: int = PRUNE_BATCH_ROWS, dry_run: bool = False
    ) -> int:
        """Delete settled, released and expired reservations older than the retention, in short batches; the
        number deleted (with `dry_run`, the number that would be). Open reservations are never pruned; nor
        are open leases (returned and reclaimed ones go after a day, uncounted).

        Before the first row goes, `pruned_before` is moved to the cutoff, so readers know which months the
        reservations no longer hold whole (reports read those from the ledger; reconciliation refuses them).
        """
        now = as_utc(now or self.clock())
        cutoff = now - dt.timedelta(seconds=self.housekeeping.retention_s)
        old = and_(Reservation.state.in_(FINISHED), Reservation.created_at < cutoff)
        if dry_run:
            with read_session(self.engine) as s:
                return int(s.scalar(select(func.count()).select_from(Reservation).where(old)) or 0)
        self._prune_leases(now, batch_rows)
        with write_session(self.engine) as s:
            if s.scalar(select(Reservation.id).where(old).limit(1)) is None:
                return 0
            mark = s.get(HousekeepingMark, PRUNED_BEFORE, with_for_update=True)
            if mark is None:
                s.add(HousekeepingMark(name=PRUNED_BEFORE, at=cutoff))
            elif as_utc(mark.at) < cutoff:
                mark.at = cutoff
        return self._delete_in_batches(Reservation, old, batch_rows)

    def _prune_leases(self, now: dt.datetime, batch_rows: int) -> None:
        cutoff = now - dt.timedelta(seconds=LEASE_RETENTION_S)
        self._delete_in_batches(Lease, and_(Lease.state != OPEN, Lease.expires_at < cutoff), batch_rows)

    def _delete_in_batches(self, model: type[Reservation] | type[Lease], old: object, batch_rows: int) -> int:
        t, total = model.__table__, 0
        while not self._closed:
            with write_session(self.engine) as s:
                batch = select(model.id).where(old).limit(batch_rows)  # type: ignore[arg-type]
                deleted = s.execute(t.delete().where(t.c.id.in_(batch))).rowcount
            total += deleted
            if deleted < batch_rows:
                break
        return total

    def _start_housekeeping_if_due(self, now: dt.datetime) -> None:
        """Start the background sweep and/or prune when due (one thread per process at a time)."""
        hk = self.housekeeping
        sweep_due = self._next_sweep_at is None or now >= self._next_sweep_at
        prune_due = hk.prune_interval_s > 0 and (self._next_prune_at is None or now >= self._next_prune_at)
        if not hk.background or self._closed or self._stop.is_set() or not (sweep_due or prune_due):
            return
        if not self._housekeeping_lock.acquire(blocking=False):
            return  # another admission is starting it
        try:
            if self._housekeeping_thread is not None and self._housekeeping_thread.is_alive():
                return
            if sweep_due:
                self._next_sweep_at = now + dt.timedelta(seconds=hk.sweep_interval_s)
            if prune_due:
                self._next_prune_at = now + dt.timedelta(seconds=hk.prune_interval_s)
            self._housekeeping_thread = threading.Thread(
                target=self._housekeep, args=(sweep_due, prune_due), name="billing-housekeeping", daemon=True
            )
            self._housekeeping_thread.start()
        finally:
            self._housekeeping_lock.release()

    def _housekeep(self, sweep: bool, prune: bool) -> None:
        try:
            if sweep:
                done = self.sweep()
                if done.settled_from_ledger or done.expired or done.adopted_from_ledger:
                    log.info(
                        "billing: settled %d reservation(s) from the ledger, expired %d, adopted %d charge(s)",
                        done.settled_from_ledger,
                        done.expired,
                        done.adopted_from_ledger,
                    )
            if prune:
                pruned = self.prune()
                if pruned:
                    log.info("billing: pruned %d old reservation(s)", pruned)
        except Exception:  # the next admission after the interval tries again; admission is unaffected
            log.warning("billing: housekeeping failed", exc_info=True)

    def wait_for_housekeeping(self, timeout_s: float | None = None) -> None:
        """Wait for a running background sweep or prune to finish."""
        thread = self._housekeeping_thread
        if thread is not None:
            thread.join(timeout_s)
