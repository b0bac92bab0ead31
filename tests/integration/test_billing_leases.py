"""Admission without a database round trip per request, on SQLite and on a real PostgreSQL.

Several BillingService instances on one database stand for several ingress replicas. Checked here: the
concurrency bound with leases (50 requests in flight across replicas against credit for 10), that admission
does no database write per request, the token and policy caches (how long a revocation or a change takes to
reach another replica), a replica killed (SIGKILL, a real process) while it holds a lease and unwritten
settlements, and that batched settlement loses nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import event, select

from billing.config import BillingSettings
from billing.db import read_session, write_session
from billing.errors import Forbidden, PaymentRequired, Unauthorized
from billing.leases import LEASE_RECLAIM_GRACE_S
from billing.schema import Lease, MonthSpend, Reservation, Token, User
from billing.service import BillingService
from billing.tokens import token_hint, token_sha256
from core.db import WRITE_OPTION
from core.utc import as_utc

UTC = dt.timezone.utc
CENT = 10_000_000
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """A clock the test moves by hand (shared by the replicas of one test)."""

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
    return Clock(dt.datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def replicas(database_url, clock):
    """make(n, **settings): n billing services on one database (replicas), closed at the end."""
    made: list[BillingService] = []

    def make(n: int = 1, **overrides) -> list[BillingService]:
        settings = BillingSettings(mode="tokens", **overrides)
        for _ in range(n):
            svc = BillingService(settings, database_url, clock=clock)
            svc.spend.housekeeping = dataclasses.replace(svc.spend.housekeeping, background=False)
            made.append(svc)
        return made[-n:]

    yield make
    for svc in made:
        svc.close()


def month_total(svc: BillingService, account: str, month: str) -> int:
    """The month's committed total as the database holds it (leases included), read directly."""
    with read_session(svc.engine) as s:
        row = s.get(MonthSpend, (account, month))
        return int(row.committed_nanousd) if row else 0


def charge(request_id: str, cost_nanousd: int, account: str, when: dt.datetime):
    """The metering ledger's record of a request that ran."""
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


@pytest.mark.parametrize("allowance_cents", [0, 2])
def test_fifty_in_flight_across_three_replicas_stay_within_the_cap(replicas, clock, allowance_cents):
    """50 requests at once on three replicas (leases of 4 estimates) against credit for 10: while all are in
    flight, what is admitted and what the database has committed stay within cap + allowance (the leased slices
    are inside the bound, not on top of it), and after they end the books equal the costs."""
    allowance = allowance_cents * CENT
    services = replicas(3, overshoot_allowance_nanousd=allowance, lease_slice_estimates=4)
    services[0].accounts.create_user("alice", "free")  # $0.10: credit for 10 requests of $0.01
    token = services[0].accounts.issue_token("alice").token
    when, month = clock(), clock().strftime("%Y-%m")
    limit = services[0].settings.user_tiers["free"].included_nanousd + allowance
    admitted: list[int] = []
    in_flight: dict[str, int] = {}

    def snapshot() -> None:  # run once, when all 50 are decided and every admitted one is still in flight
        in_flight.update(admitted=len(admitted) * CENT, committed=month_total(services[0], "alice", month))

    start, decided = threading.Barrier(50), threading.Barrier(50, action=snapshot)

    def request(i: int) -> str:
        svc = services[i % 3]
        start.wait()
        try:
            adm = svc.admit(token, None, "org/m", CENT, when, request_id=f"r{i}")
            admitted.append(i)
        except PaymentRequired:
            decided.wait()
            return "refused"
        decided.wait()
        if i % 7 == 0:
            svc.release(adm)  # a failure: nothing charged
            return "failed"
        svc.settle(adm, CENT - i % 3, request_id=f"r{i}", hardware_profile="cpu-basic")  # within the estimate
        return "ok"

    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(request, range(50)))
    assert in_flight["admitted"] <= limit and in_flight["committed"] <= limit
    assert 50 - outcomes.count("refused") == 10 + allowance_cents  # no replica refused early here
    for svc in services:
        svc.spend.return_leases()
    report = services[1].usage(services[1].authenticate(token), month=month)
    costs = sum(CENT - i % 3 for i, out in enumerate(outcomes) if out == "ok")
    assert report["requests"] == outcomes.count("ok") and report["total_nanousd"] == costs <= limit
    assert month_total(services[2], "alice", month) == costs  # nothing held any more: leases given back
    assert report["in_flight_reserved_nanousd"] == 0


