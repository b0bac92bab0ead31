"""Billing rules as plain Python on SQLite with a controlled clock: tokens, tiers, bill-to, limits, months."""

from __future__ import annotations

import datetime as dt
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from billing.config import BillingSettings, TierPolicy
from billing.errors import Forbidden, PaymentRequired, Unauthorized
from billing.service import FREE_TIER_MESSAGE, BillingService

UTC = dt.timezone.utc
CENT = 10_000_000  # nano-USD


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kw: float) -> dt.datetime:
        self.now += dt.timedelta(**kw)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(dt.datetime(2026, 3, 14, 12, 0, tzinfo=UTC))


def make(tmp_path, clock, **overrides) -> BillingService:
    return BillingService(
        BillingSettings(mode="tokens", **overrides), f"sqlite:///{tmp_path}/b.db", clock=clock
    )


@pytest.fixture
def svc(tmp_path, clock):
    service = make(tmp_path, clock)
    yield service
    service.close()


def run(svc: BillingService, token, cost, *, bill_to=None, model="org/m", estimate=None, at=None):
    """Admit, then settle at `cost`: one request that ran."""
    adm = svc.admit(token, bill_to, model, estimate if estimate is not None else cost, at or svc.now())
    svc.settle(adm, cost, hardware_profile="cpu-basic")
    return adm


def test_default_tiers_are_the_published_figures():
    s = BillingSettings()
    assert s.user_tiers["free"].included_nanousd == 100_000_000  # $0.10
    assert not s.user_tiers["free"].pay_as_you_go
    assert s.user_tiers["pro"].included_nanousd == 2_000_000_000 and s.user_tiers["pro"].pay_as_you_go
    ent = s.org_plans["enterprise"]
    assert ent.included_nanousd == 2_000_000_000 and ent.per_seat and ent.pay_as_you_go and ent.billable
    assert not s.org_plans["free"].billable
    with pytest.raises(ValueError):
        BillingSettings(default_user_tier="gold")


def test_tokens_missing_unknown_revoked_get_401(svc):
    svc.accounts.create_user("alice")
    tok = svc.accounts.issue_token("alice")
    assert tok.token.startswith("hfi_") and len(tok.token) > 40
    for bad in (None, "", "   ", "hfi_nope", "hf_storedtoken", "Bearer x"):
        with pytest.raises(Unauthorized) as err:
            svc.admit(bad, None, "org/m", CENT, svc.now())
        assert err.value.status_code == 401 and err.value.message
    svc.admit(tok.token, None, "org/m", CENT, svc.now())
    svc.accounts.revoke_token(tok.token_id)
    with pytest.raises(Unauthorized):
        svc.admit(tok.token, None, "org/m", CENT, svc.now())


def test_tokens_are_stored_hashed(svc):
    svc.accounts.create_user("alice")
    tok = svc.accounts.issue_token("alice", label="laptop")
    with svc.engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text("SELECT * FROM billing_tokens"))]
    dump = repr(rows)
    assert tok.token not in dump and tok.token[4:] not in dump
    assert svc.accounts.resolve_token(tok.token).name == "alice"


def test_free_user_is_refused_with_402_once_credits_are_used(svc):
    svc.accounts.create_user("alice", "free")
    tok = svc.accounts.issue_token("alice").token
    for _ in range(10):
        run(svc, tok, CENT)  # $0.10 of credits, $0.01 a request
    with pytest.raises(PaymentRequired) as err:
        svc.admit(tok, None, "org/m", CENT, svc.now())
    assert err.value.status_code == 402 and err.value.message == FREE_TIER_MESSAGE
    report = svc.usage(svc.authenticate(tok), month="2026-03")
    assert report["total_nanousd"] == 100_000_000 and report["requests"] == 10  # the refusal charged nothing
    assert report["included_used_nanousd"] == 100_000_000 and report["pay_as_you_go_nanousd"] == 0


