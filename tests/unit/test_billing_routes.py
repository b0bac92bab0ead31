"""serving/routes/accounts.py in a FastAPI app with the real error mapping: usage, the admin API, admission."""

from __future__ import annotations

import datetime as dt

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from billing.config import BillingSettings
from billing.service import BillingService
from serving import errors
from serving.routes.accounts import admission_for, router

ADMIN = "admin-secret-for-tests"
CENT = 10_000_000


@pytest.fixture
def app_and_billing(tmp_path):
    billing = BillingService(BillingSettings(mode="tokens", admin_token=ADMIN), f"sqlite:///{tmp_path}/r.db")
    app = FastAPI()
    errors.install(app)
    app.include_router(router)
    app.state.billing = billing

    @app.post("/models/{model_id:path}")
    async def infer(request: Request, model_id: str):
        # what the ingress does: admit before compute, settle after
        adm = await admission_for(request, model_id, CENT, dt.datetime.now(dt.timezone.utc))
        request.app.state.billing.settle(
            adm, CENT, request_id="r-" + adm.reservation_id, hardware_profile="cpu-basic"
        )
        return {"billed_account": adm.billed_account, "user": adm.user}

    yield app, billing
    billing.close()


def h(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_admin_api_and_usage(app_and_billing):
    app, _ = app_and_billing
    c = TestClient(app)
    assert c.post("/admin/users", json={"name": "ann"}).status_code == 401
    r = c.post("/admin/users", json={"name": "ann", "tier": "pro"}, headers=h(ADMIN))
    assert r.status_code == 201
    assert c.post("/admin/users", json={"name": "ben"}, headers=h(ADMIN)).status_code == 201
    assert c.post("/admin/users", json={"name": "ben"}, headers=h(ADMIN)).status_code == 409
    assert c.post("/admin/users", json={"name": "x y"}, headers=h(ADMIN)).status_code == 400
    assert (
        c.post(
            "/admin/orgs", json={"name": "acme", "seats": 2, "enterprise": True}, headers=h(ADMIN)
        ).status_code
        == 201
    )
    assert c.put("/admin/orgs/acme/members/ann", json={"admin": True}, headers=h(ADMIN)).status_code == 200
    ann = c.post("/admin/users/ann/tokens", json={"label": "t"}, headers=h(ADMIN)).json()["token"]
    ben = c.post("/admin/users/ben/tokens", headers=h(ADMIN)).json()
    # an org admin manages their organization, and nothing else
    assert c.put("/admin/orgs/acme/members/ben", headers=h(ann)).status_code == 200
    assert (
        c.put(
            "/admin/accounts/acme/spending-limit", json={"spending_limit_nanousd": 0}, headers=h(ann)
        ).status_code
        == 200
    )
    assert c.put("/admin/orgs/acme/disabled-models/org/off", headers=h(ann)).status_code == 200
    assert c.post("/admin/users", json={"name": "zed"}, headers=h(ann)).status_code == 403
    assert c.put("/admin/orgs/acme/members/zed", headers=h(ben["token"])).status_code == 403
    listing = {a["name"]: a for a in c.get("/admin/accounts", headers=h(ADMIN)).json()}
    assert (
        listing["acme"]["disabled_models"] == ["org/off"] and listing["acme"]["spending_limit_nanousd"] == 0
    )

    # requests through the admission helper
    assert c.post("/models/org/m", headers=h(ben["token"])).json() == {"billed_account": "ben", "user": "ben"}
    r = c.post("/models/org/m", headers={**h(ben["token"]), "X-HF-Bill-To": "acme"})
    assert r.json() == {"billed_account": "acme", "user": "ben"}
    r = c.post("/models/org/off", headers={**h(ben["token"]), "X-HF-Bill-To": "acme"})
    assert r.status_code == 403 and "disabled" in r.json()["error"]

    # usage: own account, an org for its admins (per member), CSV
    mine = c.get("/billing/usage", headers=h(ben["token"])).json()
    assert mine["account"] == "ben" and mine["requests"] == 1 and mine["total_nanousd"] == CENT
    # a member who is not the organization's admin sees its totals, and only their own charges
    seen = c.get("/billing/usage?account=acme", headers=h(ben["token"])).json()
    assert "by_member" not in seen and seen["charges_user"] == "ben" and seen["total_nanousd"] == CENT
    org = c.get("/billing/usage?account=acme", headers=h(ann)).json()
    assert org["by_member"] == [
        {"user": "ben", "requests": 1, "cost_nanousd": CENT, "cost_usd": "0.010000000"}
    ]
    assert org["charges"][0]["hardware_profile"] == "cpu-basic"
    csv = c.get("/billing/usage?account=acme&format=csv", headers=h(ann))
    assert csv.headers["content-type"].startswith("text/csv") and csv.text.splitlines()[-1].endswith(
        ",10000000,0.010000000"
    )
    assert c.get("/billing/usage?month=2026-13", headers=h(ann)).status_code == 400

    # revocation: owner may revoke, afterwards 401 with a JSON error body
    assert c.delete(f"/admin/tokens/{ben['token_id']}", headers=h(ann)).status_code == 403
    assert c.delete(f"/admin/tokens/{ben['token_id']}", headers=h(ben["token"])).status_code == 200
    r = c.post("/models/org/m", headers=h(ben["token"]))
    assert r.status_code == 401 and r.headers["content-type"] == "application/json" and r.json()["error"]


def test_refusals_have_wire_contract_bodies(app_and_billing):
    app, billing = app_and_billing
    billing.accounts.create_user("fay", "free")
    tok = billing.accounts.issue_token("fay").token
    c = TestClient(app)
    r = c.post("/models/org/m")
    assert r.status_code == 401 and set(r.json()) == {"error"}
    r = c.post("/models/org/m", headers=h("hf_a_stored_hub_token"))  # the Python client's stored token
    assert r.status_code == 401
    for _ in range(10):
        assert c.post("/models/org/m", headers=h(tok)).status_code == 200
    r = c.post("/models/org/m", headers=h(tok))
    assert r.status_code == 402 and "exceeded your monthly included credits" in r.json()["error"]
    r = c.post("/models/org/m", headers={**h(tok), "X-HF-Bill-To": "nobody"})
    assert r.status_code == 403
    assert c.get("/billing/usage", headers=h(tok)).json()["total_nanousd"] == 10 * CENT


def test_open_mode_usage_needs_no_token(tmp_path):
    billing = BillingService(BillingSettings(), f"sqlite:///{tmp_path}/o.db")
    app = FastAPI()
    errors.install(app)
    app.include_router(router)
    app.state.billing = billing
    from metering.ledger import Ledger
    from metering.records import Charge, UsageRecord

    now = dt.datetime.now(dt.timezone.utc)
    adm = billing.admit(None, None, "org/m", CENT, now)
    billing.settle(adm, 3)  # open mode: the ledger's charges are the record
    usage = UsageRecord(
        request_id="r1",
        started_at=now,
        model_id="org/m",
        revision="x",
        task="t",
        hardware_profile="cpu-basic",
        compute_ns=1,
        user="local",
        billed_account="local",
    )
    ledger = Ledger(billing.database_url)
    ledger.insert([Charge(usage, 0, "0.033", dt.date(2025, 1, 1), 3)])
    ledger.close()
    r = TestClient(app).get("/billing/usage")
    assert r.status_code == 200 and r.json()["account"] == "local" and r.json()["total_nanousd"] == 3
    assert r.json()["charges"][0]["request_id"] == "r1"
    billing.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/admin/orgs", {"name": "big", "seats": 2**31}, "seats"),
        ("POST", "/admin/orgs", {"name": "big", "spending_limit_nanousd": 2**63}, "spending_limit_nanousd"),
        ("PUT", "/admin/orgs/acme/plan", {"seats": 10**30}, "seats"),
        (
            "PUT",
            "/admin/accounts/acme/spending-limit",
            {"spending_limit_nanousd": 2**64},
            "spending_limit_nanousd",
        ),
        ("GET", "/billing/usage?month=0000-01", None, "month"),
        ("GET", "/billing/usage?month=9999-12", None, "month"),
    ],
)
def test_numbers_past_what_the_database_holds_are_a_400_naming_the_field(
    app_and_billing, method, path, body, field
):
    app, billing = app_and_billing
    billing.accounts.create_org("acme")
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.request(method, path, json=body, headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(f"{field}: ")
    # the largest values that fit are taken
    if path == "/admin/orgs":
        fits = {"name": "fits", "seats": 1_000_000, "spending_limit_nanousd": 2**63 - 1}
        with TestClient(app) as client:
            assert (
                client.post(path, json=fits, headers={"authorization": f"Bearer {ADMIN}"}).status_code == 201
            )


def test_a_missing_or_non_object_body_is_named_as_the_body(app_and_billing):
    app, _ = app_and_billing
    with TestClient(app, raise_server_exceptions=False) as client:
        for body in (None, [1], "x"):
            r = client.put(
                "/admin/accounts/acme/spending-limit", json=body, headers={"authorization": f"Bearer {ADMIN}"}
            )
            assert r.status_code == 422 and r.json()["error"].startswith("body: "), r.text
