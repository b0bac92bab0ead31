"""The spend book: admission against the month's cap, settlement of true costs, and the housekeeping that keeps
the books equal to the metering ledger.

Each account has one row per calendar month (UTC) holding what it has committed:

    committed = settled costs + estimates of open reservation rows + what open leases hold

(a lease's amount keeps the estimates of the requests it admitted until it rolls over, those that have settled
too: between roll-overs `committed` may count a settled request twice, never too little).

**Admission without a database round trip.** A process admits an account's requests from a *lease* on that
month (billing/leases.py): a slice of `lease_slice_estimates` estimates (or what is left, if less but at least
the one estimate asked for) taken by one conditional UPDATE, `committed + slice <= cap + allowance`, atomic on
SQLite (write lock) and PostgreSQL (row lock). Each admission then takes its estimate from the slice in memory.
When the lease expires (`lease_ttl_s`) or cannot cover the next estimate, it rolls over in one transaction:
requests still running become open reservation rows (their estimates move from the lease to the rows), the rest
is given back, and a new slice is taken. A lease running low (under half a slice) is topped up by the same
conditional UPDATE in the background, so admissions seldom wait for a roll-over. An account without a cap
(pay-as-you-go with no limit) needs no lease: its admissions never touch the database.

**The bound.** Every estimate admitted is covered by a lease's amount or an open row's, each counted in
`committed`, and a slice is only taken while `committed + slice <= cap + allowance`; a settled cost replaces
its estimate (within a lease, what is left of the estimate goes back to the lease, and an excess is taken from
it as far as it goes). So at any moment, over all replicas together:

    settled costs + estimates of running requests <= cap + overshoot_allowance_nanousd

as long as each true cost is within its estimate (a request that ran is always charged in full; any excess
over its estimate adds to it, as before leases). Leasing adds nothing to this bound: the slices leased at once
are inside it. What it costs is earliness: a replica whose lease is spent may refuse (402) while other replicas
still hold unspent slices, at most (replicas - 1) x the slice, and for at most `lease_ttl_s`, after which they
are given back. Two more ways past the bound, as with per-request reservations: an open row expires after
`reservation_ttl_s` (a request still running then no longer holds its estimate), and a lease its holder could
not return within `LEASE_RECLAIM_GRACE_S` of its expiry (a replica cut off from the database, not dead) is given
back by another replica; the running requests it covered get their rows when the holder reconnects.

**Written behind the response.** A request that ends within its lease costs no write on its path: its
reservation row is inserted settled, with its cost added to the month, by a background thread every
`settle_flush_interval_s` (or sooner, past FLUSH_BATCH_OPS queued), many per transaction (billing/writer.py).
A failed request's estimate goes back to the lease in memory (no row at all). A roll-over writes what is queued
first, so the month's total never misses a cost this process knows.

**A process that dies** leaves its lease open in the database: any other process gives its amount back once it
is `LEASE_RECLAIM_GRACE_S` past expiry (at its next roll-over for that account, or in the sweep), so a crash
locks the budget for at most `lease_ttl_s` + that grace. Its queued settlements are lost with it, but not the
charges: the metering spool made them durable before each response, and the sweep adopts every ledger charge of
one of our accounts that has no reservation row (billing/adoption.py). Its running requests that had become rows
are settled from the ledger by request id (or expired), as before. So admission's totals still come from the
ledger's charges plus what is still reserved.

**Housekeeping** (billing/housekeeping.py; a background thread started by admissions at most every
`sweep_interval_s` / `prune_interval_s`, never on the request path): reclaim dead leases, adopt orphan charges,
settle stale open reservations from the ledger's charges (the metering ledger, same database, keyed by the
request's Inference-Id) or expire those with none after `reservation_ttl_s`, prune old finished reservations.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from billing.books import EXPIRED, FINISHED, OPEN, RELEASED, SETTLED, month_of
from billing.db import read_session, write_session
from billing.housekeeping import PRUNE_BATCH_ROWS, PRUNED_BEFORE, Housekeeper, Housekeeping, SweepResult
from billing.leases import RECLAIMED, RETURNED, Budget, Held, Rollover, roll_over, top_up
from billing.schema import MonthSpend, Reservation
from billing.writer import Op, ReleaseOpen, SettledRow, SettleOpen, write_batch
from core.utc import as_utc, utcnow

if TYPE_CHECKING:
    from billing.config import BillingSettings

log = logging.getLogger(__name__)

__all__ = [
    "EXPIRED",
    "FINISHED",
    "OPEN",
    "PRUNED_BEFORE",
    "PRUNE_BATCH_ROWS",
    "RECLAIMED",
    "RELEASED",
    "RETURNED",
    "SETTLED",
    "Housekeeping",
    "Leasing",
    "SpendBook",
    "SweepResult",
    "month_of",
]

FLUSH_BATCH_OPS = 500  # queued settlements that wake the writer early; also its transaction size


@dataclass(frozen=True)
class Leasing:
    """How budgets are leased and settlements written behind the response."""

    lease_ttl_s: float = 5
    slice_estimates: int = 10
    flush_interval_s: float = 0.5

    @classmethod
    def from_settings(cls, settings: BillingSettings) -> Leasing:
        """The leasing of `billing.*` settings."""
        return cls(
            lease_ttl_s=settings.lease_ttl_s,
            slice_estimates=settings.lease_slice_estimates,
            flush_interval_s=settings.settle_flush_interval_s,
        )


class SpendBook(Housekeeper):
    """Admission from in-memory leases, settlements written in batches, housekeeping in the background."""

    def __init__(
        self,
        engine: Engine,
        *,
        allowance_nanousd: int = 0,
        reservation_ttl_s: float = 600,
        housekeeping: Housekeeping | None = None,
        leasing: Leasing | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.engine = engine
        self.allowance_nanousd = allowance_nanousd
        self.reservation_ttl_s = reservation_ttl_s
        self.housekeeping = housekeeping or Housekeeping()
        self.leasing = leasing or Leasing()
        self.clock = clock or utcnow
        self._closed = False
        self._init_housekeeping()
        # The in-memory side: budgets by (account, month), the requests they hold by reservation id, the queue.
        self._lock = threading.Lock()  # held for dictionary work only, never across database I/O
        self._budgets: dict[tuple[str, str], Budget] = {}
        self._held: dict[str, tuple[Held, Budget]] = {}
        self._id_prefix, self._next_id = secrets.token_hex(8), 0
        self._queue: list[Op] = []
        self._flush_lock = threading.Lock()  # one batch write at a time, in queue order
        self._writer: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()

    # --- admission

    def reserve(
        self,
        *,
        account: str,
        cap_nanousd: int | None,
        user: str,
        kind: str,
        model_id: str,
        started_at: dt.datetime,
        estimate_nanousd: int,
        request_id: str | None = None,
    ) -> str | None:
        """Hold `estimate_nanousd` in the month `started_at` falls in; its reservation id, or None when it would
        pass the cap. In memory, except when the account's lease must roll over (see the module's docstring).

        `request_id` is the request's key in the metering ledger (its Inference-Id): with it, a reservation
        whose settlement is lost is settled from the ledger's charge instead of expiring.
        """
        now = self.clock()
        self._start_housekeeping_if_due(now)
        held = self._new_held(
            account, cap_nanousd, user, kind, model_id, started_at, estimate_nanousd, request_id
        )
        if self._hold_in_memory(held, cap_nanousd is None, now):
            return held.reservation_id
        ask = Rollover(
            need_nanousd=estimate_nanousd,
            limit_nanousd=int(cap_nanousd or 0) + self.allowance_nanousd,
            slice_nanousd=estimate_nanousd * self.leasing.slice_estimates,
            lease_ttl_s=self.leasing.lease_ttl_s,
        )
        while True:
            budget = self._budget(account, held.month)
            with budget.roll_lock:
                if self._budgets.get((account, held.month)) is not budget:
                    continue  # dropped as idle meanwhile: use the new one
                if self._hold_in_memory(held, False, now):  # another admission rolled it over meanwhile
                    return held.reservation_id
                self._roll(budget, now, ask, held)
            return held.reservation_id if ask.granted_nanousd > 0 else None

    def reserve_in_memory(
        self,
        *,
        account: str,
        cap_nanousd: int | None,
        user: str,
        kind: str,
        model_id: str,
        started_at: dt.datetime,
        estimate_nanousd: int,
        request_id: str | None = None,
    ) -> str | None:
        """`reserve` when it needs no database: the reservation id, or None when the account's lease must roll
        over first (then call `reserve`, which may wait on the database)."""
        held = self._new_held(
            account, cap_nanousd, user, kind, model_id, started_at, estimate_nanousd, request_id
        )
        now = self.clock()
        if not self._hold_in_memory(held, cap_nanousd is None, now):
            return None
        self._start_housekeeping_if_due(now)
        return held.reservation_id

    def _new_held(
        self,
        account: str,
        cap_nanousd: int | None,
        user: str,
        kind: str,
        model_id: str,
        started_at: dt.datetime,
        estimate_nanousd: int,
        request_id: str | None,
    ) -> Held:
        if estimate_nanousd < 0:
            raise ValueError("estimate_nanousd cannot be negative")
        self._start_writer()
        with self._lock:
            self._next_id += 1
            reservation_id = f"{self._id_prefix}{self._next_id:016x}"  # unique: a random prefix per book
        return Held(
            reservation_id=reservation_id,
            account=account,
            user=user,
            kind=kind,
            model_id=model_id,
            month=month_of(started_at),
            started_at=as_utc(started_at),
            admitted_at=self.clock(),
            estimate_nanousd=estimate_nanousd,
            request_id=request_id,
            covered=cap_nanousd is not None,
        )

    def _budget(self, account: str, month: str) -> Budget:
        with self._lock:
            budget = self._budgets.get((account, month))
            if budget is None:
                budget = self._budgets[(account, month)] = Budget(account, month)
            return budget

    def _hold_in_memory(self, held: Held, uncapped: bool, now: dt.datetime) -> bool:
        """Admit `held` without the database when its budget can cover it (or it has no cap)."""
        with self._lock:
            budget = self._budgets.get((held.account, held.month))
            if budget is None:
                if not uncapped:
                    return False
                budget = self._budgets[(held.account, held.month)] = Budget(held.account, held.month)
            if uncapped:
                if budget.expires_at is None:  # its running requests get rows after a lease's time
                    budget.expires_at = now + dt.timedelta(seconds=self.leasing.lease_ttl_s)
            elif budget.can_cover(held.estimate_nanousd, now):
                budget.unspent_nanousd -= held.estimate_nanousd
                # Running low: the writer adds a slice before an admission has to wait for one.
                if budget.wants_top_up(held.estimate_nanousd, now):
                    budget.top_up_wanted = True
                    self._wake.set()
            else:
                return False
            budget.running[held.reservation_id] = held
            self._held[held.reservation_id] = (held, budget)
            return True

    def _roll(self, budget: Budget, now: dt.datetime, ask: Rollover, held: Held | None = None) -> None:
        """Roll `budget` over (its roll_lock held): running requests to rows, the lease given back, and a new
        slice when `ask` needs one; `held` is admitted from it when granted."""
        with self._lock:
            converting = budget.converting = budget.running
            budget.running = {}
            unspent, budget.unspent_nanousd = budget.unspent_nanousd, 0
        try:
            self._write_queued()  # every cost this process knows is in the month's total before the lease is redone
            with write_session(self.engine) as s:
                roll_over(s, budget, list(converting.values()), ask, now, self._resolve_stale)
        except BaseException:
            with self._lock:
                budget.converting = None
                budget.unspent_nanousd = unspent
                for h in converting.values():
                    if h.outcome is None:
                        budget.running[h.reservation_id] = h
                    else:  # it ended meanwhile, still within the lease
                        del self._held[h.reservation_id]
                        self._end_in_memory(h, budget, h.outcome)
            raise
        with self._lock:
            budget.converting = None
            budget.held_db_nanousd = budget.unspent_nanousd = ask.granted_nanousd
            budget.expires_at = ask.expires_at
            budget.limit_nanousd, budget.slice_nanousd = ask.limit_nanousd, ask.slice_nanousd
            budget.topped_out = False
            for h in converting.values():  # now rows: their ends are row updates
                del self._held[h.reservation_id]
                if h.outcome is not None:
                    self._queue.append(self._row_op(h.reservation_id, h.outcome))
            if held is not None and ask.granted_nanousd > 0:
                budget.unspent_nanousd -= held.estimate_nanousd
                budget.running[held.reservation_id] = held
                self._held[held.reservation_id] = (held, budget)

    # --- settlement

    def settle(
        self,
        reservation_id: str,
        cost_nanousd: int,
        *,
        request_id: str | None = None,
        hardware_profile: str | None = None,
    ) -> None:
        """Charge the true cost in place of the estimate, written behind (a no-op once settled or released)."""
        if not isinstance(cost_nanousd, int) or cost_nanousd < 0:
            raise ValueError("cost_nanousd must be a whole number of nano-USD, 0 or more")
        self._end(reservation_id, ("settle", cost_nanousd, request_id, hardware_profile))

    def release(self, reservation_id: str) -> None:
        """Give back the estimate of a request that failed (nothing charged); a no-op if not held."""
        self._end(reservation_id, ("release",))

    def _end(self, reservation_id: str, outcome: tuple) -> None:
        with self._lock:
            entry = self._held.get(reservation_id)
            if entry is None:  # a row already (or another process's, or unknown): update it
                self._queue.append(self._row_op(reservation_id, outcome))
            else:
                held, budget = entry
                if budget.converting is not None and reservation_id in budget.converting:
                    held.outcome = held.outcome or outcome  # applied once its row is written
                    return
                del self._held[reservation_id]
                budget.running.pop(reservation_id, None)
                self._end_in_memory(held, budget, outcome)
            queued = len(self._queue)
        if self._closed:
            self._flush_quietly()
        elif queued >= FLUSH_BATCH_OPS:
            self._wake.set()

    def _end_in_memory(self, held: Held, budget: Budget, outcome: tuple) -> None:
        """A request that ends within its lease (self._lock held): settled row queued, or estimate back."""
        if outcome[0] == "release":
            if held.covered:
                budget.unspent_nanousd += held.estimate_nanousd  # still inside the lease's amount
            return
        _, cost_nanousd, request_id, profile = outcome
        if held.covered:
            # The lease pays the true cost in place of the estimate: what is left comes back to it, an excess
            # over the estimate is taken from it as far as it goes (past that, it is excess over the bound).
            budget.unspent_nanousd = max(0, budget.unspent_nanousd + held.estimate_nanousd - cost_nanousd)
        row = held.row(
            SETTLED,
            budget.lease_id,
            request_id=request_id,
            cost_nanousd=cost_nanousd,
            settled_at=self.clock(),
            hardware_profile=profile,
        )
        self._queue.append(SettledRow(row))

    @staticmethod
    def _row_op(reservation_id: str, outcome: tuple) -> Op:
        if outcome[0] == "release":
            return ReleaseOpen(reservation_id)
        _, cost_nanousd, request_id, profile = outcome
        return SettleOpen(reservation_id, cost_nanousd, request_id, profile)

    # --- the writer

    def flush(self) -> None:
        """Write what this process knows, now: its leases past expiry given back (their running requests as
        open rows) and every queued settlement (what the background writer does every flush interval)."""
        self._return_expired(self.clock())
        self._write_queued()

    def _write_queued(self) -> None:
        """Write every queued settlement now, in batches (raises what the database raises; nothing is lost:
        what was not written stays queued, in order)."""
        with self._flush_lock:
            with self._lock:
                ops, self._queue = self._queue, []
            done = 0
            try:
                while done < len(ops):
                    chunk = ops[done : done + FLUSH_BATCH_OPS]
                    self._write(chunk)
                    done += len(chunk)
            except BaseException:
                with self._lock:
                    self._queue[:0] = ops[done:]
                raise

    def _write(self, ops: list[Op]) -> None:
        now = self.clock()
        try:
            with write_session(self.engine) as s:
                write_batch(s, ops, now)
        except IntegrityError:
            # One write the database refuses for good must not hold the others back: one at a time, and drop
            # (log) only the refused one. Its charge is in the ledger; the sweep adopts it there.
            for op in ops:
                try:
                    with write_session(self.engine) as s:
                        write_batch(s, [op], now)
                except IntegrityError:
                    log.exception("billing: dropped a settlement the database refuses: %r", op)

    def _flush_quietly(self) -> None:
        try:
            self._write_queued()
        except Exception:
            log.warning("billing: could not write settlements (kept queued)", exc_info=True)

    def _start_writer(self) -> None:
        if self._writer is not None or self._closed:
            return
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="billing-writer", daemon=True)
                self._writer.start()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.leasing.flush_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._top_up_wanted(self.clock())
                self.flush()
            except Exception:  # the database is away: everything stays queued for the next round
                log.warning("billing: background write failed, retrying", exc_info=True)

    def _return_expired(self, now: dt.datetime, *, everything: bool = False) -> None:
        """Roll over the budgets past their lease (all of them with `everything`): running requests to rows,
        unspent amounts back; forget the idle ones."""
        with self._lock:
            budgets = list(self._budgets.values())
        nothing = Rollover(
            need_nanousd=0, limit_nanousd=None, slice_nanousd=0, lease_ttl_s=self.leasing.lease_ttl_s
        )
        for budget in budgets:
            if not (everything or budget.expired(now)):
                continue
            with budget.roll_lock:  # after an admission's roll-over under way, if any: then it may not be due
                if not (everything or budget.expired(now)):
                    continue
                if not budget.idle():
                    self._roll(budget, now, nothing)
                with self._lock:
                    if budget.idle() and self._budgets.get((budget.account, budget.month)) is budget:
                        del self._budgets[(budget.account, budget.month)]

    def _top_up_wanted(self, now: dt.datetime) -> None:
        """Top up the leases that asked for it (see Budget.wants_top_up), unless a roll-over is under way."""
        with self._lock:
            wanted = [b for b in self._budgets.values() if b.top_up_wanted]
        for budget in wanted:
            if not budget.roll_lock.acquire(blocking=False):
                budget.top_up_wanted = False  # an admission is rolling it over: a fresh slice comes with it
                continue
            try:
                if budget.converting is not None or budget.expired(now) or budget.held_db_nanousd == 0:
                    continue  # rolled over (or expiring) meanwhile: nothing to add to
                with write_session(self.engine) as s:
                    extra = top_up(s, budget, now)
                with self._lock:
                    budget.unspent_nanousd += extra
                    budget.held_db_nanousd += extra
                    budget.topped_out = extra <= 0
            finally:
                budget.top_up_wanted = False
                budget.roll_lock.release()

    def return_leases(self) -> None:
        """Give back every lease of this process now and write everything queued (what close() does): running
        requests become open rows, settled or released later."""
        self._return_expired(self.clock(), everything=True)
        self._write_queued()

    # --- reading

    def committed_nanousd(self, account: str, month: str) -> int:
        """Settled costs plus estimates in flight of `account` in `month`, as this process sees them: its queue
        written first, its own leases counted at what they hold for running requests (another replica's
        unspent lease still counts until it is returned)."""
        self.flush()
        with read_session(self.engine) as s:
            row = s.get(MonthSpend, (account, month))
            total = int(row.committed_nanousd) if row else 0
        with self._lock:
            budget = self._budgets.get((account, month))
            if budget is not None:
                running = list(budget.running.values())
                total += sum(h.estimate_nanousd for h in running) - budget.held_db_nanousd
        return total

    def state(self, reservation_id: str) -> str | None:
        """A reservation's state (open, settled, released, expired), or None."""
        with self._lock:
            if reservation_id in self._held:
                return OPEN
        self.flush()
        with read_session(self.engine) as s:
            r = s.get(Reservation, reservation_id)
            return r.state if r else None

    def sweep(self, now: dt.datetime | None = None) -> SweepResult:
        """Bring the books back to the ledger: this process's expired leases returned and its queue written;
        dead leases of other processes given back; ledger charges with no reservation adopted; every open
        reservation older than the grace (and every recently expired one) whose charge is there settled from it;
        the open ones past the TTL that have none expired.

        Candidates are found in read transactions; only what changes is locked and written, so a sweep with
        nothing to do takes no write lock.
        """
        now = as_utc(now or self.clock())
        self._return_expired(now)
        self._write_queued()
        return self._sweep_books(now)

    def close(self) -> None:
        """Give back this process's leases and write every queued settlement (best effort: a database that
        cannot be reached now leaves the leases to expire and the charges to the sweep), then stop."""
        self._stop.set()
        self._wake.set()
        if self._writer is not None:
            self._writer.join(30)
        try:
            self.return_leases()
        except Exception:
            log.warning("billing: could not return leases or write settlements at close", exc_info=True)
        self._closed = True
        self.wait_for_housekeeping(30)
