"""The pure parts behind the billing page and `hfi status`: the daily spend in the usage report (exact, per UTC
day, summing to the total), who sees an organization's usage, the chart's SVG, the last minute's window, and how
the status merges the processes' snapshots."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

import pytest

from billing.config import BillingSettings
from billing.errors import Forbidden
from billing.service import BillingService
from metering.recent import RecentRequests, median
from serving.billing_page import daily_chart_svg
from serving.runtime_status import _merge

CENT = 10_000_000


@pytest.fixture
def billing(tmp_path):
    svc = BillingService(BillingSettings(mode="tokens"), f"sqlite:///{tmp_path}/b.db")
    yield svc
    svc.close()


def _charge(
    svc: BillingService, token: str, when: dt.datetime, cost: int, bill_to: str | None = None
) -> None:
    svc.settle(svc.admit(token, bill_to, "org/m", 1, when), cost, request_id=f"r-{when.isoformat()}-{cost}")


def test_daily_spend_is_per_utc_day_and_adds_up_to_the_total(billing):
    a = billing.accounts
    a.create_user("ann", "pro")
    ann = a.issue_token("ann").token
    utc = dt.timezone.utc
    first = dt.datetime(2026, 3, 1, 0, 0, 0, tzinfo=utc)  # the month's first instant
    last = dt.datetime(2026, 3, 31, 23, 59, 59, 999999, tzinfo=utc)  # and its last
    _charge(billing, ann, first, 3)
    _charge(billing, ann, dt.datetime(2026, 3, 15, 12, tzinfo=utc), CENT)
    _charge(billing, ann, dt.datetime(2026, 3, 15, 23, 59, tzinfo=utc), 7)
    _charge(billing, ann, last, 11)
    _charge(billing, ann, dt.datetime(2026, 4, 1, tzinfo=utc), 1000)  # next month: not in March
    report = billing.usage(billing.authenticate(ann), month="2026-03")
    days = {d["day"]: d["cost_nanousd"] for d in report["by_day"]}
    assert len(days) == 31 and days["2026-03-01"] == 3 and days["2026-03-15"] == CENT + 7
    assert days["2026-03-31"] == 11 and days["2026-03-02"] == 0
    assert sum(days.values()) == report["total_nanousd"] == CENT + 21
    assert (
        report["included_left_nanousd"]
        == report["included_credits_nanousd"] - report["included_used_nanousd"]
    )
    assert len(billing.usage(billing.authenticate(ann), month="2026-02")["by_day"]) == 28


def test_members_see_the_org_totals_and_their_own_charges_admins_see_all(billing):
    a = billing.accounts
    for name in ("ann", "ben", "out"):
        a.create_user(name, "pro")
    a.create_org("acme", seats=2, enterprise=True)
    a.add_member("acme", "ann", admin=True)
    a.add_member("acme", "ben")
    ann, ben, out = (a.issue_token(n).token for n in ("ann", "ben", "out"))
    when = billing.now()
    _charge(billing, ann, when, CENT, "acme")
    _charge(billing, ben, when + dt.timedelta(seconds=1), 2 * CENT, "acme")
    admin_view = billing.usage(billing.authenticate(ann), "acme")
    member_view = billing.usage(billing.authenticate(ben), "acme")
    assert admin_view["total_nanousd"] == member_view["total_nanousd"] == 3 * CENT
    assert {m["user"] for m in admin_view["by_member"]} == {"ann", "ben"}
    assert len(admin_view["charges"]) == 2 and "charges_user" not in admin_view
    assert "by_member" not in member_view and member_view["charges_user"] == "ben"
    assert [c["user"] for c in member_view["charges"]] == ["ben"]
    with pytest.raises(Forbidden):
        billing.usage(billing.authenticate(out), "acme")
    assert a.memberships("ben") == [("acme", False)] and a.memberships("ann") == [("acme", True)]
    a.disable_model("acme", "Org/Off")
    assert a.disabled_models("acme") == ["org/off"]


def test_daily_chart_is_valid_svg_with_one_titled_bar_per_day():
    by_day = [
        {"day": f"2026-03-{d:02d}", "cost_nanousd": v, "cost_usd": ""} for d, v in ((1, 0), (2, 5), (3, 10))
    ]
    svg = daily_chart_svg(by_day, "Daily spend of <acme> & co")
    root = ET.fromstring(svg)  # well-formed XML: the title is escaped
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert root.find("s:title", ns).text == "Daily spend of <acme> & co"
    bars = [r for r in root.findall("s:rect", ns) if r.find("s:title", ns) is not None]
    assert [b.find("s:title", ns).text for b in bars] == [
        "2026-03-01: 0.000000000 USD",
        "2026-03-02: 0.000000005 USD",
        "2026-03-03: 0.000000010 USD",
    ]
    heights = [float(b.get("height")) for b in bars]
    assert heights[0] == 0 and heights[2] == pytest.approx(2 * heights[1], abs=0.1)
    assert ET.fromstring(daily_chart_svg([], "empty")) is not None


def test_recent_requests_window_forgets_what_is_older_than_a_minute():
    now = [1000.0]
    recent = RecentRequests(window_s=60, max_samples=3, clock=lambda: now[0])
    recent.observe("m", 0.1)
    now[0] += 30
    recent.observe("m", 0.3, ok=False)
    recent.observe("n", 0.2)
    (m, n) = sorted(recent.snapshot(), key=lambda w: w.model_id)
    assert (m.requests, m.errors, m.latencies_s) == (2, 1, [0.1, 0.3]) and n.requests == 1
    now[0] += 31  # the first request is now 61 s old
    m = next(w for w in recent.snapshot() if w.model_id == "m")
    assert m.latencies_s == [0.3]
    for _ in range(5):
        recent.observe("m", 1.0)
    assert next(w for w in recent.snapshot() if w.model_id == "m").requests == 3  # bounded
    assert median([]) is None and median([3.0, 1.0, 2.0]) == 2.0 and median([1.0, 4.0]) == 2.5


def test_status_merges_the_replicas_and_the_router():
    replica = {
        "tags": {"application": "app-m"},
        "ongoing": 3,
        "queued": {"m": 2},
        "window": {"m": {"requests": 30, "errors": 1, "latencies_s": [0.01, 0.03]}},
    }
    other = {
        **replica,
        "ongoing": 1,
        "queued": {},
        "window": {"m": {"requests": 30, "errors": 0, "latencies_s": [0.02]}},
    }
    router = {
        "tags": {"application": "router"},
        "ongoing": 9,  # the router's own HTTP calls: not the model's
        "queued": {"m": 4},  # held in the router's batcher for m
        "window": {"m": {"requests": 0, "errors": 0, "latencies_s": []}},
    }
    merged = _merge([replica, other, router], "m", "app-m", 60.0)
    assert merged["in_flight"] == 3 + 1 + 4 and merged["queue"] == 2 + 4
    assert merged["requests_last_minute"] == 60 and merged["requests_per_s"] == 1.0
    assert merged["p50_ms"] == 20.0 and merged["errors_last_minute"] == 1
