"""Charges in the metering ledger that billing never heard of are adopted into the books, once.

A replica writes its reservation rows and settlements behind the response, in batches; one killed before a batch
was written leaves charges in the ledger (its spool is fsync'd before the response) with no row in billing. The
sweep walks the ledger in id order from a mark (`billing_housekeeping.ledger_adopted_through`) and, for each
charge billed to one of our accounts that has no reservation once it is `settle_grace_s` old, inserts it settled
at its cost and adds the cost to its month. A row written later for the same request (a replica that was only
slow) is skipped: request ids are unique. So the month's total keeps counting every charge that reached the
ledger, as the lost-settlement sweep does for reservations that have a row.
"""

from __future__ import annotations

import datetime as dt
import secrets

from sqlalchemy import Engine, inspect, select, union
from sqlalchemy.orm import Session

from billing.books import (
    LEDGER_CHARGES,
    SETTLED,
    apply_deltas,
    dialect_insert,
    insert_reservations,
    month_of,
    new_deltas,
)
from billing.books import reservation_row as make_row
from billing.db import read_session, write_session
from billing.schema import HousekeepingMark, Org, Reservation, User
from core.utc import as_utc

ADOPTED_THROUGH = "ledger_adopted_through"
ADOPT_BATCH_ROWS = 1000
_REQUEST_ID_CHARS = 64  # billing's column; a longer id is not one of our requests'


def _naive_utc(when: dt.datetime) -> dt.datetime:
    return as_utc(when).replace(tzinfo=None)  # how metering stores its times (portable naive UTC)


def _start_mark(s: Session, now: dt.datetime, window_s: float) -> int:
    """Where a first walk starts: the last charge that started before the late-charge window (older ones were
    admitted by the per-request reservations of earlier versions, or are past settling anyway)."""
    t = LEDGER_CHARGES
    cutoff = _naive_utc(now - dt.timedelta(seconds=window_s))
    last = s.scalar(select(t.c.id).where(t.c.started_at < cutoff).order_by(t.c.started_at.desc()).limit(1))
    return int(last or 0)


def _known_accounts(s: Session, names: set[str]) -> set[str]:
    if not names:
        return set()
    found = union(select(User.name).where(User.name.in_(names)), select(Org.name).where(Org.name.in_(names)))
    return set(s.scalars(found))


def _adoptable(s: Session, after_id: int, batch_rows: int) -> tuple[list, set[str]]:
    """The next charges after `after_id` with their reservation id (None: no row), and which of their accounts
    are ours."""
    t, r = LEDGER_CHARGES, Reservation
    batch = s.execute(
        select(
            t.c.id,
            t.c.request_id,
            t.c.billed_account,
            t.c.user,
            t.c.model_id,
            t.c.started_at,
            t.c.recorded_at,
            t.c.cost_nanousd,
            t.c.hardware_profile,
            r.id.label("reservation_id"),
        )
        .select_from(t.outerjoin(r, r.request_id == t.c.request_id))
        .where(t.c.id > after_id)
        .order_by(t.c.id)
        .limit(batch_rows)
    ).all()
    accounts = {b.billed_account for b in batch if b.reservation_id is None}
    return batch, _known_accounts(s, accounts)


def _adopt(engine: Engine, charges: list, through_id: int, now: dt.datetime) -> int:
    """Insert `charges` settled, add their costs, move the mark to `through_id`; how many were inserted."""
    rows = [
        make_row(
            reservation_id=secrets.token_hex(16),
            account=c.billed_account,
            user=c.user,
            kind="local",
            model_id=c.model_id,
            month=month_of(as_utc(c.started_at)),
            started_at=as_utc(c.started_at),
            created_at=as_utc(c.started_at),
            estimate_nanousd=0,
            state=SETTLED,
            request_id=c.request_id,
            cost_nanousd=int(c.cost_nanousd),
            settled_at=now,
            hardware_profile=c.hardware_profile,
        )
        for c in charges
    ]
    with write_session(engine) as s:
        inserted = insert_reservations(s, rows)
        deltas = new_deltas()
        for row in rows:
            if row["id"] in inserted:
                deltas[(row["account"], row["month"])] += row["cost_nanousd"]
        apply_deltas(s, deltas)
        insert = dialect_insert(s)
        s.execute(
            insert(HousekeepingMark.__table__)
            .values(name=ADOPTED_THROUGH, at=now, value=through_id)
            .on_conflict_do_nothing()
        )
        mark = s.get(HousekeepingMark, ADOPTED_THROUGH, with_for_update=True)
        if mark is not None and (mark.value or 0) < through_id:  # another process may have gone further
            mark.at, mark.value = now, through_id
    return len(inserted)


def adopt_orphan_charges(
    engine: Engine, now: dt.datetime, *, grace_s: float, window_s: float, batch_rows: int = ADOPT_BATCH_ROWS
) -> int:
    """Adopt the ledger's charges to our accounts that have no reservation `grace_s` after they were recorded;
    how many. Stops at the first such charge still within the grace (the next sweep goes on from there)."""
    with read_session(engine) as s:
        if not inspect(s.connection()).has_table(LEDGER_CHARGES.name):
            return 0
        mark = s.get(HousekeepingMark, ADOPTED_THROUGH)
        saved = mark is not None
        after_id = int(mark.value or 0) if mark is not None else _start_mark(s, now, window_s)
    recent = now - dt.timedelta(seconds=grace_s)
    adopted = 0
    while True:
        with read_session(engine) as s:
            batch, ours = _adoptable(s, after_id, batch_rows)
        through_id, orphans, waiting = after_id, [], False
        for c in batch:
            if (
                c.reservation_id is None
                and c.billed_account in ours
                and len(c.request_id) <= _REQUEST_ID_CHARS
            ):
                if as_utc(c.recorded_at) > recent:
                    waiting = True  # its replica may still write its row
                    break
                orphans.append(c)
            through_id = int(c.id)
        if through_id > after_id or not saved:
            adopted += _adopt(engine, orphans, through_id, now)
            saved = True
        if waiting or len(batch) < batch_rows:
            return adopted
        after_id = through_id