def test_pro_user_continues_pay_as_you_go(svc):
    svc.accounts.create_user("bob", "pro")
    tok = svc.accounts.issue_token("bob").token
    for _ in range(3):
        run(svc, tok, 900_000_000)  # $0.90 each, $2.70 in all
    report = svc.usage(svc.authenticate(tok), month="2026-03")
    assert report["included_used_nanousd"] == 2_000_000_000
    assert report["pay_as_you_go_nanousd"] == 700_000_000
    assert report["total_nanousd"] == sum(c["cost_nanousd"] for c in report["charges"]) == 2_700_000_000
    svc.accounts.set_tier("bob", "free")  # a downgrade stops spending at once
    with pytest.raises(PaymentRequired):
        svc.admit(tok, None, "org/m", CENT, svc.now())


def _org(svc, *, plan_enterprise=True, seats=3, limit=None):
    for name, tier in (("ann", "free"), ("ben", "free"), ("eve", "pro")):
        svc.accounts.create_user(name, tier)
    svc.accounts.create_org("acme", seats=seats, enterprise=plan_enterprise, spending_limit_nanousd=limit)
    svc.accounts.add_member("acme", "ann", admin=True)
    svc.accounts.add_member("acme", "ben")
    return {n: svc.accounts.issue_token(n).token for n in ("ann", "ben", "eve")}


def test_bill_to_member_of_enterprise_org_pools_seat_credits(svc):
    toks = _org(svc, seats=3)  # $6.00 pooled
    a = run(svc, toks["ann"], 4_000_000_000, bill_to="acme")
    b = run(svc, toks["ben"], 2_500_000_000, bill_to="acme")
    assert (a.billed_account, a.user, b.billed_account, b.user) == ("acme", "ann", "acme", "ben")
    report = svc.usage(svc.authenticate(toks["ann"]), account="acme", month="2026-03")
    assert report["included_credits_nanousd"] == 6_000_000_000
    assert report["included_used_nanousd"] == 6_000_000_000 and report["pay_as_you_go_nanousd"] == 500_000_000
    assert {m["user"]: m["cost_nanousd"] for m in report["by_member"]} == {
        "ann": 4_000_000_000,
        "ben": 2_500_000_000,
    }
    # the members' own accounts were not touched
    assert svc.usage(svc.authenticate(toks["ben"]), month="2026-03")["total_nanousd"] == 0


def test_bill_to_refusals_are_403(svc):
    toks = _org(svc)
    with pytest.raises(Forbidden) as err:
        svc.admit(toks["eve"], "acme", "org/m", CENT, svc.now())  # not a member
    assert err.value.status_code == 403 and "not a member" in err.value.message
    with pytest.raises(Forbidden):
        svc.admit(toks["ann"], "nosuchorg", "org/m", CENT, svc.now())
    svc.accounts.create_org("club", seats=5)  # no paid plan
    svc.accounts.add_member("club", "ann")
    with pytest.raises(Forbidden) as err:
        svc.admit(toks["ann"], "club", "org/m", CENT, svc.now())
    assert "plan" in err.value.message
    with pytest.raises(Forbidden):  # only its members (and server admins) see an org's usage
        svc.usage(svc.authenticate(toks["eve"]), account="acme")
    seen = svc.usage(svc.authenticate(toks["ben"]), account="acme")  # a member: not per member
    assert "by_member" not in seen and seen["charges_user"] == "ben"


def test_disabled_model_is_403_for_the_org_only(svc):
    toks = _org(svc)
    svc.accounts.disable_model("acme", "Org/Big-Model")
    with pytest.raises(Forbidden) as err:
        svc.admit(toks["ben"], "acme", "org/big-model", CENT, svc.now())
    assert "disabled" in err.value.message
    svc.admit(toks["ben"], None, "org/big-model", CENT, svc.now())  # billed to ben himself: fine
    svc.accounts.enable_model("acme", "org/big-model")
    svc.admit(toks["ben"], "acme", "org/big-model", CENT, svc.now())


