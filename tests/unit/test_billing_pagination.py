"""Usage reports page their charges (`limit`, `cursor`) over the service, the HTTP API and the CLI, on SQLite;
housekeeping commands of the CLI (`hfi billing sweep|prune`)."""

from __future__ import annotations

import datetime as dt

import pytest
import typer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from billing.accounts import Caller
from billing.cli import register
from billing.config import BillingSettings
from billing.errors import InvalidRequest
from billing.reports import MAX_CHARGES_LIMIT, encode_cursor
from billing.service import BillingService
from serving import errors
from serving.routes.accounts import router

UTC = dt.timezone.utc
ADMIN = "admin-secret-for-tests"
WHEN = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
MONTH = "2026-06"
# started_at of the seven charges: three share one instant, so pages must break ties by id
STARTS = [WHEN, WHEN, WHEN, WHEN + dt.timedelta(seconds=1), WHEN + dt.timedelta(seconds=2)] + [
    WHEN + dt.timedelta(minutes=m) for m in (5, 9)
]


@pytest.fixture
def filled(tmp_path):
    """ann (pro) with seven settled requests in June, and the expected charges in order."""
    url = f"sqlite:///{tmp_path}/p.db"
    svc = BillingService(BillingSettings(mode="tokens", admin_token=ADMIN), url)
    svc.accounts.create_user("ann", "pro")
    token = svc.accounts.issue_token("ann").token
    for i, start in enumerate(STARTS):
        adm = svc.admit(token, None, f"org/m{i % 2}", 100, start, request_id=f"req-{i}")
        svc.settle(adm, 10 + i, hardware_profile=f"hw{i % 3}")
    whole = svc.usage(svc.authenticate(token), month=MONTH)
    yield svc, token, url, [c["request_id"] for c in whole["charges"]]
    svc.close()


def pages(fetch, limit: int) -> tuple[list[str], list[dict]]:
    """Every page of a report, following next_cursor: (request ids in order, the reports)."""
    ids, reports, cursor = [], [], None
    while True:
        report = fetch(limit, cursor)
        reports.append(report)
        ids += [c["request_id"] for c in report["charges"]]
        cursor = report["next_cursor"]
        if cursor is None:
            return ids, reports


