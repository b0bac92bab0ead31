"""The spend book: reservations at admission, true costs at settlement, and the per-month admission gate.

Each account has one row per calendar month (UTC) holding what it has committed: settled costs plus the
estimates of open reservations. Admission is a single conditional UPDATE of that row
(`committed + estimate <= cap + allowance`), atomic on SQLite (write lock) and PostgreSQL (row lock,
re-checked after a concurrent update), so concurrent requests can never reserve past the cap together.

The metering ledger (`metering_charges`, same database, keyed by the request's Inference-Id) is the truth of
what ran. A reservation carries that id from admission on, so when its settlement never arrives (a client cut
off mid-way, a crash) housekeeping settles it from the ledger's charge; only a reservation with no charge is
expired, its estimate given back. Housekeeping also prunes old finished reservations. It runs in a background
thread started by `reserve()` at most every `sweep_interval_s` / `prune_interval_s`, never on the request path.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, Engine, String, and_, column, func, inspect, or_, select, table, update
from sqlalchemy.orm import Session

from billing.db import as_utc, read_session, utcnow, write_session
from billing.schema import HousekeepingMark, MonthSpend, Reservation

if TYPE_CHECKING:
    from billing.config import BillingSettings

log = logging.getLogger(__name__)

OPEN, SETTLED, RELEASED, EXPIRED = "open", "settled", "released", "expired"
FINISHED = (SETTLED, RELEASED, EXPIRED)
PRUNED_BEFORE = "pruned_before"
# The columns of metering's ledger that billing reads: plain SQL, no import of metering's code.
LEDGER_CHARGES = table(
    "metering_charges",
    column("request_id", String),
    column("cost_nanousd", BigInteger),
    column("hardware_profile", String),
)
_LOOKUP_CHUNK_IDS = 500  # far below SQLite's bound-parameter limit
SWEEP_BATCH_ROWS = 1000
PRUNE_BATCH_ROWS = 5000  # rows per delete transaction: a short write lock at a time


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

    def add(self, other: SweepResult) -> None:
        """Count `other` in this one."""
        self.settled_from_ledger += other.settled_from_ledger
        self.expired += other.expired


def month_of(when: dt.datetime) -> str:
    """The calendar month (UTC) a request started in, as YYYY-MM: the month it is charged in."""
    return as_utc(when).strftime("%Y-%m")


def _insert_ignore(session: Session, account: str, month: str) -> None:
    table = MonthSpend.__table__
    values = {"account": account, "month": month, "committed_nanousd": 0}
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(table).values(**values).on_conflict_do_nothing())


def _add(session: Session, account: str, month: str, delta_nanousd: int) -> None:
    table = MonthSpend.__table__
    session.execute(
        update(table)
        .where(table.c.account == account, table.c.month == month)
        .values(committed_nanousd=table.c.committed_nanousd + delta_nanousd)
    )


class SpendBook:
    """Reserve, settle and release; every operation is one short transaction."""

    def __init__(
        self,
        engine: Engine,
        *,
        allowance_nanousd: int = 0,
        reservation_ttl_s: float = 600,
        housekeeping: Housekeeping | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.engine = engine
        self.allowance_nanousd = allowance_nanousd
        self.reservation_ttl_s = reservation_ttl_s
        self.housekeeping = housekeeping or Housekeeping()
        self.clock = clock or utcnow
        self._ledger_present = False
        self._housekeeping_lock = threading.Lock()
        self._housekeeping_thread: threading.Thread | None = None
        self._next_sweep_at: dt.datetime | None = None  # None: due at the first admission
        self._next_prune_at: dt.datetime | None = None
        self._closed = False

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
        """Reserve `estimate_nanousd` in the month `started_at` falls in; None when it would pass the cap.

        `request_id` is the request's key in the metering ledger (its Inference-Id): with it, a reservation
        whose settlement is lost is settled from the ledger's charge instead of expiring.
        """
        if estimate_nanousd < 0:
            raise ValueError("estimate_nanousd cannot be negative")
        month = month_of(started_at)
        now = self.clock()
        self._start_housekeeping_if_due(now)
        table = MonthSpend.__table__
        with write_session(self.engine) as s:
            self._expire(s, account, now)
            _insert_ignore(s, account, month)
            stmt = update(table).where(table.c.account == account, table.c.month == month)
            if cap_nanousd is not None:
                stmt = stmt.where(
                    table.c.committed_nanousd + estimate_nanousd <= cap_nanousd + self.allowance_nanousd
                )
            result = s.execute(stmt.values(committed_nanousd=table.c.committed_nanousd + estimate_nanousd))
            if result.rowcount != 1:
                return None
            reservation_id = secrets.token_hex(16)
            s.add(
                Reservation(
                    id=reservation_id,
                    account=account,
                    user=user,
                    kind=kind,
                    model_id=model_id,
                    month=month,
                    started_at=as_utc(started_at),
                    created_at=now,
                    estimate_nanousd=estimate_nanousd,
                    state=OPEN,
                    request_id=request_id,
                )
            )
        return reservation_id

    def settle(
        self,
        reservation_id: str,
        cost_nanousd: int,
        *,
        request_id: str | None = None,
        hardware_profile: str | None = None,
    ) -> bool:
        """Charge the true cost in place of the estimate; False when already settled or released."""
        if not isinstance(cost_nanousd, int) or cost_nanousd < 0:
            raise ValueError("cost_nanousd must be a whole number of nano-USD, 0 or more")
        with write_session(self.engine) as s:
            r = s.scalars(
                select(Reservation).where(Reservation.id == reservation_id).with_for_update()
            ).first()
            if r is None or r.state not in (OPEN, EXPIRED):
                return False
            # An expired reservation no longer counts; a request that ran is still charged in full.
            held = r.estimate_nanousd if r.state == OPEN else 0
            r.state, r.cost_nanousd, r.settled_at = SETTLED, cost_nanousd, self.clock()
            r.request_id = request_id or r.request_id
            r.hardware_profile = hardware_profile or r.hardware_profile
            _add(s, r.account, r.month, cost_nanousd - held)
        return True

    def release(self, reservation_id: str) -> bool:
        """Give back an open reservation whole (the request failed); False if not open."""
        with write_session(self.engine) as s:
            r = s.scalars(
                select(Reservation).where(Reservation.id == reservation_id).with_for_update()
            ).first()
            if r is None or r.state != OPEN:
                return False
            r.state, r.settled_at = RELEASED, self.clock()
            _add(s, r.account, r.month, -r.estimate_nanousd)
        return True

    def _expire(self, s: Session, account: str, now: dt.datetime) -> None:
        """Resolve the account's open reservations past the TTL: settled from the ledger, or expired."""
        cutoff = now - dt.timedelta(seconds=self.reservation_ttl_s)
        stale = s.scalars(
            select(Reservation)
            .where(Reservation.account == account, Reservation.state == OPEN, Reservation.created_at < cutoff)
            # PostgreSQL: lock them, so two admissions never expire the same one twice (SQLite is serial)
            .with_for_update(skip_locked=True)
        ).all()
        if stale:
            self._resolve(s, stale, now)

    def _resolve(self, s: Session, rows: Sequence[Reservation], now: dt.datetime) -> SweepResult:
        """Settle each open or expired reservation whose charge is in the ledger at that cost; expire the open
        ones past the TTL that have none. The rows must be locked by `s`."""
        charges = self._ledger_charges(s, [r.request_id for r in rows if r.request_id])
        ttl_cutoff = now - dt.timedelta(seconds=self.reservation_ttl_s)
        deltas: dict[tuple[str, str], int] = defaultdict(int)
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
        for (account, month), delta in sorted(deltas.items()):  # one lock order: no deadlock between sweeps
            if delta:
                _add(s, account, month, delta)
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

    def sweep(self, now: dt.datetime | None = None) -> SweepResult:
        """Settle from the ledger every open reservation older than the grace (and every recently expired one)
        whose charge is there; expire the open ones past the TTL that have none.

        Candidates are found in a read transaction; only those that change are locked and written, so a sweep
        with nothing to do takes no write lock.
        """
        now = as_utc(now or self.clock())
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
                    out.add(self._resolve(s, rows, now))
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
        number deleted (with `dry_run`, the number that would be). Open reservations are never pruned.

        Before the first row goes, `pruned_before` is moved to the cutoff, so readers know which months the
        reservations no longer hold whole (reports read those from the ledger; reconciliation refuses them).
        """
        cutoff = as_utc(now or self.clock()) - dt.timedelta(seconds=self.housekeeping.retention_s)
        old = and_(Reservation.state.in_(FINISHED), Reservation.created_at < cutoff)
        if dry_run:
            with read_session(self.engine) as s:
                return int(s.scalar(select(func.count()).select_from(Reservation).where(old)) or 0)
        with write_session(self.engine) as s:
            if s.scalar(select(Reservation.id).where(old).limit(1)) is None:
                return 0
            mark = s.get(HousekeepingMark, PRUNED_BEFORE, with_for_update=True)
            if mark is None:
                s.add(HousekeepingMark(name=PRUNED_BEFORE, at=cutoff))
            elif as_utc(mark.at) < cutoff:
                mark.at = cutoff
        t, total = Reservation.__table__, 0
        while not self._closed:
            with write_session(self.engine) as s:
                batch = select(Reservation.id).where(old).limit(batch_rows)
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
        if not hk.background or self._closed or not (sweep_due or prune_due):
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
                if done.settled_from_ledger or done.expired:
                    log.info(
                        "billing: settled %d reservation(s) from the ledger, expired %d",
                        done.settled_from_ledger,
                        done.expired,
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

    def close(self) -> None:
        """Stop starting housekeeping; let a running one finish its current transaction."""
        self._closed = True
        self.wait_for_housekeeping(30)

    def committed_nanousd(self, account: str, month: str) -> int:
        """Settled costs plus open reservations of `account` in `month`."""
        with read_session(self.engine) as s:
            row = s.get(MonthSpend, (account, month))
            return int(row.committed_nanousd) if row else 0

    def state(self, reservation_id: str) -> str | None:
        """A reservation's state (open, settled, released, expired), or None."""
        with read_session(self.engine) as s:
            r = s.get(Reservation, reservation_id)
            return r.state if r else None
