"""Report rendering: totals are the rows' sums to the last digit, in table, JSON and CSV."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.reports import UsageReport, UsageRow, render_report

rows_strategy = st.lists(
    st.builds(
        UsageRow,
        account=st.sampled_from(["alice", "acme"]),
        model_id=st.sampled_from(["org/a", "org/b"]),
        task=st.just("feature-extraction"),
        hardware_profile=st.sampled_from(["cpu-basic", "nvidia-h100"]),
        day=st.dates(min_value=dt.date(2026, 1, 1), max_value=dt.date(2026, 12, 31)),
        requests=st.integers(min_value=1, max_value=10**6),
        compute_ms=st.integers(min_value=0, max_value=10**9),
        cost_nanousd=st.integers(min_value=0, max_value=10**15),
    ),
    max_size=20,
)


@given(rows_strategy)
def test_totals_equal_the_sum_of_the_rows_in_every_format(rows: list[UsageRow]) -> None:
    report = UsageReport(None, None, None, rows)
    data = json.loads(render_report(report, "json"))
    assert data["totals"]["cost_nanousd"] == sum(r["cost_nanousd"] for r in data["rows"])
    assert Decimal(data["totals"]["cost_usd"]) == sum(
        (Decimal(r["cost_usd"]) for r in data["rows"]), Decimal(0)
    )
    table = list(csv.DictReader(io.StringIO(render_report(report, "csv"))))
    *body, total = table
    assert total["day"] == "TOTAL"
    assert Decimal(total["cost_usd"]) == sum((Decimal(r["cost_usd"]) for r in body), Decimal(0))
    assert int(total["requests"]) == sum(int(r["requests"]) for r in body)


def test_table_lists_rows_and_total() -> None:
    rows = [
        UsageRow("acme", "org/a", "text-to-image", "nvidia-h100", dt.date(2026, 3, 1), 2, 20_000, 25_000_000),
        UsageRow("acme", "org/b", "feature-extraction", "cpu-basic", dt.date(2026, 3, 2), 1, 10, 92),
    ]
    text = render_report(UsageReport(None, None, "acme", rows), "table")
    lines = text.splitlines()
    assert lines[0].split() == [
        "day", "account", "model_id", "task", "hardware_profile", "requests", "compute_seconds", "cost_usd"
    ]  # fmt: skip
    assert "2026-03-01" in lines[2] and "0.025000000" in lines[2] and "20.000" in lines[2]
    assert lines[-1].split() == ["TOTAL", "3", "20.010", "0.025000092"]


@pytest.mark.parametrize(
    "month", ["0000-01", "9999-12", "2026-13", "2026-00", "2026-1", "2026-12\n", " 2026-12", "26-12"]
)
def test_a_month_outside_the_calendar_is_a_400_naming_the_field(month):
    from billing.errors import InvalidRequest
    from billing.reports import check_month, month_bounds

    with pytest.raises(InvalidRequest, match="month: "):
        check_month(month)
    with pytest.raises(InvalidRequest):
        month_bounds(month)


@pytest.mark.parametrize("month", ["0001-01", "1999-12", "2026-12", "9999-11"])
def test_every_month_of_the_calendar_has_bounds(month):
    from billing.reports import month_bounds

    start, end = month_bounds(month)
    assert f"{start.year:04d}-{start.month:02d}" == month and start < end and end.day == 1