def test_admission_writes_nothing_per_request(replicas, clock):
    """100 admissions of an uncapped account write nothing; 100 of a capped one take a slice of 10 estimates
    per write (a roll-over, or a top-up in the background: at most two per slice, never one per request); the
    200 settlements go to the database in one batch."""
    (svc,) = replicas(1, lease_slice_estimates=10, lease_ttl_s=3600, settle_flush_interval_s=3600)
    a = svc.accounts
    a.create_user("capped", "pro")
    a.set_spending_limit("capped", 100 * 10**9)
    a.create_user("payg", "pro")  # pay-as-you-go without a limit: no cap to hold
    capped, payg = a.issue_token("capped").token, a.issue_token("payg").token
    svc.ensure_schema()
    writes = []

    def count(conn) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            writes.append(1)

    event.listen(svc.engine, "begin", count)
    when = clock()
    theirs = [svc.admit(payg, None, "org/m", CENT, when, request_id=f"p{i}") for i in range(100)]
    assert writes == []
    ours = [svc.admit(capped, None, "org/m", CENT, when, request_id=f"c{i}") for i in range(100)]
    assert 10 <= len(writes) <= 20
    before = len(writes)
    for adm in ours + theirs:
        svc.settle(adm, CENT // 2)
    svc.spend.flush()
    # The 200 settlements in one batch (give or take a top-up or a flush the background writer was doing).
    assert len(writes) - before <= 3
    with read_session(svc.engine) as s:
        assert s.scalar(select(Lease.id).where(Lease.account == "payg")) is None  # no lease without a cap
    month = when.strftime("%Y-%m")
    for token in (capped, payg):
        report = svc.usage(svc.authenticate(token), month=month)
        assert report["requests"] == 100 and report["total_nanousd"] == 100 * (CENT // 2)
    assert svc.spend.committed_nanousd("capped", month) == 100 * (CENT // 2)


@pytest.mark.parametrize("ttl_s", [5, 0])
def test_a_revoked_token_works_on_another_replica_at_most_the_cache_ttl(replicas, clock, ttl_s):
    a, b = replicas(2, token_cache_ttl_s=ttl_s)
    a.accounts.create_user("ann", "pro")
    tok = a.accounts.issue_token("ann")
    b.admit(tok.token, None, "org/m", CENT, clock())  # b has it cached now (when it caches)
    a.accounts.revoke_token(tok.token_id)
    with pytest.raises(Unauthorized):
        a.admit(tok.token, None, "org/m", CENT, clock())  # at once on the replica that revoked it
    with pytest.raises(Unauthorized):
        b.authenticate(tok.token)  # the account API never answers from the cache
    if ttl_s == 0:
        with pytest.raises(Unauthorized):
            b.admit(tok.token, None, "org/m", CENT, clock())
        return
    clock.advance(seconds=ttl_s - 0.5)
    b.admit(tok.token, None, "org/m", CENT, clock())  # still within the TTL on b
    clock.advance(seconds=0.5)
    with pytest.raises(Unauthorized):
        b.admit(tok.token, None, "org/m", CENT, clock())


def test_policy_changes_reach_another_replica_within_the_ttl(replicas, clock):
    a, b = replicas(2, token_cache_ttl_s=5)
    a.accounts.create_user("ann", "pro")
    a.accounts.create_org("acme", seats=1, enterprise=True)
    a.accounts.add_member("acme", "ann")
    ann = a.accounts.issue_token("ann").token
    b.admit(ann, None, "org/m", CENT, clock())
    b.admit(ann, "acme", "org/m", CENT, clock())
    a.accounts.set_spending_limit("ann", 0)  # no pay-as-you-go past the included credits ...
    a.accounts.disable_model("acme", "org/m")
    a.accounts.set_tier("ann", "free")  # ... and the free tier's $0.10
    with pytest.raises(Forbidden):
        a.admit(ann, "acme", "org/m", CENT, clock())
    b.admit(ann, "acme", "org/m", CENT, clock())  # b's policy is still the cached one
    b.admit(ann, None, "org/m", 50 * CENT, clock())  # pro, within its $2.00: fine on b for now
    clock.advance(seconds=5)
    with pytest.raises(Forbidden):
        b.admit(ann, "acme", "org/m", CENT, clock())
    with pytest.raises(PaymentRequired):
        b.admit(ann, None, "org/m", 50 * CENT, clock())  # now free: more than its $0.10


def test_unknown_tokens_are_cached_briefly_in_a_bounded_cache(replicas, clock):
    (b,) = replicas(1, token_cache_ttl_s=5)
    b.accounts.create_user("ann", "pro")
    b.accounts._unknown_tokens.max_entries = 20  # the bound (10,000 in production), small to test
    late = "hfi_" + "k" * 43
    with pytest.raises(Unauthorized):
        b.admit(late, None, "org/m", CENT, clock())
    with write_session(b.engine) as s:  # the token is issued on another replica (a row, not through b)
        ann = s.scalar(select(User.id).where(User.name == "ann"))
        s.add(
            Token(
                id="tok_late",
                user_id=ann,
                token_sha256=token_sha256(late),
                hint=token_hint(late, "hfi_"),
                created_at=clock(),
            )
        )
    with pytest.raises(Unauthorized):
        b.admit(late, None, "org/m", CENT, clock())  # refused from the cache for up to the TTL
    for i in range(100):
        with pytest.raises(Unauthorized):
            b.admit(f"hfi_unknown{i:040d}", None, "org/m", CENT, clock())
    assert len(b.accounts._unknown_tokens) == 20
    clock.advance(seconds=5)
    assert b.admit(late, None, "org/m", CENT, clock()).billed_account == "ann"


CHILD = """
import dataclasses, datetime as dt, sys, time
from billing.config import BillingSettings
from billing.service import BillingService
from metering.ledger import Ledger
from metering.records import Charge, UsageRecord

url, token, when = sys.argv[1], sys.argv[2], dt.datetime.fromisoformat(sys.argv[3])
settings = BillingSettings(mode="tokens", settle_flush_interval_s=3600, lease_slice_estimates=10)
svc = BillingService(settings, url)
svc.spend.housekeeping = dataclasses.replace(svc.spend.housekeeping, background=False)
charges = []
for i in range(6):
    adm = svc.admit(token, None, "org/m", 10_000_000, when, request_id=f"dead{i}")
    if i < 4:  # ran and was charged (the spool drained to the ledger); its settlement is still queued
        usage = UsageRecord(request_id=f"dead{i}", started_at=when, model_id="org/m", revision="r", task="t",
                            hardware_profile="cpu-basic", compute_ns=10**6, user="ann", billed_account="ann")
        charges.append(Charge(usage, 1, "0.033", dt.date(2025, 1, 1), 5_000_000))
        svc.settle(adm, 5_000_000, request_id=f"dead{i}")
ledger = Ledger(url)
ledger.insert(charges)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_replica_killed_with_a_lease_frees_the_budget_and_its_charges_are_adopted(replicas, clock):
    """A real process takes the whole month's credit as a lease, admits six requests, settles four (queued,
    never written: it is killed first, after their charges reached the ledger). The survivor is refused until
    the dead lease is past its TTL (plus the reclaim grace), then admitted; the sweep adopts the four charges
    from the ledger, so the books equal the ledger."""
    (survivor,) = replicas(1, lease_slice_estimates=10)
    survivor.accounts.create_user("ann", "free")  # $0.10: the child's lease of 10 x $0.01 takes all of it
    token = survivor.accounts.issue_token("ann").token
    survivor.ensure_schema()
    when, month = clock(), clock().strftime("%Y-%m")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, survivor.database_url, token, when.isoformat()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.kill()
        child.wait()
    with read_session(survivor.engine) as s:
        lease = s.execute(
            select(Lease.state, Lease.held_nanousd, Lease.expires_at).where(Lease.account == "ann")
        ).one()
        assert lease.state == "open" and lease.held_nanousd == 10 * CENT
        assert s.scalar(select(Reservation.id).where(Reservation.account == "ann")) is None  # nothing written
    with pytest.raises(PaymentRequired):
        survivor.admit(token, None, "org/m", CENT, clock(), request_id="early")
    # The child's lease expires lease_ttl_s after it was taken, by the child's clock (the real one).
    dead_until = as_utc(lease.expires_at) + dt.timedelta(seconds=LEASE_RECLAIM_GRACE_S)
    assert dead_until - when <= dt.timedelta(
        seconds=survivor.settings.lease_ttl_s + LEASE_RECLAIM_GRACE_S + 30
    )
    clock.now = dead_until - dt.timedelta(seconds=0.5)
    with pytest.raises(PaymentRequired):
        survivor.admit(token, None, "org/m", CENT, clock(), request_id="early")
    clock.now = dead_until + dt.timedelta(seconds=0.5)
    late = survivor.admit(token, None, "org/m", CENT, clock(), request_id="late")  # the dead lease given back
    survivor.settle(late, CENT // 4, request_id="late")
    assert survivor.spend.committed_nanousd("ann", month) == CENT // 4  # not yet the dead replica's charges
    clock.advance(seconds=survivor.settings.settle_grace_s)
    done = survivor.sweep_reservations()
    assert done.adopted_from_ledger == 4
    survivor.spend.return_leases()
    assert month_total(survivor, "ann", month) == 4 * (CENT // 2) + CENT // 4
    report = survivor.usage(survivor.authenticate(token), month=month)
    assert report["requests"] == 5 and {c["request_id"] for c in report["charges"]} >= {"dead0", "dead3"}
    from metering.ledger import Ledger

    ledger = Ledger(survivor.database_url)
    try:
        ledger.insert([charge("late", CENT // 4, "ann", when)])
    finally:
        ledger.close()
    assert survivor.reconcile(month).ok
    assert survivor.sweep_reservations().adopted_from_ledger == 0  # once only


def test_batched_settlement_loses_nothing_and_close_writes_it(replicas, clock, database_url):
    """Two replicas, eight threads, small slices (a roll-over every few requests, while other requests of the
    same budget end): every settlement reaches the books, and close() writes what is still queued."""
    services = replicas(2, lease_slice_estimates=3, settle_flush_interval_s=3600)
    a = services[0].accounts
    a.create_user("pat", "pro")
    a.set_spending_limit("pat", 10**9)
    token = a.issue_token("pat").token
    when, month = clock(), clock().strftime("%Y-%m")
    costs: dict[str, int] = {}
    lock = threading.Lock()

    def worker(w: int) -> None:
        svc = services[w % 2]
        held = []
        for i in range(40):
            rid = f"w{w}-{i}"
            held.append((rid, svc.admit(token, None, "org/m", CENT, when, request_id=rid)))
            if len(held) > 2:  # up to three in flight per thread, ending out of order with the roll-overs
                rid, adm = held.pop(0)
                if i % 5 == 0:
                    svc.release(adm)
                else:
                    svc.settle(adm, 1000 + i, request_id=rid)
                    with lock:
                        costs[rid] = 1000 + i
        for rid, adm in held:
            svc.settle(adm, 7, request_id=rid)
            with lock:
                costs[rid] = 7

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(worker, range(8)))
    for svc in services:
        svc.close()
    reader = BillingService(BillingSettings(mode="tokens"), database_url, clock=clock)
    try:
        report = reader.usage(reader.authenticate(token), month=month, limit=10_000)
        assert {c["request_id"]: c["cost_nanousd"] for c in report["charges"]} == costs
        assert report["total_nanousd"] == sum(costs.values()) == month_total(reader, "pat", month)
        assert report["in_flight_reserved_nanousd"] == 0
        with read_session(reader.engine) as s:
            assert s.scalar(select(Lease.id).where(Lease.state == "open")) is None  # all given back
    finally:
        reader.close()


def test_a_settlement_queued_before_a_roll_over_counts_in_it(replicas, clock):
    """A cost above its estimate, still queued, is written before the lease is recomputed, so the next
    admission sees it (402), as it did when every settlement was written at once."""
    (svc,) = replicas(1, settle_flush_interval_s=3600)
    svc.accounts.create_org("acme", seats=1, enterprise=True, spending_limit_nanousd=CENT)  # $2.01 in all
    svc.accounts.create_user("ann", "pro")
    svc.accounts.add_member("acme", "ann", admin=True)
    ann = svc.accounts.issue_token("ann").token
    big = svc.admit(ann, "acme", "org/m", 10**9, clock())  # the lease: min(10 x $1, $2.01 left)
    svc.settle(big, 2 * 10**9 + CENT)  # all of it: the lease takes the excess over the estimate too
    with pytest.raises(PaymentRequired):
        svc.admit(ann, "acme", "org/m", 1, clock())
    assert svc.usage(svc.authenticate(ann), "acme")["total_nanousd"] == 2 * 10**9 + CENT


def _end_during_roll_over(svc: BillingService, x, y, *, fail: bool):
    """While the roll-over writes x's and y's rows, x settles and y is released (from the roll's own thread,
    so it happens at that exact point); with `fail`, the roll-over's transaction then fails."""
    from sqlalchemy.exc import OperationalError

    hooked: list = []

    def during_roll(conn, cursor, statement, params, context, executemany) -> None:
        if not hooked and statement.startswith("INSERT INTO billing_reservations"):
            hooked.append(statement)
            svc.settle(x, 3 * CENT // 4)
            svc.release(y)
            if fail:
                raise OperationalError(statement, params, Exception("the database went away"))

    event.listen(svc.engine, "before_cursor_execute", during_roll)
    return hooked, during_roll


@pytest.mark.parametrize("fail", [False, True])
def test_requests_that_end_while_their_lease_rolls_over_are_settled_once(replicas, clock, fail):
    from billing.errors import AccountsUnavailable

    (svc,) = replicas(1, lease_slice_estimates=2, settle_flush_interval_s=3600)
    svc.accounts.create_user("pat", "pro")
    svc.accounts.set_spending_limit("pat", 10**9)
    pat = svc.accounts.issue_token("pat").token
    x = svc.admit(pat, None, "org/m", CENT, clock(), request_id="x")
    y = svc.admit(pat, None, "org/m", CENT, clock(), request_id="y")  # the lease of 2 estimates is spent
    hooked, listener = _end_during_roll_over(svc, x, y, fail=fail)
    if fail:
        with pytest.raises(AccountsUnavailable):
            svc.admit(pat, None, "org/m", CENT, clock(), request_id="z")
        assert svc.spend.state(x.reservation_id) == "settled"  # ended within the lease after all
        assert svc.spend.state(y.reservation_id) is None  # released within it: no row at all
    z = svc.admit(pat, None, "org/m", CENT, clock(), request_id="z")  # rolls over: x and y become rows
    event.remove(svc.engine, "before_cursor_execute", listener)
    assert hooked
    svc.settle(z, CENT // 2)
    month = clock().strftime("%Y-%m")
    svc.spend.flush()
    with read_session(svc.engine) as s:
        rows = dict(s.execute(select(Reservation.request_id, Reservation.state)).all())
    assert rows == {"x": "settled", "z": "settled"} | ({} if fail else {"y": "released"})
    report = svc.usage(svc.authenticate(pat), month=month)
    assert report["total_nanousd"] == 3 * CENT // 4 + CENT // 2 == svc.spend.committed_nanousd("pat", month)
    svc.spend.return_leases()
    assert month_total(svc, "pat", month) == report["total_nanousd"]


def test_admit_nowait_decides_from_memory_or_says_it_cannot(replicas, clock):
    """What an event loop may call itself: an admission from the caches and the lease, a refusal the caches
    know, or None when only `admit` (which may wait on the database) can decide."""
    (svc,) = replicas(1, lease_slice_estimates=2)
    svc.accounts.create_user("ann", "free")
    ann = svc.accounts.issue_token("ann").token
    when = clock()
    assert svc.admit_nowait(ann, None, "org/m", CENT, when) is None  # nothing cached yet
    first = svc.admit(ann, None, "org/m", CENT, when)  # caches the token and the policy, takes a lease of 2
    second = svc.admit_nowait(ann, None, "org/m", CENT, when, request_id="second")
    assert (
        second is not None
        and second.billed_account == "ann"
        and second.reservation_id != first.reservation_id
    )
    assert (
        svc.admit_nowait(ann, None, "org/m", CENT, when) is None
    )  # the lease is spent: a roll-over is needed
    with pytest.raises(Unauthorized):
        svc.admit("hfi_" + "z" * 43, None, "org/m", CENT, when)
    with pytest.raises(Unauthorized):  # cached as unknown now
        svc.admit_nowait("hfi_" + "z" * 43, None, "org/m", CENT, when)
    with pytest.raises(Unauthorized):
        svc.admit_nowait(None, None, "org/m", CENT, when)
    svc.settle(second, CENT // 2)
    svc.release(first)
    assert svc.usage(svc.authenticate(ann), month=when.strftime("%Y-%m"))["total_nanousd"] == CENT // 2
