"""The one usage API: its access rule (billing/usage_access.py) on real accounts, the report it gives each caller
(`GET /billing/usage` through serving/routes/accounts.py with the real error mapping), the redirect from the
route that moved (`GET /usage`), and bad input answered 4xx."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import typer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from billing.accounts import Caller
from billing.cli import register as register_accounts
from billing.config import BillingSettings
from billing.errors import Forbidden, InvalidRequest, NotFound
from billing.reports import EVERY_ACCOUNT
from billing.service import BillingService
from billing.usage_access import EXTERNAL, LOCAL, UsageScope, usage_scope
from metering.ledger import Ledger
from metering.records import Charge, UsageRecord
from serving import errors
from serving.routes import accounts as accounts_routes
from serving.routes import usage as usage_routes

ADMIN = "admin-secret-for-the-usage-tests"
NOW = dt.datetime(2026, 3, 14, 12, tzinfo=dt.timezone.utc)
MONTH = "2026-03"
OPERATOR = Caller(name="(admin)", tier="", is_admin=True)  # what the admin token authenticates as


def caller(name: str, *, admin: bool = False) -> Caller:
    return Caller(name=name, tier="pro", is_admin=admin)


@pytest.fixture
def billing(tmp_path):
    """Users ann (admin of acme), ben (member of acme), eve (in no organization), boss (a server administrator),
    and the organizations acme and solo (no members)."""
    svc = BillingService(
        BillingSettings(mode="tokens", admin_token=ADMIN), f"sqlite:///{tmp_path}/u.db", clock=lambda: NOW
    )
    a = svc.accounts
    for name in ("ann", "ben", "eve"):
        a.create_user(name, "pro")
    a.create_user("boss", "pro", is_admin=True)
    a.create_org("acme", seats=2, enterprise=True)
    a.create_org("solo", seats=1, enterprise=True)
    a.add_member("acme", "ann", admin=True)
    a.add_member("acme", "ben")
    yield svc
    svc.close()


def scope(svc: BillingService, who: Caller, account: str | None) -> UsageScope:
    return usage_scope(who, account, lambda: svc.accounts, in_ledger=lambda name: name == "hf:alice")


# --- the rule


@pytest.mark.parametrize(
    ("who", "account", "expected"),
    [
        # a caller sees their own usage
        (caller("ann"), None, UsageScope("ann", "user")),
        (caller("ann"), "", UsageScope("ann", "user")),
        (caller("ann"), "ann", UsageScope("ann", "user")),
        # an organization's admin sees it per member; its other members its totals and their own charges
        (caller("ann"), "acme", UsageScope("acme", "org", per_member=True)),
        (caller("ben"), "acme", UsageScope("acme", "org", charges_user="ben")),
        # an operator sees everyone's: any account, an account only the ledger knows, every account together
        (OPERATOR, None, UsageScope(None, EVERY_ACCOUNT)),
        (OPERATOR, "acme", UsageScope("acme", "org", per_member=True)),
        (OPERATOR, "eve", UsageScope("eve", "user")),
        (OPERATOR, "hf:alice", UsageScope("hf:alice", EXTERNAL)),
        (caller("boss", admin=True), "acme", UsageScope("acme", "org", per_member=True)),
        (caller("boss", admin=True), None, UsageScope("boss", "user")),  # an account: its own by default
    ],
)
def test_who_sees_what(billing, who, account, expected):
    assert scope(billing, who, account) == expected


@pytest.mark.parametrize(
    ("who", "account"),
    [
        (caller("eve"), "ann"),  # another user
        (caller("ben"), "ann"),  # a fellow member is still another user
        (caller("eve"), "acme"),  # an organization one is not in
        (caller("ann"), "solo"),
        (caller("eve"), "nobody"),  # unknown: refused the same, so nobody learns which accounts exist
        (caller("eve"), "hf:alice"),  # an account only the ledger knows: operators only
    ],
)
def test_everything_else_is_forbidden(billing, who, account):
    with pytest.raises(Forbidden, match=f"cannot see the usage of '{account}'"):
        scope(billing, who, account)


def test_an_operator_is_told_when_no_account_has_the_name(billing):
    for name in ("nobody", "hf:nobody", "(admin)"):
        with pytest.raises(NotFound, match="no account named"):
            scope(billing, OPERATOR, name)
    with pytest.raises(InvalidRequest, match="account: at most"):
        scope(billing, OPERATOR, "x" * 300)


def test_open_mode_local_account_needs_no_database(billing):
    def no_database():
        raise AssertionError("open mode's own account needs no account lookup")

    local = caller("local")
    rule = {"local_account": "local"}
    assert usage_scope(local, None, no_database, **rule) == UsageScope("local", LOCAL)
    assert usage_scope(OPERATOR, "local", no_database, **rule) == UsageScope("local", LOCAL)
    assert usage_scope(OPERATOR, None, no_database, **rule) == UsageScope(None, EVERY_ACCOUNT)
    with pytest.raises(Forbidden):
        usage_scope(caller("ann"), "local", no_database, **rule)


# --- the API over HTTP


def h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def settle(svc: BillingService, token: str | None, cost: int, rid: str, bill_to: str | None = None) -> None:
    """A request of `cost` nano-USD admitted and settled by billing, and its charge in the ledger (as the
    ingress leaves them)."""
    adm = svc.admit(token, bill_to, "org/m", cost, NOW, request_id=rid)
    svc.settle(adm, cost, request_id=rid, hardware_profile="cpu-basic")
    ledger_charge(svc, rid, adm.user, adm.billed_account, cost)


def ledger_charge(svc: BillingService, rid: str, user: str, account: str, cost: int) -> None:
    usage = UsageRecord(
        rid, NOW, "org/m", "r", "feature-extraction", "cpu-basic", 1, user=user, billed_account=account
    )
    ledger = Ledger(svc.database_url)
    try:
        ledger.insert([Charge(usage, 0, "0.033", dt.date(2025, 1, 1), cost)])
    finally:
        ledger.close()


@pytest.fixture
def api(billing):
    app = FastAPI()
    errors.install(app)
    app.include_router(accounts_routes.router)
    app.include_router(usage_routes.router)
    app.state.billing = billing
    a = billing.accounts
    tokens = {name: a.issue_token(name).token for name in ("ann", "ben", "eve", "boss")}
    settle(billing, tokens["ann"], 100, "r-ann")
    settle(billing, tokens["ann"], 20, "r-ann-acme", bill_to="acme")
    settle(billing, tokens["ben"], 3, "r-ben-acme", bill_to="acme")
    ledger_charge(billing, "r-routed", "hf:alice", "hf:alice", 7)  # routed traffic: in the ledger only
    return TestClient(app), tokens


def test_each_caller_gets_the_one_report_shape(api):
    c, tok = api
    own = c.get("/billing/usage", params={"month": MONTH}, headers=h(tok["ann"])).json()
    org = c.get("/billing/usage", params={"month": MONTH, "account": "acme"}, headers=h(tok["ann"])).json()
    member = c.get("/billing/usage", params={"month": MONTH, "account": "acme"}, headers=h(tok["ben"])).json()
    everyone = c.get("/billing/usage", params={"month": MONTH}, headers=h(ADMIN)).json()
    routed = c.get("/billing/usage", params={"month": MONTH, "account": "hf:alice"}, headers=h(ADMIN)).json()
    shape = set(own)
    for report in (org, member, everyone, routed):
        assert shape <= set(report) and set(report) - shape <= {"by_member", "charges_user", "by_account"}

    assert (own["account"], own["kind"], own["total_nanousd"], own["requests"]) == ("ann", "user", 100, 1)
    assert [x["request_id"] for x in own["charges"]] == ["r-ann"] and own["charges"][0]["account"] == "ann"
    assert org["total_nanousd"] == 23 and [m["user"] for m in org["by_member"]] == ["ann", "ben"]
    assert len(org["charges"]) == 2 and {x["account"] for x in org["charges"]} == {"acme"}
    assert member["total_nanousd"] == 23 and "by_member" not in member and member["charges_user"] == "ben"
    assert [x["request_id"] for x in member["charges"]] == ["r-ben-acme"]
    assert (routed["kind"], routed["total_nanousd"], routed["included_credits_nanousd"]) == (EXTERNAL, 7, 0)

    # every account: the ledger's month, by account, each row what that account's own report says
    assert (everyone["account"], everyone["kind"], everyone["tier"]) == (None, EVERY_ACCOUNT, None)
    assert everyone["included_credits_nanousd"] is None and everyone["pay_as_you_go_nanousd"] is None
    by_account = {x["account"]: x["cost_nanousd"] for x in everyone["by_account"]}
    assert by_account == {
        "ann": own["total_nanousd"],
        "acme": org["total_nanousd"],
        "hf:alice": routed["total_nanousd"],
    }
    assert everyone["total_nanousd"] == sum(by_account.values()) == 130 and everyone["requests"] == 4
    assert sum(d["cost_nanousd"] for d in everyone["by_day"]) == 130
    assert {x["request_id"]: x["account"] for x in everyone["charges"]} == {
        "r-ann": "ann",
        "r-ann-acme": "acme",
        "r-ben-acme": "acme",
        "r-routed": "hf:alice",
    }
    csv = c.get("/billing/usage", params={"month": MONTH, "format": "csv"}, headers=h(ADMIN))
    assert csv.status_code == 200 and csv.text.splitlines()[-1] == "TOTAL,,,,,130,0.000000130"
    # a server administrator is an account: their own by default, anyone's by name
    assert c.get("/billing/usage", headers=h(tok["boss"])).json()["account"] == "boss"
    boss_view = c.get("/billing/usage", params={"month": MONTH, "account": "acme"}, headers=h(tok["boss"]))
    assert boss_view.json()["by_member"] == org["by_member"]


def test_refusals_are_clear_4xx(api):
    c, tok = api
    cases = [
        ({"account": "ann"}, tok["eve"], 403, "cannot see the usage of 'ann'"),
        ({"account": "acme"}, tok["eve"], 403, "cannot see the usage of 'acme'"),
        ({"account": "nobody"}, tok["eve"], 403, "cannot see the usage of 'nobody'"),
        ({"account": "nobody"}, ADMIN, 404, "no account named 'nobody'"),
        ({"account": "x" * 300}, ADMIN, 400, "account: at most"),
        ({"month": "2026-13"}, tok["ann"], 400, "is not a month"),
        ({"month": "March"}, tok["ann"], 400, "is not a month"),
        ({"format": "table"}, tok["ann"], 400, "format: use json or csv"),
        ({"limit": "x"}, tok["ann"], 400, "limit:"),
        ({"limit": "0"}, tok["ann"], 400, "limit: at least 1"),
        ({"cursor": "nope"}, tok["ann"], 400, "cursor:"),
        ({"since": "2026-03-01"}, tok["ann"], 400, "month=YYYY-MM"),
        ({"until": "not a date"}, tok["ann"], 400, "month=YYYY-MM"),
        ({"charges": "true"}, tok["ann"], 400, "charges:"),
    ]
    for params, token, status, message in cases:
        r = c.get("/billing/usage", params=params, headers=h(token))
        assert r.status_code == status, (params, r.text)
        assert message in r.json()["error"], (params, r.json())
    assert c.get("/billing/usage").status_code == 401
    assert c.get("/billing/usage", headers=h("hfi_not_a_token")).status_code == 401


def test_the_old_route_redirects_with_its_query(api):
    c, tok = api
    moved = c.get(
        "/usage", params={"account": "acme", "month": MONTH}, headers=h(tok["ann"]), follow_redirects=False
    )
    assert (
        moved.status_code == 308 and moved.headers["location"] == f"billing/usage?account=acme&month={MONTH}"
    )
    assert c.get("/usage", follow_redirects=False).headers["location"] == "billing/usage"
    assert c.head("/usage", follow_redirects=False).status_code == 308
    # followed, it is the one API: the same report, the same rule
    via = c.get("/usage", params={"account": "acme", "month": MONTH}, headers=h(tok["ann"]))
    direct = c.get("/billing/usage", params={"account": "acme", "month": MONTH}, headers=h(tok["ann"]))
    assert str(via.url).endswith(f"/billing/usage?account=acme&month={MONTH}")
    assert via.status_code == 200 and via.json() == direct.json()
    assert c.get("/usage", params={"account": "acme"}, headers=h(tok["eve"])).status_code == 403
    assert c.get("/usage", params={"month": MONTH}, headers=h(ADMIN)).json()["kind"] == EVERY_ACCOUNT
    # what only the old route took is refused, saying what to use
    old = c.get("/usage", params={"since": "2026-03-01", "format": "table"}, headers=h(ADMIN))
    assert old.status_code == 400 and "month=YYYY-MM" in old.json()["error"]


def test_the_cli_gives_the_same_report(api, billing, monkeypatch):
    """`hfi accounts usage` is an operator's view of the same API: every account without a name."""
    c, _ = api
    billing.spend.flush()  # the settlements, written behind, are in the database the CLI reads
    monkeypatch.setenv("HFI_DATABASE_URL", billing.database_url)
    for name in ("HFI_CONFIG", "HFI_BILLING_MODE"):
        monkeypatch.delenv(name, raising=False)
    app = typer.Typer()
    register_accounts(app)
    runner = CliRunner()
    for account in (None, "acme", "hf:alice"):
        args = ["accounts", "usage", *([account] if account else []), "--month", MONTH]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        params = {"month": MONTH, **({"account": account} if account else {})}
        assert json.loads(result.stdout) == c.get("/billing/usage", params=params, headers=h(ADMIN)).json()
    unknown = runner.invoke(app, ["accounts", "usage", "nobody"])
    assert unknown.exit_code == 1 and "no account named 'nobody'" in unknown.output
