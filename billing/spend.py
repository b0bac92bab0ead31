"""The spend book: reservations at admission, true costs at settlement, and the per-month admission gate.

Each account has one row per calendar month (UTC) holding what it has committed: settled costs plus the
estimates of open reservations. Admission is a single conditional UPDATE of that row
(`committed + estimate <= cap + allowance`), atomic on SQLite (write lock) and PostgreSQL (row lock,
re-checked after a concurrent update), so concurrent requests can never reserve past the cap together.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from billing.db import as_utc, read_session, utcnow, write_session
from billing.schema import MonthSpend, Reservation

OPEN, SETTLED, RELEASED, EXPIRED = "open", "settled", "released", "expired"


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
        reservation_ttl_s: float = 3600,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.engine = engine
        self.allowance_nanousd = allowance_nanousd
        self.reservation_ttl_s = reservation_ttl_s
        self.clock = clock or utcnow

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
    ) -> str | None:
        """Reserve `estimate_nanousd` in the month `started_at` falls in; None when it would pass the cap."""
        if estimate_nanousd < 0:
            raise ValueError("estimate_nanousd cannot be negative")
        month = month_of(started_at)
        now = self.clock()
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
            r.request_id, r.hardware_profile = request_id, hardware_profile
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
        cutoff = now - dt.timedelta(seconds=self.reservation_ttl_s)
        stale = s.scalars(
            select(Reservation)
            .where(Reservation.account == account, Reservation.state == OPEN, Reservation.created_at < cutoff)
            # PostgreSQL: lock them, so two admissions never expire the same one twice (SQLite is serial)
            .with_for_update(skip_locked=True)
        ).all()
        for r in stale:
            r.state = EXPIRED
            _add(s, r.account, r.month, -r.estimate_nanousd)

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