def test_spending_limit_stops_pay_as_you_go(svc):
    toks = _org(svc, seats=1, limit=500_000_000)  # $2.00 included + $0.50 pay-as-you-go
    for _ in range(5):
        run(svc, toks["ann"], 500_000_000, bill_to="acme")
    with pytest.raises(PaymentRequired) as err:
        svc.admit(toks["ben"], "acme", "org/m", CENT, svc.now())
    assert "spending limit" in err.value.message
    svc.accounts.set_spending_limit("acme", 1_000_000_000)
    run(svc, toks["ben"], CENT, bill_to="acme")
    svc.accounts.set_spending_limit("acme", None)  # no limit: pay-as-you-go without cap
    run(svc, toks["ben"], 5_000_000_000, bill_to="acme")


def test_month_rollover_and_a_request_that_straddles_midnight(tmp_path):
    clock = Clock(dt.datetime(2026, 1, 31, 23, 59, 59, 900_000, tzinfo=UTC))
    svc = make(tmp_path, clock)
    svc.accounts.create_user("alice", "free")
    tok = svc.accounts.issue_token("alice").token
    for _ in range(9):
        run(svc, tok, CENT)
    adm = svc.admit(tok, None, "org/m", CENT, clock())  # starts in January
    clock.advance(seconds=1)  # ... and ends in February
    svc.settle(adm, CENT)
    caller = svc.authenticate(tok)
    assert svc.usage(caller, month="2026-01")["total_nanousd"] == 100_000_000
    assert svc.usage(caller, month="2026-02")["total_nanousd"] == 0
    assert svc.usage(caller)["month"] == "2026-02"  # the current month by default
    with pytest.raises(PaymentRequired):  # a January request is refused ...
        svc.admit(tok, None, "org/m", CENT, dt.datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC))
    for _ in range(10):  # ... and February's credits are fresh
        run(svc, tok, CENT, at=clock())
    with pytest.raises(PaymentRequired):
        svc.admit(tok, None, "org/m", CENT, clock())
    svc.close()


def test_settle_release_and_expiry(tmp_path, clock):
    svc = make(tmp_path, clock, reservation_ttl_s=600)
    svc.accounts.create_user("alice", "free")
    tok = svc.accounts.issue_token("alice").token
    month = "2026-03"
    a = svc.admit(tok, None, "org/m", 60_000_000, clock())
    assert svc.spend.committed_nanousd("alice", month) == 60_000_000
    svc.settle(a, 25_000_000)  # the difference goes back
    svc.settle(a, 99_000_000)  # settling twice is a no-op
    assert svc.spend.committed_nanousd("alice", month) == 25_000_000
    b = svc.admit(tok, None, "org/m", 70_000_000, clock())
    with pytest.raises(PaymentRequired):
        svc.admit(tok, None, "org/m", 10_000_000, clock())
    svc.release(b)  # a failed request: everything back, nothing charged
    svc.release(b)
    svc.settle(b, 5)  # settling after release changes nothing
    assert svc.spend.committed_nanousd("alice", month) == 25_000_000
    c = svc.admit(tok, None, "org/m", 70_000_000, clock())
    clock.advance(seconds=601)  # the ingress that held c crashed: c expires at the next admission
    d = svc.admit(tok, None, "org/m", 70_000_000, clock())
    assert svc.spend.state(c.reservation_id) == "expired"
    svc.settle(c, 1_000_000)  # ... and if it did run after all, it is still charged in full
    svc.settle(d, 70_000_000)
    report = svc.usage(svc.authenticate(tok), month=month)
    assert report["total_nanousd"] == 96_000_000 == svc.spend.committed_nanousd("alice", month)
    svc.close()


def test_open_mode_needs_no_token_and_no_database_work(tmp_path, clock):
    svc = BillingService(BillingSettings(), f"sqlite:///{tmp_path}/o.db", clock=clock)
    adm = svc.admit("hf_whatever_the_client_sends", None, "org/m", CENT, clock())
    assert (adm.user, adm.billed_account, adm.kind, adm.reservation_id) == ("local", "local", "local", None)
    for _ in range(50):  # no credits to run out of
        run(svc, None, 100_000_000)
    # The request path never touched the database (not even to migrate): the ledger holds the charges.
    assert not svc.migrations.done and not (tmp_path / "o.db").exists()
    svc.close()