def test_pages_cover_every_charge_once_in_order_with_the_months_totals(filled):
    svc, token, _, expected = filled
    caller = svc.authenticate(token)
    assert len(expected) == 7 and set(expected[:3]) == {"req-0", "req-1", "req-2"}  # one instant: by id
    for limit in (1, 2, 3, 7, 1000):
        ids, reports = pages(lambda n, c: svc.usage(caller, month=MONTH, limit=n, cursor=c), limit)
        assert ids == expected
        assert len(reports) == max(1, -(-7 // limit))
        for r in reports:  # every page carries the whole month's totals
            assert r["requests"] == 7 and r["total_nanousd"] == sum(10 + i for i in range(7))
            assert sum(m["cost_nanousd"] for m in r["by_model"]) == r["total_nanousd"]
            assert r["charges_limit"] == limit and len(r["charges"]) <= limit
    default = svc.usage(caller, month=MONTH)
    assert default["charges_limit"] == 1000 and default["next_cursor"] is None


@pytest.mark.parametrize("limit", [0, -1, MAX_CHARGES_LIMIT + 1, "ten", "1.5"])
def test_a_bad_limit_is_refused(filled, limit):
    svc, token, _, _ = filled
    with pytest.raises(InvalidRequest, match="limit"):
        svc.usage(svc.authenticate(token), month=MONTH, limit=limit)


@pytest.mark.parametrize("cursor", ["garbage", "e30", encode_cursor(WHEN, 17)])  # the last: a ledger cursor
def test_a_bad_cursor_is_refused(filled, cursor):
    svc, token, _, _ = filled
    with pytest.raises(InvalidRequest, match="cursor"):
        svc.usage(svc.authenticate(token), month=MONTH, cursor=cursor)


def test_the_http_api_pages_and_refuses_a_too_large_limit(filled):
    svc, token, _, expected = filled
    app = FastAPI()
    errors.install(app)
    app.include_router(router)
    app.state.billing = svc
    c = TestClient(app)
    auth = {"Authorization": f"Bearer {token}"}

    def fetch(limit, cursor):
        params = {"month": MONTH, "limit": limit, **({"cursor": cursor} if cursor else {})}
        r = c.get("/billing/usage", params=params, headers=auth)
        assert r.status_code == 200, r.text
        assert r.headers.get("x-next-cursor") == r.json()["next_cursor"]
        return r.json()

    assert pages(fetch, 3)[0] == expected
    r = c.get("/billing/usage", params={"month": MONTH, "limit": MAX_CHARGES_LIMIT + 1}, headers=auth)
    assert r.status_code == 400 and f"at most {MAX_CHARGES_LIMIT}" in r.json()["error"]
    assert c.get("/billing/usage", params={"limit": "x"}, headers=auth).status_code == 400
    assert c.get("/billing/usage", params={"cursor": "nope"}, headers=auth).status_code == 400
    csv = c.get("/billing/usage", params={"month": MONTH, "limit": 2, "format": "csv"}, headers=auth)
    lines = csv.text.splitlines()
    assert len(lines) == 4 and lines[-1] == "TOTAL,,,,,91,0.000000091" and csv.headers["x-next-cursor"]


def test_open_mode_pages_the_ledgers_charges(tmp_path):
    from metering.ledger import Ledger
    from metering.records import Charge, UsageRecord

    svc = BillingService(BillingSettings(), f"sqlite:///{tmp_path}/o.db")
    ledger = Ledger(svc.database_url)
    charges = []
    for i, start in enumerate(STARTS):
        usage = UsageRecord(
            request_id=f"l{i}",
            started_at=start,
            model_id="org/m",
            revision="x",
            task="t",
            hardware_profile="cpu-basic",
            compute_ns=1,
            user="local",
            billed_account="local",
        )
        charges.append(Charge(usage, 0, "0.033", dt.date(2025, 1, 1), 1 + i))
    ledger.insert(charges)
    ledger.close()
    try:
        local = Caller(name="local", tier="", is_admin=True)
        ids, reports = pages(lambda n, c: svc.usage(local, month=MONTH, limit=n, cursor=c), 2)
        assert ids == [f"l{i}" for i in range(7)] and len(reports) == 4
        assert all(r["total_nanousd"] == 28 and r["requests"] == 7 for r in reports)
        with pytest.raises(InvalidRequest, match="cursor"):  # a reservations cursor does not fit the ledger
            svc.usage(local, month=MONTH, cursor=encode_cursor(WHEN, "abc"))
    finally:
        svc.close()


@pytest.fixture
def cli(filled, monkeypatch):
    _, _, url, expected = filled
    monkeypatch.setenv("HFI_DATABASE_URL", url)
    monkeypatch.delenv("HFI_CONFIG", raising=False)
    monkeypatch.delenv("HFI_BILLING_MODE", raising=False)
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(app, list(args))
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke, expected


def test_cli_usage_pages_and_writes_the_whole_month_as_csv(cli):
    import json

    invoke, expected = cli
    first = invoke("accounts", "usage", "ann", "--month", MONTH, "--limit", "4")
    report = json.loads(first.stdout)
    assert [c["request_id"] for c in report["charges"]] == expected[:4]
    assert f"--cursor {report['next_cursor']}" in first.stderr
    second = json.loads(
        invoke("accounts", "usage", "ann", "--month", MONTH, "--cursor", report["next_cursor"]).stdout
    )
    assert [c["request_id"] for c in second["charges"]] == expected[4:] and second["next_cursor"] is None
    whole = invoke("accounts", "usage", "ann", "--month", MONTH, "--format", "csv", "--all", "--limit", "2")
    lines = whole.stdout.splitlines()
    assert lines[0].startswith("request_id,") and [ln.split(",")[0] for ln in lines[1:-1]] == expected
    assert lines[-1] == "TOTAL,,,,,91,0.000000091" and whole.stderr == ""
    bad = invoke("accounts", "usage", "ann", "--limit", str(MAX_CHARGES_LIMIT + 1), ok=False)
    assert bad.exit_code == 1 and "limit" in bad.output
    assert invoke("accounts", "usage", "ann", "--all", ok=False).exit_code == 2  # --all writes csv only


def test_cli_sweep_and_prune(cli, filled):
    svc = filled[0]
    invoke, _ = cli
    assert "settled from the ledger: 0; expired: 0" in invoke("billing", "sweep").stdout
    assert invoke("billing", "prune", "--dry-run").stdout.strip() == "would prune 0 reservation(s)"
    from sqlalchemy import update

    from billing.db import write_session
    from billing.schema import Reservation

    with write_session(svc.engine) as s:  # the seven settled reservations, made older than the retention
        s.execute(update(Reservation).values(created_at=svc.now() - dt.timedelta(days=100)))
    assert invoke("billing", "prune", "--dry-run").stdout.strip() == "would prune 7 reservation(s)"
    assert invoke("billing", "prune").stdout.strip() == "pruned 7 reservation(s)"
    assert invoke("billing", "prune").stdout.strip() == "pruned 0 reservation(s)"
