"""Usage reports: one account's month (UTC), with included credits used, pay-as-you-go, breakdowns, charges.

Every total is the sum of the month's charges, in integer nano-USD, computed by the database; the list of
charges comes a page at a time (`limit`, at most MAX_CHARGES_LIMIT, and the `next_cursor` of the previous page),
oldest first, so a report's cost does not grow with the month.
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, and_, case, func, inspect, or_, select

from billing.accounts import BilledAccount
from billing.db import read_session
from billing.errors import InvalidRequest
from billing.schema import Reservation
from billing.spend import OPEN, SETTLED
from core.money import usd_str
from core.utc import as_utc

MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
CSV_COLUMNS = ("request_id", "started_at", "user", "model_id", "hardware_profile", "cost_nanousd", "cost_usd")
DEFAULT_CHARGES_LIMIT = 1000
EVERY_ACCOUNT = "all"  # the `kind` of the report of every account together (operators only)
MAX_CHARGES_LIMIT = 10_000

# (model_id, hardware_profile, user, requests, cost_nanousd): the month's charges summed per model, profile, user
Group = tuple[str, str | None, str, int, int]


def check_month(month: str) -> str:
    """A month as YYYY-MM, from 0001-01 to 9999-11 (a month whose first instant and the next month's are dates)."""
    if not isinstance(month, str) or not MONTH_RE.fullmatch(month) or not "0001-01" <= month <= "9999-11":
        raise InvalidRequest(f"month: {month!r} is not a month (YYYY-MM, 0001-01 to 9999-11)")
    return month


def check_limit(limit: int | str | None) -> int:
    """How many charges one page lists: DEFAULT_CHARGES_LIMIT when not given, 1 to MAX_CHARGES_LIMIT."""
    if limit is None or limit == "":
        return DEFAULT_CHARGES_LIMIT
    text = str(limit).strip()
    if not re.fullmatch(r"[+-]?\d{1,12}", text):
        raise InvalidRequest(f"limit: {limit!r} is not a whole number")
    n = int(text)
    if n < 1:
        raise InvalidRequest("limit: at least 1")
    if n > MAX_CHARGES_LIMIT:
        raise InvalidRequest(
            f"limit: at most {MAX_CHARGES_LIMIT} charges a page; ask for the next page with `cursor`"
        )
    return n


def encode_cursor(started_at: dt.datetime, key: str | int) -> str:
    """An opaque cursor: the page after the charge (started_at, key)."""
    raw = json.dumps([as_utc(started_at).isoformat(), key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, key_type: type) -> tuple[dt.datetime, Any] | None:
    """The (started_at, key) a cursor stands for, None for the first page; a bad cursor is a 400."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, key = json.loads(raw)
        started_at = as_utc(dt.datetime.fromisoformat(when))
    except (ValueError, TypeError, binascii.Error):
        started_at, key = None, None
    if started_at is None or type(key) is not key_type:
        raise InvalidRequest("cursor: not a cursor of this report (use next_cursor from the previous page)")
    return started_at, key


def _after(started_at_col: Any, key_col: Any, after: tuple[dt.datetime, Any]) -> Any:
    when, key = after
    return or_(started_at_col > when, and_(started_at_col == when, key_col > key))


def month_bounds(month: str) -> tuple[dt.datetime, dt.datetime]:
    """[first instant, first instant of the next month) in UTC."""
    check_month(month)
    year, mon = int(month[:4]), int(month[5:])
    start = dt.datetime(year, mon, 1, tzinfo=dt.timezone.utc)
    end = dt.datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=dt.timezone.utc)
    return start, end


def _group(groups: Sequence[Group], key: str, index: int) -> list[dict[str, Any]]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for g in groups:
        t = totals[str(g[index] or "unknown")]
        t[0] += g[3]
        t[1] += g[4]
    return [_row(key, k, n, cost) for k, (n, cost) in sorted(totals.items())]


def _row(key: str, value: str, requests: int, cost: int) -> dict[str, Any]:
    return {key: value, "requests": requests, "cost_nanousd": cost, "cost_usd": usd_str(cost)}


def _charge(
    request_id: str, started_at, account: str, user: str, model_id: str, profile: str | None, cost: int
) -> dict:
    return {
        "request_id": request_id,
        "started_at": as_utc(started_at).isoformat(),
        "account": account,
        "user": user,
        "model_id": model_id,
        "hardware_profile": profile or "unknown",
        "cost_nanousd": cost,
        "cost_usd": usd_str(cost),
    }


def _daily_columns(started_at: Any, cost: Any, month: str) -> list[Any]:
    """One sum per UTC day of `month`: computed by the database in one query, exact, whatever its backend."""
    start, end = month_bounds(month)
    day = dt.timedelta(days=1)
    return [
        func.coalesce(
            func.sum(
                case((and_(started_at >= start + i * day, started_at < start + (i + 1) * day), cost), else_=0)
            ),
            0,
        )
        for i in range((end - start).days)
    ]


def _by_day(month: str, sums: Sequence[Any] | None) -> list[dict[str, Any]]:
    start, end = month_bounds(month)
    values = [int(v or 0) for v in sums] if sums else [0] * (end - start).days
    return [
        {"day": (start + dt.timedelta(days=i)).date().isoformat(), "cost_nanousd": v, "cost_usd": usd_str(v)}
        for i, v in enumerate(values)
    ]


def _groups(rows: Iterable[Any]) -> list[Group]:
    return [(r[0], r[1], r[2], int(r[3]), int(r[4] or 0)) for r in rows]


def usage_report(
    engine: Engine,
    account: BilledAccount,
    month: str,
    *,
    per_member: bool = False,
    limit: int = DEFAULT_CHARGES_LIMIT,
    cursor: str | None = None,
    charges_user: str | None = None,
) -> dict[str, Any]:
    """The month's usage of `account` from billing's settled requests: included credits first, then PAYG.

    `charges_user`: list only that user's charges (an organization's member who is not its admin); the totals
    stay the account's."""
    check_month(month)
    after = decode_cursor(cursor, str)
    r = Reservation
    mine = (r.account == account.name, r.month == month)
    settled = and_(*mine, r.state == SETTLED)
    with read_session(engine) as s:
        keys = (r.model_id, r.hardware_profile, r.user)
        groups = _groups(
            s.execute(select(*keys, func.count(), func.sum(r.cost_nanousd)).where(settled).group_by(*keys))
        )
        in_flight = s.scalar(
            select(func.coalesce(func.sum(r.estimate_nanousd), 0)).where(*mine, r.state == OPEN)
        )
        daily = s.execute(select(*_daily_columns(r.started_at, r.cost_nanousd, month)).where(settled)).first()
        page = select(r).where(settled)
        if charges_user is not None:
            page = page.where(r.user == charges_user)
        if after is not None:
            page = page.where(_after(r.started_at, r.id, after))
        rows = s.scalars(page.order_by(r.started_at, r.id).limit(limit + 1)).all()
        charges = [
            _charge(
                x.request_id or x.id,
                x.started_at,
                x.account,
                x.user,
                x.model_id,
                x.hardware_profile,
                int(x.cost_nanousd or 0),
            )
            for x in rows[:limit]
        ]
        next_cursor = (
            encode_cursor(rows[limit - 1].started_at, rows[limit - 1].id) if len(rows) > limit else None
        )
    return build_report(
        account,
        month,
        groups,
        charges,
        limit=limit,
        next_cursor=next_cursor,
        in_flight_nanousd=int(in_flight or 0),
        per_member=per_member,
        by_day=_by_day(month, daily),
        charges_user=charges_user,
    )


def ledger_usage_report(
    engine: Engine,
    account: BilledAccount | None,
    month: str,
    *,
    per_member: bool = False,
    limit: int = DEFAULT_CHARGES_LIMIT,
    cursor: str | None = None,
    charges_user: str | None = None,
) -> dict[str, Any]:
    """The month's usage of `account` from the metering ledger's charges (open mode keeps no reservations, and
    months past the reservations' retention have been pruned); `account` None: every account's, with
    `by_account`."""
    from metering.ledger import charges_table as t

    start, end = month_bounds(month)
    after = decode_cursor(cursor, int)
    mine = [t.c.started_at >= start, t.c.started_at < end]
    if account is not None:
        mine.append(t.c.billed_account == account.name)
    groups: list[Group] = []
    charges: list[dict[str, Any]] = []
    by_account: list[dict[str, Any]] = []
    next_cursor = None
    daily = None
    with read_session(engine) as s:
        if inspect(s.connection()).has_table(t.name):  # no ledger yet: no charges
            keys = (t.c.model_id, t.c.hardware_profile, t.c.user)
            groups = _groups(
                s.execute(
                    select(*keys, func.count(), func.sum(t.c.cost_nanousd)).where(*mine).group_by(*keys)
                )
            )
            if account is None:
                per_account = select(t.c.billed_account, func.count(), func.sum(t.c.cost_nanousd))
                by_account = [
                    _row("account", a, int(n), int(c or 0))
                    for a, n, c in s.execute(
                        per_account.where(*mine).group_by(t.c.billed_account).order_by(t.c.billed_account)
                    )
                ]
            daily = s.execute(
                select(*_daily_columns(t.c.started_at, t.c.cost_nanousd, month)).where(*mine)
            ).first()
            page = select(
                t.c.id, t.c.request_id, t.c.started_at, t.c.billed_account, *keys, t.c.cost_nanousd
            ).where(*mine)
            if charges_user is not None:
                page = page.where(t.c.user == charges_user)
            if after is not None:
                page = page.where(_after(t.c.started_at, t.c.id, after))
            rows = s.execute(page.order_by(t.c.started_at, t.c.id).limit(limit + 1)).all()
            charges = [
                _charge(
                    x.request_id,
                    x.started_at,
                    x.billed_account,
                    x.user,
                    x.model_id,
                    x.hardware_profile,
                    int(x.cost_nanousd),
                )
                for x in rows[:limit]
            ]
            if len(rows) > limit:
                next_cursor = encode_cursor(rows[limit - 1].started_at, int(rows[limit - 1].id))
    report = build_report(
        account,
        month,
        groups,
        charges,
        limit=limit,
        next_cursor=next_cursor,
        per_member=per_member,
        by_day=_by_day(month, daily),
        charges_user=charges_user,
    )
    if account is None:
        report["by_account"] = by_account
    return report


def ledger_has_account(engine: Engine, name: str) -> bool:
    """Whether the metering ledger has ever billed a charge to `name` (an account billing may not manage, such
    as routed Hugging Face traffic)."""
    from metering.ledger import charges_table as t

    with read_session(engine) as s:
        if not inspect(s.connection()).has_table(t.name):
            return False
        return s.scalar(select(t.c.id).where(t.c.billed_account == name).limit(1)) is not None


def build_report(
    account: BilledAccount | None,
    month: str,
    groups: Sequence[Group],
    charges: list[dict[str, Any]],
    *,
    limit: int = DEFAULT_CHARGES_LIMIT,
    next_cursor: str | None = None,
    in_flight_nanousd: int = 0,
    per_member: bool = False,
    by_day: list[dict[str, Any]] | None = None,
    charges_user: str | None = None,
) -> dict[str, Any]:
    """The report of a month: totals over all its charges (`groups`), its spend per UTC day (`by_day`), and one
    page of its charges (`charges`: only `charges_user`'s when given). `account` None: every account together,
    where what belongs to one account (its tier, credits, pay-as-you-go amount, limit) is null."""
    total = sum(g[4] for g in groups)
    report: dict[str, Any] = {
        "account": None,
        "kind": EVERY_ACCOUNT,
        "tier": None,
        "month": month,
        "currency": "USD",
        "included_credits_nanousd": None,
        "included_used_nanousd": None,
        "included_left_nanousd": None,
        "pay_as_you_go_nanousd": None,
        "total_nanousd": total,
        "total_usd": usd_str(total),
        "spending_limit_nanousd": None,
        "in_flight_reserved_nanousd": in_flight_nanousd,
        "requests": sum(g[3] for g in groups),
        "by_model": _group(groups, "model_id", 0),
        "by_hardware_profile": _group(groups, "hardware_profile", 1),
        "by_day": by_day if by_day is not None else _by_day(month, None),
        "charges": charges,
        "charges_limit": limit,
        "next_cursor": next_cursor,
    }
    if account is not None:
        included_used = min(total, account.included_nanousd)
        report.update(
            account=account.name,
            kind=account.kind,
            tier=account.policy_name,
            included_credits_nanousd=account.included_nanousd,
            included_used_nanousd=included_used,
            included_left_nanousd=account.included_nanousd - included_used,
            pay_as_you_go_nanousd=total - included_used,
            spending_limit_nanousd=account.spending_limit_nanousd,
        )
    if per_member:
        report["by_member"] = _group(groups, "user", 2)
    if charges_user is not None:
        report["charges_user"] = charges_user
    return report


def report_csv(report: dict[str, Any], *, header: bool = True, total_row: bool = True) -> str:
    """The report's page of charges as CSV, one row per charge, and a final row with the month's total
    (`header` and `total_row` off: the middle pages of one CSV written page by page)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    for c in report["charges"]:
        writer.writerow([c[k] for k in CSV_COLUMNS])
    if total_row:
        writer.writerow(["TOTAL", "", "", "", "", report["total_nanousd"], report["total_usd"]])
    return buf.getvalue()
