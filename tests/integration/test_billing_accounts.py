"""The same account and admission tests on SQLite and on a real PostgreSQL, and the concurrency bound.

The concurrency test puts 50 requests in flight at once (real threads, a real database) against an account
with credit for 10, and checks the stated bound: the month's spend never passes the cap plus
`overshoot_allowance_nanousd` while each true cost is within its estimate.
"""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import inspect

from billing.config import BillingSettings
from billing.errors import Conflict, Forbidden, InvalidRequest, NotFound, PaymentRequired, Unauthorized
from billing.schema import MIGRATIONS
from billing.service import BillingService
from core.db import BILLING, LEDGER, make_engine
from core.migrations import current_revision, upgrade

UTC = dt.timezone.utc
CENT = 10_000_000
WHEN = dt.datetime(2026, 6, 30, 23, 59, 59, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("postgres_db_url")


@pytest.fixture
def svc(database_url):
    service = BillingService(BillingSettings(mode="tokens"), database_url)
    yield service
    service.close()


def test_migrations_have_their_own_version_table_and_are_idempotent(database_url):
    engine = make_engine(database_url, BILLING)
    try:
        upgrade(engine, MIGRATIONS)
        upgrade(engine, MIGRATIONS)  # a second start changes nothing
        assert current_revision(engine, MIGRATIONS) == "0004_admin_audit"
        tables = set(inspect(engine).get_table_names())
        assert "billing_alembic_version" in tables and "alembic_version" not in tables
        assert {"billing_users", "billing_orgs", "billing_tokens", "billing_reservations"} <= tables
    finally:
        engine.dispose()


def test_billing_and_metering_migrations_share_the_database(database_url):
    from metering.ledger import MIGRATIONS as METERING

    m = make_engine(database_url, LEDGER)
    try:
        upgrade(m, METERING)
        svc = BillingService(BillingSettings(mode="tokens"), database_url)
        svc.ensure_schema()  # billing migrates on first use, not at construction
        upgrade(m, METERING)
        tables = set(inspect(m).get_table_names())
        assert {"metering_charges", "billing_users", "billing_alembic_version"} <= tables
        svc.close()
    finally:
        m.dispose()


def test_account_operations(svc):
    a = svc.accounts
    a.create_user("ann", "pro")
    a.create_user("ben")
    with pytest.raises(Conflict):
        a.create_user("ann")
    with pytest.raises(InvalidRequest):
        a.create_user("bad name")
    with pytest.raises(InvalidRequest):
        a.create_user("cid", "platinum")
    a.create_org("acme", seats=4, enterprise=True)
    with pytest.raises(Conflict):
        a.create_org("ben")  # users and organizations share one namespace
    a.add_member("acme", "ann", admin=True)
    a.add_member("acme", "ben")
    a.remove_member("acme", "ben")
    with pytest.raises(NotFound):
        a.remove_member("acme", "ben")
    a.disable_model("acme", "Org/Model")
    a.set_spending_limit("acme", 7 * CENT)
    t = a.issue_token("ben", label="ci")
    listing = {i.name: i for i in a.list_accounts()}
    assert listing["acme"].members == [{"user": "ann", "admin": True}]
    assert listing["acme"].disabled_models == ["org/model"]
    assert listing["acme"].seats == 4 and listing["acme"].spending_limit_nanousd == 7 * CENT
    assert listing["ben"].tokens[0]["id"] == t.token_id and t.token not in repr(listing)
    assert a.account_policy("acme").included_nanousd == 8 * 10**9
    assert a.is_org_admin("ann", "acme") and not a.is_org_admin("ben", "acme")
    a.revoke_token(t.token_id)
    with pytest.raises(Unauthorized):
        a.resolve_token(t.token)


def test_admission_rules(svc):
    a = svc.accounts
    for name, tier in (("ann", "free"), ("pro", "pro")):
        a.create_user(name, tier)
    a.create_org("acme", seats=1, enterprise=True, spending_limit_nanousd=CENT)
    a.create_org("club")
    a.add_member("acme", "ann")
    a.add_member("club", "ann")
    a.disable_model("acme", "org/off")
    ann, pro = a.issue_token("ann").token, a.issue_token("pro").token
    with pytest.raises(Unauthorized):
        svc.admit("hfi_unknown", None, "org/m", CENT, WHEN)
    with pytest.raises(Forbidden):
        svc.admit(pro, "acme", "org/m", CENT, WHEN)
    with pytest.raises(Forbidden):
        svc.admit(ann, "club", "org/m", CENT, WHEN)
    with pytest.raises(Forbidden):
        svc.admit(ann, "acme", "org/off", CENT, WHEN)
    for _ in range(10):
        svc.settle(svc.admit(ann, None, "org/m", CENT, WHEN), CENT)
    with pytest.raises(PaymentRequired):
        svc.admit(ann, None, "org/m", CENT, WHEN)
    adm = svc.admit(ann, "acme", "org/m", 2 * 10**9, WHEN)  # $2 included
    svc.settle(adm, 2 * 10**9 + CENT)  # one cent of pay-as-you-go: the limit
    with pytest.raises(PaymentRequired):
        svc.admit(ann, "acme", "org/m", 1, WHEN)
    for _ in range(3):
        svc.settle(svc.admit(pro, None, "org/m", 10**9, WHEN), 10**9)
    report = svc.usage(svc.authenticate(pro), month="2026-06")
    assert report["pay_as_you_go_nanousd"] == 10**9
    # the straddling request: started in June, settled in July, charged in June
    late = svc.admit(pro, None, "org/m", CENT, WHEN)
    svc.settle(late, CENT)
    assert svc.usage(svc.authenticate(pro), month="2026-06")["total_nanousd"] == 3 * 10**9 + CENT
    assert svc.usage(svc.authenticate(pro), month="2026-07")["total_nanousd"] == 0


@pytest.mark.parametrize("allowance_cents", [0, 2])
def test_fifty_in_flight_against_credit_for_ten(database_url, allowance_cents):
    settings = BillingSettings(mode="tokens", overshoot_allowance_nanousd=allowance_cents * CENT)
    svc = BillingService(settings, database_url)
    svc.accounts.create_user("alice", "free")  # $0.10: credit for 10 requests of $0.01
    token = svc.accounts.issue_token("alice").token
    cap = settings.user_tiers["free"].included_nanousd
    start = threading.Barrier(50)
    all_admitted = threading.Barrier(50)

    def request(i: int) -> str:
        start.wait()
        try:
            adm = svc.admit(token, None, "org/m", CENT, WHEN)
        except PaymentRequired:
            all_admitted.wait()
            return "refused"
        all_admitted.wait()  # all 50 are decided while every admitted one is still in flight
        if i % 7 == 0:
            svc.release(adm)  # a failure: nothing charged
            return "failed"
        svc.settle(adm, CENT - (i % 3))  # true cost at or below the estimate
        return "ok"

    try:
        with ThreadPoolExecutor(max_workers=50) as pool:
            outcomes = list(pool.map(request, range(50)))
        admitted = 50 - outcomes.count("refused")
        assert admitted == 10 + allowance_cents  # exactly what the cap plus the stated allowance holds
        report = svc.usage(svc.authenticate(token), month="2026-06")
        assert report["requests"] == outcomes.count("ok")
        assert report["total_nanousd"] <= cap + settings.overshoot_allowance_nanousd
        assert report["total_nanousd"] == sum(c["cost_nanousd"] for c in report["charges"])
        assert svc.spend.committed_nanousd("alice", "2026-06") == report["total_nanousd"]
        assert report["in_flight_reserved_nanousd"] == 0
    finally:
        svc.close()


def test_concurrent_admissions_to_one_org_from_many_members(database_url):
    svc = BillingService(BillingSettings(mode="tokens"), database_url)
    try:
        svc.accounts.create_org("acme", seats=1, enterprise=True, spending_limit_nanousd=0)  # $2.00, no PAYG
        tokens = []
        for i in range(8):
            svc.accounts.create_user(f"u{i}")
            svc.accounts.add_member("acme", f"u{i}")
            tokens.append(svc.accounts.issue_token(f"u{i}").token)
        estimate = 150_000_000  # $0.15: 13 fit in $2.00
        go = threading.Barrier(40)

        def request(i: int) -> int:
            go.wait()
            try:
                adm = svc.admit(tokens[i % 8], "acme", "org/m", estimate, WHEN)
            except PaymentRequired:
                return 0
            svc.settle(adm, estimate)
            return 1

        with ThreadPoolExecutor(max_workers=40) as pool:
            admitted = sum(pool.map(request, range(40)))
        assert admitted == 13
        total = svc.spend.committed_nanousd("acme", "2026-06")
        assert total == 13 * estimate <= 2 * 10**9
    finally:
        svc.close()


def test_migrations_match_the_models(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from billing.schema import Base

    engine = make_engine(database_url, BILLING)
    try:
        upgrade(engine, MIGRATIONS)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        ours = [d for d in diff if "billing_" in repr(d) and "billing_alembic_version" not in repr(d)]
        assert ours == []
    finally:
        engine.dispose()


def test_reconcile_with_the_metering_ledger(database_url):
    from metering.ledger import Ledger
    from metering.records import Charge, UsageRecord

    svc = BillingService(BillingSettings(mode="tokens"), database_url)
    ledger = Ledger(database_url)
    try:
        svc.accounts.create_user("pat", "pro")
        token = svc.accounts.issue_token("pat").token

        def charge(rid: str, cost: int, account: str = "pat") -> Charge:
            usage = UsageRecord(
                request_id=rid,
                started_at=WHEN,
                model_id="org/m",
                revision="r",
                task="t",
                hardware_profile="cpu-basic",
                compute_ns=10**6,
                user=account,
                billed_account=account,
            )
            return Charge(usage, 1, "0.033", dt.date(2025, 1, 1), cost)

        for i, cost in enumerate((5, 7, 11)):
            adm = svc.admit(token, None, "org/m", 100, WHEN)
            svc.settle(adm, cost, request_id=f"r{i}", hardware_profile="cpu-basic")
        ledger.insert(
            [charge("r0", 5), charge("r1", 7), charge("r2", 11), charge("routed", 99, "hf:someone")]
        )
        rec = svc.reconcile("2026-06")
        assert rec.ok and rec.matched == 3 and rec.billing_total_nanousd == rec.ledger_total_nanousd == 23
        ledger.insert([charge("r9", 1)])  # charged in the ledger, never settled in billing
        adm = svc.admit(token, None, "org/m", 100, WHEN)
        svc.settle(adm, 3, request_id="r10")  # settled, not (yet) in the ledger
        rec = svc.reconcile("2026-06")
        assert not rec.ok and rec.missing_in_billing == ["r9"] and rec.missing_in_ledger == ["r10"]
        assert svc.reconcile("2026-07").ok
    finally:
        ledger.close()
        svc.close()


def test_concurrent_expiry_keeps_the_books_consistent(database_url):
    now = [WHEN]
    settings = BillingSettings(mode="tokens", reservation_ttl_s=60)
    svc = BillingService(settings, database_url, clock=lambda: now[0])
    try:
        svc.accounts.create_user("pat", "pro")
        token = svc.accounts.issue_token("pat").token
        for _ in range(6):  # left open by an ingress that crashed
            svc.admit(token, None, "org/m", 1000, WHEN)
        now[0] = WHEN + dt.timedelta(seconds=120)
        # PRO pays as it goes with no limit: its admissions never touch the database, so only sweeps expire the
        # stale ones. The background sweep due now is started by an admission only if the one the first
        # admission started has finished, which this test cannot know: these sweeps race the admissions, the
        # writer and that background sweep, and each one first writes the running requests of the expired budget
        # (the six among them) as open rows, then looks for stale reservations.
        go = threading.Barrier(23)

        def request(i: int) -> None:
            go.wait()
            adm = svc.admit(token, None, "org/m", 100, WHEN)
            svc.settle(adm, 10 + i)

        def sweeper() -> None:
            go.wait()
            svc.sweep_reservations()

        with ThreadPoolExecutor(max_workers=23) as pool:
            sweeps = [pool.submit(sweeper) for _ in range(3)]
            list(pool.map(request, range(20)))
            for sweep in sweeps:
                sweep.result()
        svc.spend.wait_for_housekeeping()  # a background sweep may be expiring some of them too
        svc.spend.flush()  # settlements are written behind the response: all of them, before reading the rows
        from sqlalchemy import select

        from billing.db import read_session
        from billing.schema import Reservation

        with read_session(svc.engine) as s:
            rows = s.execute(
                select(Reservation.state, Reservation.cost_nanousd).where(Reservation.account == "pat")
            )
            rows = [(state, cost) for state, cost in rows]
        assert sorted({state for state, _ in rows}) == ["expired", "settled"]
        expected = sum(cost for state, cost in rows if state == "settled")
        assert expected == sum(10 + i for i in range(20))
        assert (
            svc.spend.committed_nanousd("pat", "2026-06") == expected
        )  # each stale one expired exactly once
    finally:
        svc.close()
