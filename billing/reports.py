"""Usage reports: one account's month (UTC), with included credits used, pay-as-you-go, breakdowns, charges.

Every total is the sum of the charges it covers, in integer nano-USD.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections import defaultdict
from typing import Any

from sqlalchemy import Engine, select

from billing.accounts import BilledAccount
from billing.db import as_utc, read_session
from billing.errors import InvalidRequest
from billing.schema import Reservation
from billing.spend import OPEN, SETTLED

MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
CSV_COLUMNS = ("request_id", "started_at", "user", "model_id", "hardware_profile", "cost_nanousd", "cost_usd")


def check_month(month: str) -> str:
    """A month as YYYY-MM."""
    if not isinstance(month, str) or not MONTH_RE.match(month):
        raise InvalidRequest(f"month: {month!r} is not a month (YYYY-MM)")
    return month


def month_bounds(month: str) -> tuple[dt.datetime, dt.datetime]:
    """[first instant, first instant of the next month) in UTC."""
    check_month(month)
    year, mon = int(month[:4]), int(month[5:])
    start = dt.datetime(year, mon, 1, tzinfo=dt.timezone.utc)
    end = dt.datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=dt.timezone.utc)
    return start, end


def usd(nanousd: int) -> str:
    """Exact decimal USD string with 9 places."""
    sign = "-" if nanousd < 0 else ""
    n = abs(nanousd)
    return f"{sign}{n // 10**9}.{n % 10**9:09d}"


def _group(charges: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for c in charges:
        t = totals[str(c[key])]
        t[0] += 1
        t[1] += c["cost_nanousd"]
    return [
        {key: k, "requests": n, "cost_nanousd": cost, "cost_usd": usd(cost)}
        for k, (n, cost) in sorted(totals.items())
    ]


def _charge(request_id: str, started_at, user: str, model_id: str, profile: str | None, cost: int) -> dict:
    return {
        "request_id": request_id,
        "started_at": as_utc(started_at).isoformat(),
        "user": user,
        "model_id": model_id,
        "hardware_profile": profile or "unknown",
        "cost_nanousd": cost,
        "cost_usd": usd(cost),
    }


def usage_report(
    engine: Engine, account: BilledAccount, month: str, *, per_member: bool = False
) -> dict[str, Any]:
    """The month's usage of `account` from billing's settled requests: included credits first, then PAYG."""
    check_month(month)
    with read_session(engine) as s:
        rows = s.scalars(
            select(Reservation)
            .where(
                Reservation.account == account.name,
                Reservation.month == month,
                Reservation.state.in_((SETTLED, OPEN)),
            )
            .order_by(Reservation.started_at, Reservation.id)
        ).all()
        charges = [
            _charge(
                r.request_id or r.id,
                r.started_at,
                r.user,
                r.model_id,
                r.hardware_profile,
                int(r.cost_nanousd or 0),
            )
            for r in rows
            if r.state == SETTLED
        ]
        in_flight = sum(int(r.estimate_nanousd) for r in rows if r.state == OPEN)
    return build_report(account, month, charges, in_flight_nanousd=in_flight, per_member=per_member)


def ledger_usage_report(database_url: str, account: BilledAccount, month: str) -> dict[str, Any]:
    """The month's usage of `account` from the metering ledger's charges (open mode keeps no reservations)."""
    from metering.ledger import Ledger

    start, end = month_bounds(month)
    ledger = Ledger(database_url)
    try:
        found = ledger.charges(start, end, account=account.name)
    finally:
        ledger.close()
    charges = [
        _charge(
            c.request_id,
            c.usage.started_at,
            c.usage.user,
            c.usage.model_id,
            c.usage.hardware_profile,
            c.cost_nanousd,
        )
        for c in found
    ]
    return build_report(account, month, charges)


def build_report(
    account: BilledAccount,
    month: str,
    charges: list[dict[str, Any]],
    *,
    in_flight_nanousd: int = 0,
    per_member: bool = False,
) -> dict[str, Any]:
    """The report of `charges`: every total is their exact sum; included credits are used first."""
    in_flight = in_flight_nanousd
    total = sum(c["cost_nanousd"] for c in charges)
    included_used = min(total, account.included_nanousd)
    report: dict[str, Any] = {
        "account": account.name,
        "kind": account.kind,
        "tier": account.policy_name,
        "month": month,
        "currency": "USD",
        "included_credits_nanousd": account.included_nanousd,
        "included_used_nanousd": included_used,
        "pay_as_you_go_nanousd": total - included_used,
        "total_nanousd": total,
        "total_usd": usd(total),
        "spending_limit_nanousd": account.spending_limit_nanousd,
        "in_flight_reserved_nanousd": in_flight,
        "requests": len(charges),
        "by_model": _group(charges, "model_id"),
        "by_hardware_profile": _group(charges, "hardware_profile"),
        "charges": charges,
    }
    if per_member:
        report["by_member"] = _group(charges, "user")
    return report


def report_csv(report: dict[str, Any]) -> str:
    """The report's charges as CSV, one row per charge, and a final total row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in report["charges"]:
        writer.writerow([c[k] for k in CSV_COLUMNS])
    writer.writerow(["TOTAL", "", "", "", "", report["total_nanousd"], report["total_usd"]])
    return buf.getvalue()
