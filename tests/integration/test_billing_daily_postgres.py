"""The usage report's spend per UTC day on PostgreSQL (timestamptz): from billing's settled requests (tokens mode)
and from the metering ledger (open mode), each day's sum exact and the days adding up to the month's total."""

from __future__ import annotations

import datetime as dt

from billing.accounts import BilledAccount
from billing.config import BillingSettings
from billing.reports import ledger_usage_report
from billing.service import BillingService

UTC = dt.timezone.utc
WHEN = [
    (dt.datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC), 3),
    (dt.datetime(2026, 3, 15, 23, 59, 59, 999999, tzinfo=UTC), 5),
    (dt.datetime(2026, 3, 16, 0, 0, 0, tzinfo=UTC), 7),
    (dt.datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC), 11),
    (dt.datetime(2026, 4, 1, 0, 0, 0, tzinfo=UTC), 1000),  # April: not in March
]


def _days(report: dict) -> dict[str, int]:
    return {d["day"]: d["cost_nanousd"] for d in report["by_day"] if d["cost_nanousd"]}


def test_daily_spend_on_postgres(postgres_db_url):
    svc = BillingService(BillingSettings(mode="tokens"), postgres_db_url)
    try:
        svc.accounts.create_user("ann", "pro")
        ann = svc.accounts.issue_token("ann").token
        for i, (when, cost) in enumerate(WHEN):
            svc.settle(svc.admit(ann, None, "org/m", 1, when), cost, request_id=f"r{i}")
        report = svc.usage(svc.authenticate(ann), month="2026-03")
        assert _days(report) == {"2026-03-01": 3, "2026-03-15": 5, "2026-03-16": 7, "2026-03-31": 11}
        assert sum(d["cost_nanousd"] for d in report["by_day"]) == report["total_nanousd"] == 26
    finally:
        svc.close()


def test_daily_spend_from_the_ledger_on_postgres(postgres_db_url):
    from metering.ledger import Ledger
    from metering.records import Charge, UsageRecord

    ledger = Ledger(postgres_db_url)
    try:
        charges = []
        for i, (when, cost) in enumerate(WHEN):
            usage = UsageRecord(
                request_id=f"q{i}",
                started_at=when,
                model_id="org/m",
                revision="r",
                task="text-classification",
                hardware_profile="cpu-basic",
                compute_ns=1,
                user="local",
                billed_account="local",
            )
            charges.append(
                Charge(
                    usage=usage,
                    compute_ms=0,
                    price_usd_per_hour="3600",
                    price_effective_from=when.date(),
                    cost_nanousd=cost,
                )
            )
        ledger.insert_new(charges)
    finally:
        ledger.close()
    account = BilledAccount("local", "user", "open", 0, True, None)
    svc = BillingService(BillingSettings(), postgres_db_url)
    try:
        report = ledger_usage_report(svc.engine, account, "2026-03")
    finally:
        svc.close()
    assert _days(report) == {"2026-03-01": 3, "2026-03-15": 5, "2026-03-16": 7, "2026-03-31": 11}
    assert report["total_nanousd"] == 26
