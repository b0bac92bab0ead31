"""Reservation housekeeping on SQLite and on a real PostgreSQL: lost settlements are settled from the metering
ledger's charges, lost releases expire, old reservations are pruned, and the migration adds the indexes.

The ledger is metering's real one (metering.ledger.Ledger) in the same database; a "lost settlement" is a
request that was admitted and charged but whose settle() never came (its client cut off, its ingress killed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import inspect, select, text, update

from billing.config import BillingSettings
from billing.db import read_session, write_session
from billing.errors import InvalidRequest, PaymentRequired
from billing.schema import MIGRATIONS, Reservation
from billing.service import BillingService
from core.db import BILLING, make_engine
from core.migrations import upgrade

UTC = dt.timezone.utc
CENT = 10_000_000
WHEN = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
MONTH = "2026-06"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kw: float) -> dt.datetime:
        self.now += dt.timedelta(**kw)
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("postgres_db_url")


@pytest.fixture
def clock() -> Clock:
    return Clock(WHEN)


@pytest.fixture
def books(database_url, clock):
    """A billing service on `clock` with no background housekeeping (the tests sweep and prune themselves),
    and the metering ledger of the same database."""
    from metering.ledger import Ledger

    svc = BillingService(BillingSettings(mode="tokens"), database_url, clock=clock)
    svc.spend.housekeeping = dataclasses.replace(svc.spend.housekeeping, background=False)
    ledger = Ledger(database_url)
    yield svc, ledger
    ledger.close()
    svc.close()


def charge(request_id: str, cost_nanousd: int, account: str, when: dt.datetime = WHEN):
    """The ledger's record of a request that ran."""
    from metering.records import Charge, UsageRecord

    usage = UsageRecord(
        request_id=request_id,
        started_at=when,
        model_id="org/m",
        revision="r",
        task="t",
        hardware_profile="cpu-basic",
        compute_ns=10**6,
        user=account,
        billed_account=account,
    )
    return Charge(usage, 1, "0.033", dt.date(2025, 1, 1), cost_nanousd)


def user(svc: BillingService, name: str, tier: str) -> str:
    svc.accounts.create_user(name, tier)
    return svc.accounts.issue_token(name).token


def states(svc: BillingService, account: str) -> dict[str, str]:
    """request id -> state of the account's reservations."""
    svc.spend.flush()  # settlements are written behind the response: what this process queued, first
    with read_session(svc.engine) as s:
        rows = s.execute(
            select(Reservation.request_id, Reservation.state).where(Reservation.account == account)
        )
        return {rid: state for rid, state in rows}


def test_a_lost_settlement_is_settled_from_the_ledger_at_its_true_cost(books, clock):
    svc, ledger = books
    pat = user(svc, "pat", "pro")
    cheap = svc.admit(pat, None, "org/m", 1000, WHEN, request_id="req-cheap")
    svc.admit(pat, None, "org/m", 1000, WHEN, request_id="req-dear")
    ledger.insert([charge("req-cheap", 700, "pat"), charge("req-dear", 2500, "pat")])  # ran; no settle came
    assert svc.sweep_reservations().settled_from_ledger == 0  # within the grace the ingress may still settle
    assert svc.spend.committed_nanousd("pat", MONTH) == 2000  # meanwhile each counts at its estimate

    clock.advance(seconds=svc.settings.settle_grace_s + 1)
    done = svc.sweep_reservations()
    assert (done.settled_from_ledger, done.expired) == (2, 0)
    assert states(svc, "pat") == {"req-cheap": "settled", "req-dear": "settled"}
    assert svc.spend.committed_nanousd("pat", MONTH) == 3200  # the true costs, the one above its estimate too
    report = svc.usage(svc.authenticate(pat), month=MONTH)
    assert {c["request_id"]: c["cost_nanousd"] for c in report["charges"]} == {
        "req-cheap": 700,
        "req-dear": 2500,
    }
    assert report["total_nanousd"] == 3200 and report["charges"][0]["hardware_profile"] == "cpu-basic"
    svc.settle(cheap, 999)  # the settlement arrives after all: already settled, nothing changes
    assert svc.spend.committed_nanousd("pat", MONTH) == 3200
    assert svc.reconcile(MONTH).ok