def test_admission_and_errors_are_picklable(svc):
    svc.accounts.create_user("alice")
    adm = svc.admit(svc.accounts.issue_token("alice").token, None, "org/m", CENT, svc.now())
    assert pickle.loads(pickle.dumps(adm)) == adm
    for err in (Unauthorized("a"), Forbidden("b"), PaymentRequired("c")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and back.message == err.message and back.status_code == err.status_code


def test_tiers_are_configuration(tmp_path, clock):
    svc = make(
        tmp_path,
        clock,
        user_tiers={
            "free": TierPolicy(included_nanousd=3 * CENT, pay_as_you_go=False),
            "pro": TierPolicy(included_nanousd=0, pay_as_you_go=True),
        },
        overshoot_allowance_nanousd=CENT,
    )
    svc.accounts.create_user("alice")
    tok = svc.accounts.issue_token("alice").token
    for _ in range(4):  # 3 cents of credits + 1 cent of stated allowance
        run(svc, tok, CENT)
    with pytest.raises(PaymentRequired):
        svc.admit(tok, None, "org/m", CENT, clock())
    svc.close()


@pytest.fixture(scope="module")
def shared_svc(tmp_path_factory):
    service = BillingService(BillingSettings(mode="tokens"), f"sqlite:///{tmp_path_factory.mktemp('h')}/h.db")
    yield service
    service.close()


@settings(max_examples=25, deadline=None)
@given(costs=st.lists(st.integers(min_value=0, max_value=3_000_000_000), min_size=0, max_size=12))
def test_reported_totals_are_the_exact_sum_of_charges(shared_svc, costs):
    svc = shared_svc
    name = f"p{len(svc.accounts.list_accounts())}"  # a fresh account per example
    svc.accounts.create_user(name, "pro")
    tok = svc.accounts.issue_token(name).token
    when = dt.datetime(2026, 5, 1, tzinfo=UTC)
    for i, cost in enumerate(costs):
        adm = svc.admit(tok, None, f"org/m{i % 3}", 1, when)
        svc.settle(adm, cost, hardware_profile=f"hw{i % 2}")
    r = svc.usage(svc.authenticate(tok), month="2026-05")
    assert r["total_nanousd"] == sum(costs) == r["included_used_nanousd"] + r["pay_as_you_go_nanousd"]
    assert r["included_used_nanousd"] == min(sum(costs), 2_000_000_000)
    assert sum(m["cost_nanousd"] for m in r["by_model"]) == sum(costs)
    assert sum(h["cost_nanousd"] for h in r["by_hardware_profile"]) == sum(costs)
    assert r["total_usd"] == f"{sum(costs) // 10**9}.{sum(costs) % 10**9:09d}"


def test_estimate_is_exact_and_rounds_up():
    from decimal import Decimal
    from fractions import Fraction

    from billing.service import estimate_nanousd

    assert estimate_nanousd(Decimal("0.00012"), 10) == 1_200_000  # the FLUX example: 10 s at $0.00012/s
    assert estimate_nanousd(Fraction("0.033") / 3600, 5) == 45_834  # 45833.33... rounded up
    assert estimate_nanousd(0, 5) == 0
    with pytest.raises(ValueError):
        estimate_nanousd(Decimal("-1"), 1)


def test_admission_answers_503_when_the_accounts_database_is_unreachable(tmp_path):
    """Tokens mode needs the database to admit: an outage is a clear 503, never a 500, and nothing runs."""
    from billing.errors import AccountsUnavailable

    db = tmp_path / "accounts.db"
    svc = BillingService(BillingSettings(mode="tokens"), f"sqlite:///{db}")
    svc.engine.dispose()
    db.unlink(missing_ok=True)  # construction does not create it (migrations are lazy)
    db.mkdir()  # the path is now a directory: SQLite cannot open the database
    with pytest.raises(AccountsUnavailable, match="cannot be reached") as err:
        svc.admit("hfi_x", None, "org/m", 1, dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc))
    assert err.value.status_code == 503