def test_a_lost_release_expires_after_the_ttl_and_a_late_charge_still_counts(books, clock):
    svc, ledger = books
    pat = user(svc, "pat", "pro")
    svc.admit(pat, None, "org/m", 1000, WHEN, request_id="req-lost")  # no charge: it never ran
    clock.advance(seconds=svc.settings.settle_grace_s + 1)
    assert svc.sweep_reservations().expired == 0  # it may still be running: it keeps its estimate
    assert svc.spend.committed_nanousd("pat", MONTH) == 1000
    clock.advance(seconds=svc.settings.reservation_ttl_s)
    assert svc.sweep_reservations().expired == 1
    assert states(svc, "pat") == {"req-lost": "expired"}
    assert svc.spend.committed_nanousd("pat", MONTH) == 0  # the credit is back

    # It did run after all, and its charge reaches the ledger late (a spool drained after an outage).
    ledger.insert([charge("req-lost", 400, "pat")])
    assert svc.sweep_reservations().settled_from_ledger == 1
    assert svc.spend.committed_nanousd("pat", MONTH) == 400  # charged in full
    assert svc.reconcile(MONTH).ok


def test_admission_settles_the_accounts_stale_reservations_from_the_ledger(books, clock):
    svc, ledger = books
    ann = user(svc, "ann", "free")  # $0.10: ten requests of one cent
    for i in range(10):
        svc.admit(ann, None, "org/m", CENT, WHEN, request_id=f"r{i}")
    ledger.insert([charge(f"r{i}", CENT // 2, "ann") for i in range(10)])  # each cost half; none settled
    with pytest.raises(PaymentRequired):
        svc.admit(ann, None, "org/m", CENT, clock())
    clock.advance(seconds=svc.settings.reservation_ttl_s + 1)
    # Past the TTL the next admission resolves them: from the ledger, not by giving the estimates back.
    svc.admit(ann, None, "org/m", CENT, clock(), request_id="r10")
    assert svc.spend.committed_nanousd("ann", MONTH) == 10 * (CENT // 2) + CENT
    for i in range(11, 15):
        svc.admit(ann, None, "org/m", CENT, clock(), request_id=f"r{i}")
    with pytest.raises(PaymentRequired):  # the month's charges still count against the credits
        svc.admit(ann, None, "org/m", CENT, clock())


def test_after_a_soak_with_lost_settlements_the_books_equal_the_ledger(books, clock):
    """The soak's shape: some requests settle, some lose their settlement, some lose their release."""
    svc, ledger = books
    pat = user(svc, "pat", "pro")
    charges = []
    for i in range(30):
        adm = svc.admit(pat, None, "org/m", 1000, WHEN, request_id=f"q{i}")
        if i % 3 == 2:
            continue  # failed, and its release was lost: no charge
        charges.append(charge(f"q{i}", 100 + i, "pat"))
        if i % 3 == 0:
            svc.settle(adm, 100 + i, request_id=f"q{i}", hardware_profile="cpu-basic")
    ledger.insert(charges)
    assert not svc.reconcile(MONTH).ok  # ten charges never reached billing
    clock.advance(seconds=svc.settings.reservation_ttl_s + 1)
    done = svc.sweep_reservations()
    assert (done.settled_from_ledger, done.expired) == (10, 10)
    rec = svc.reconcile(MONTH)
    assert rec.ok and rec.matched == 20
    assert svc.spend.committed_nanousd("pat", MONTH) == sum(c.cost_nanousd for c in charges)
    assert "open" not in states(svc, "pat").values()


def test_concurrent_admissions_and_sweeps_stay_within_the_cap(database_url):
    """Admissions race a sweep that settles stale reservations from the ledger: never past cap + allowance."""
    from metering.ledger import Ledger

    clock = Clock(WHEN)
    settings = BillingSettings(mode="tokens", overshoot_allowance_nanousd=CENT)
    svc = BillingService(settings, database_url, clock=clock)
    ledger = Ledger(database_url)
    try:
        alice = user(svc, "alice", "free")  # $0.10 + one cent of allowance
        cap = settings.user_tiers["free"].included_nanousd + settings.overshoot_allowance_nanousd
        for i in range(4):  # lost settlements: one cent held each, half a cent charged
            svc.admit(alice, None, "org/m", CENT, WHEN, request_id=f"stale{i}")
        ledger.insert([charge(f"stale{i}", CENT // 2, "alice") for i in range(4)])
        clock.advance(seconds=settings.settle_grace_s + 1)
        go = threading.Barrier(41)

        def request(i: int) -> int:
            go.wait()
            try:
                adm = svc.admit(alice, None, "org/m", CENT, WHEN, request_id=f"live{i}")
            except PaymentRequired:
                return 0
            svc.settle(adm, CENT - i % 3)  # within the estimate
            return 1

        def sweeper() -> None:
            go.wait()
            for _ in range(5):
                svc.sweep_reservations()

        with ThreadPoolExecutor(max_workers=41) as pool:
            swept = pool.submit(sweeper)
            admitted = sum(pool.map(request, range(40)))
            swept.result()
        svc.spend.wait_for_housekeeping()  # the background sweep the first admission started
        svc.sweep_reservations()
        total = svc.spend.committed_nanousd("alice", MONTH)
        report = svc.usage(svc.authenticate(alice), month=MONTH)
        assert total == report["total_nanousd"] <= cap
        assert report["requests"] == admitted + 4 and report["in_flight_reserved_nanousd"] == 0
        assert (
            7 <= admitted <= 9
        )  # 11 cents, less the 4 the stale ones hold until the sweep settles them at 2
    finally:
        ledger.close()
        svc.close()


def test_housekeeping_runs_in_the_background_at_most_every_interval(database_url):
    clock = Clock(WHEN)
    settings = BillingSettings(mode="tokens", prune_interval_s=3600)
    svc = BillingService(settings, database_url, clock=clock)
    from metering.ledger import Ledger

    ledger = Ledger(database_url)
    try:
        pat = user(svc, "pat", "pro")

        def age(request_id: str, days: float) -> None:
            with write_session(svc.engine) as s:
                s.execute(
                    update(Reservation)
                    .where(Reservation.request_id == request_id)
                    .values(created_at=clock() - dt.timedelta(days=days))
                )

        def admit_and_wait(request_id: str):
            adm = svc.admit(pat, None, "org/m", 1000, clock(), request_id=request_id)
            svc.spend.wait_for_housekeeping()
            return adm

        svc.settle(admit_and_wait("old"), 10)  # the first admission starts the first sweep and prune
        svc.spend.flush()  # settlements are written behind the response: its row, now, to age it
        age("old", 100)
        svc.admit(pat, None, "org/m", 1000, clock(), request_id="lost")
        ledger.insert([charge("lost", 20, "pat", clock())])
        clock.advance(seconds=settings.sweep_interval_s + 1)  # past the grace? not yet: 31 s < 60 s
        admit_and_wait("a")
        assert states(svc, "pat")["lost"] == "open" and "old" in states(svc, "pat")  # prune not due yet
        clock.advance(seconds=settings.settle_grace_s)
        admit_and_wait("b")
        assert states(svc, "pat")["lost"] == "settled"  # the background sweep settled it from the ledger
        assert "old" in states(svc, "pat")
        clock.advance(seconds=settings.prune_interval_s)
        admit_and_wait("c")
        assert "old" not in states(svc, "pat")  # the background prune, an interval after the first
    finally:
        ledger.close()
        svc.close()


def test_prune_keeps_what_reports_and_reconciliation_need(books, clock):
    svc, ledger = books
    pat = user(svc, "pat", "pro")
    t0 = clock()
    settled = [svc.admit(pat, None, "org/m", 1000, t0, request_id=f"old{i}") for i in range(3)]
    for i, adm in enumerate(settled):
        svc.settle(adm, 10 + i, request_id=f"old{i}")
    ledger.insert([charge(f"old{i}", 10 + i, "pat", t0) for i in range(3)])
    failed = svc.admit(pat, None, "org/m", 1000, t0, request_id="failed")
    svc.spend.return_leases()  # a release within its lease leaves no row: this one outlived it (an open row)
    svc.release(failed)
    svc.admit(pat, None, "org/m", 1000, t0, request_id="lost")  # will expire
    clock.advance(seconds=svc.settings.reservation_ttl_s + 1)
    svc.sweep_reservations()
    bob = user(svc, "bob", "pro")
    svc.admit(bob, None, "org/m", 1000, clock(), request_id="running")  # left open: never pruned
    clock.advance(days=svc.settings.reservation_retention_days - 1)
    assert svc.prune_reservations() == 0 and svc.spend.pruned_before() is None  # not old enough yet
    now = clock.advance(days=2)
    recent = svc.admit(pat, None, "org/m", 1000, now, request_id="recent")
    svc.settle(recent, 5)

    assert svc.prune_reservations(dry_run=True) == 5
    assert svc.spend.prune(batch_rows=2) == 5  # in batches of two
    assert states(svc, "pat") == {"recent": "settled"} and states(svc, "bob") == {"running": "open"}
    assert svc.spend.pruned_before() == now - dt.timedelta(days=svc.settings.reservation_retention_days)
    # June's reservations are gone: its report comes from the ledger, whole; its reconciliation is refused.
    june = svc.usage(svc.authenticate(pat), month=MONTH)
    assert june["requests"] == 3 and june["total_nanousd"] == 33
    assert [c["request_id"] for c in june["charges"]] == ["old0", "old1", "old2"]
    with pytest.raises(InvalidRequest, match="pruned"):
        svc.reconcile(MONTH)
    this_month = now.strftime("%Y-%m")
    assert svc.usage(svc.authenticate(pat), month=this_month)["total_nanousd"] == 5
    assert svc.prune_reservations() == 0


REPORT_INDEX = (
    "ix_billing_reservations_account_month_state_started",
    ["account", "month", "state", "started_at", "id"],
)
EXPIRY_INDEX = ("ix_billing_reservations_account_state_created", ["account", "state", "created_at"])
SWEEP_INDEX = ("ix_billing_reservations_state_created", ["state", "created_at"])


def _indexes(engine) -> dict[str, list[str]]:
    return {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("billing_reservations")}


def _alembic(engine, action: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS.directory))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def test_the_migration_adds_the_reservation_indexes(database_url):
    engine = make_engine(database_url, BILLING)
    try:
        upgrade(engine, MIGRATIONS, "0001_billing_accounts")
        before = _indexes(engine)
        assert "ix_billing_reservations_account_month_state" in before
        assert EXPIRY_INDEX[0] not in before and SWEEP_INDEX[0] not in before
        upgrade(engine, MIGRATIONS)
        after = _indexes(engine)
        for name, columns in (REPORT_INDEX, EXPIRY_INDEX, SWEEP_INDEX):
            assert after[name] == columns
        assert "ix_billing_reservations_account_month_state" not in after  # a prefix of the report index
        assert "billing_housekeeping" in inspect(engine).get_table_names()
        _alembic(engine, "downgrade", "0001_billing_accounts")
        assert _indexes(engine) == before
        upgrade(engine, MIGRATIONS)
        assert _indexes(engine) == after
    finally:
        engine.dispose()


QUERIES = {
    # admission's expiry of one account's stale open reservations: either index reads only open rows
    "expiry": (
        "SELECT id FROM billing_reservations WHERE account = 'u7' AND state = 'open' AND created_at < :cutoff",
        {EXPIRY_INDEX[0], SWEEP_INDEX[0]},
    ),
    # the background sweep
    "sweep": (
        "SELECT id FROM billing_reservations WHERE state = 'open' AND created_at < :cutoff",
        {SWEEP_INDEX[0]},
    ),
    # pruning (in steady state, an interval's worth of old rows at a time)
    "prune": (
        "SELECT id FROM billing_reservations WHERE state IN ('settled', 'released', 'expired') "
        "AND created_at < :old LIMIT 100",
        {SWEEP_INDEX[0]},
    ),
    # one page of a report, in (started_at, id) order without sorting the month
    "report": (
        "SELECT id FROM billing_reservations WHERE account = 'u7' AND month = '2026-06' AND state = 'settled' "
        "ORDER BY started_at, id LIMIT 10",
        {REPORT_INDEX[0]},
    ),
}


def test_with_a_long_history_the_hot_queries_use_their_indexes(database_url):
    """A history of finished reservations (and a few open ones), analysed: every query the request path and
    housekeeping run reads through an index, never the whole table, and a report page sorts nothing."""
    engine = make_engine(database_url, BILLING)
    try:
        upgrade(engine, MIGRATIONS)
        rows = [
            {
                "id": f"{i:032x}",
                "account": f"u{i % 50}",
                "user": f"u{i % 50}",
                "kind": "local",
                "model_id": "org/m",
                "month": MONTH,
                "started_at": WHEN + dt.timedelta(seconds=i),
                "created_at": WHEN + dt.timedelta(seconds=i),
                "estimate_nanousd": 1000,
                "state": "open" if i % 500 == 0 else ("released" if i % 7 == 0 else "settled"),
                "cost_nanousd": 10,
            }
            for i in range(5000)
        ]
        with write_session(engine) as s:
            s.execute(Reservation.__table__.insert(), rows)
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
            params = {"cutoff": WHEN + dt.timedelta(hours=2), "old": WHEN + dt.timedelta(minutes=1)}
            for name, (sql, indexes) in QUERIES.items():
                explain = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
                plan = " | ".join(str(r[-1]) for r in conn.execute(text(explain + sql), params))
                used = {i for i in indexes if i in plan}
                assert used, f"{name}: {plan}"
                assert "SCAN billing_reservations" not in plan and "Seq Scan" not in plan, f"{name}: {plan}"
                if name == "report":
                    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
    finally:
        engine.dispose()
