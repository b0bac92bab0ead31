"""Exact pricing: rounding bounds, price points by date, totals exact (hypothesis property tests)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardware_profiles import HardwareProfile, ProfileCatalog, load_profiles
from metering.errors import InvalidUsage
from metering.pricing import billed_ms, cost_nanousd, price, price_in_catalog, usd_per_hour_str
from metering.records import Charge, UsageRecord

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

prices_usd_per_hour = st.decimals(min_value=0, max_value=100, places=4, allow_nan=False, allow_infinity=False)
compute_ns = st.integers(min_value=0, max_value=10**13)  # up to ~3 h


def usage(
    compute: int, *, profile: str = "nvidia-h100", started_at: dt.datetime = T0, rid: str = "r"
) -> UsageRecord:
    return UsageRecord(rid, started_at, "org/m", "abc", "text-to-image", profile, compute)


def profile_with(*points: tuple[str, str]) -> HardwareProfile:
    return HardwareProfile.model_validate(
        {"name": "gpu-x", "prices": [{"effective_from": d, "usd_per_hour": p} for d, p in points]}
    )


@given(compute_ns)
def test_billed_ms_is_nearest_millisecond_half_up(ns: int) -> None:
    ms = billed_ms(ns)
    assert abs(Fraction(ms * 10**6 - ns)) <= Fraction(10**6, 2)
    assert ms * 10**6 - ns != -(10**6) // 2  # an exact half rounds up, never down


def test_billed_ms_examples() -> None:
    assert [billed_ms(n) for n in (0, 499_999, 500_000, 1_499_999, 1_500_000, 593_000_000)] == [
        0,
        0,
        1,
        1,
        2,
        593,
    ]


@given(st.integers(min_value=0, max_value=10**10), prices_usd_per_hour)
def test_cost_is_within_half_a_nanodollar_of_exact(ms: int, usd_h: Decimal) -> None:
    per_s = Fraction(usd_h) / 3600
    exact = Fraction(ms, 1000) * per_s * 10**9
    cost = cost_nanousd(ms, per_s)
    assert isinstance(cost, int)
    assert -Fraction(1, 2) < cost - exact <= Fraction(1, 2)


@given(st.lists(st.tuples(compute_ns, prices_usd_per_hour), min_size=1, max_size=50))
def test_totals_are_exact_integer_sums_within_rounding_bounds(items: list[tuple[int, Decimal]]) -> None:
    charges = []
    for i, (ns, usd_h) in enumerate(items):
        prof = profile_with(("2025-01-01", str(usd_h)))
        charges.append(price(usage(ns, rid=f"r{i}"), prof))
    total = sum(c.cost_nanousd for c in charges)
    exact = sum(
        Fraction(c.compute_ms, 1000) * Fraction(Decimal(c.price_usd_per_hour)) / 3600 * 10**9 for c in charges
    )
    assert abs(total - exact) <= Fraction(len(charges), 2)
    # the USD string of the total is the exact sum of the USD strings
    assert Decimal(f"{total // 10**9}.{total % 10**9:09d}") == sum(
        Decimal(c.cost_usd_header) for c in charges
    )


@given(compute_ns, compute_ns)
def test_cost_is_monotonic_in_compute(a: int, b: int) -> None:
    prof = load_profiles().get("nvidia-h100")
    lo, hi = sorted((a, b))
    assert price(usage(lo), prof).cost_nanousd <= price(usage(hi), prof).cost_nanousd


def test_public_example_flux_10s_at_000012_per_second() -> None:
    prof = HardwareProfile.model_validate(
        {"name": "hf-example", "prices": [{"effective_from": "2025-01-01", "usd_per_second": "0.00012"}]}
    )
    charge = price(usage(10 * 10**9), prof)
    assert charge.cost_nanousd == 1_200_000
    assert charge.cost_usd_header == "0.001200000"
    assert charge.cost_usd == Decimal("0.0012")
    assert charge.compute_time_header == "10.000"
    assert charge.price_usd_per_hour == "0.432"  # 0.00012 * 3600, exact


def test_h100_and_cpu_basic_list_prices() -> None:
    catalog = load_profiles()
    h100 = price_in_catalog(usage(1_234_567_890), catalog)  # 1.235 s at 4.50 $/h = 1/800 $/s
    assert (h100.compute_ms, h100.cost_nanousd, h100.price_usd_per_hour) == (1235, 1_543_750, "4.50")
    cpu = price_in_catalog(usage(10_000_000, profile="cpu-basic"), catalog)  # 10 ms at 0.033 $/h
    assert cpu.cost_nanousd == 92  # 91.666... rounds half-up to 92
    assert cpu.compute_time_header == "0.010"


def test_price_in_force_by_effective_date_and_the_price_used_is_recorded() -> None:
    prof = profile_with(("2025-01-01", "3.60"), ("2026-06-01", "7.20"))
    before = price(usage(10**9, started_at=dt.datetime(2026, 5, 31, 23, 59, 59, tzinfo=UTC)), prof)
    after = price(usage(10**9, started_at=dt.datetime(2026, 6, 1, 0, 0, tzinfo=UTC)), prof)
    assert (before.cost_nanousd, before.price_usd_per_hour, before.price_effective_from) == (
        1_000_000,
        "3.60",
        dt.date(2025, 1, 1),
    )
    assert (after.cost_nanousd, after.price_usd_per_hour, after.price_effective_from) == (
        2_000_000,
        "7.20",
        dt.date(2026, 6, 1),
    )


def test_price_date_is_the_utc_date() -> None:
    prof = profile_with(("2025-01-01", "3.60"), ("2026-06-01", "7.20"))
    # 2026-06-01 01:00 in UTC+2 is still May 31st in UTC: the old price
    local = dt.datetime(2026, 6, 1, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert price(usage(10**9, started_at=local), prof).price_usd_per_hour == "3.60"


def test_usd_per_hour_of_a_per_second_price_is_exact() -> None:
    prof = HardwareProfile.model_validate(
        {"name": "p", "prices": [{"effective_from": "2025-01-01", "usd_per_second": "0.0000092"}]}
    )
    assert usd_per_hour_str(prof.prices[0]) == "0.03312"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (usage(1, profile="nope"), "unknown hardware profile"),
        (usage(1, started_at=dt.datetime(2020, 1, 1, tzinfo=UTC)), "no price in force"),
        (usage(-1), "compute_ns"),
        (UsageRecord("", T0, "m", "r", "t", "cpu-basic", 1), "request_id"),
        (UsageRecord("r", T0, "m", "r", "t", "cpu-basic", 1, status="weird"), "status"),
        (UsageRecord("r", T0, "m", "r", "t", "cpu-basic", 1, batch_size=0), "batch_size"),
    ],
)
def test_invalid_usage_is_a_typed_error(record: UsageRecord, message: str) -> None:
    with pytest.raises(InvalidUsage, match=message):
        price_in_catalog(record, load_profiles())


def test_no_binary_float_in_a_charge() -> None:
    charge = price_in_catalog(usage(987_654_321), ProfileCatalog(profiles=load_profiles().profiles))
    money = (charge.cost_nanousd, charge.compute_ms)
    assert all(type(v) is int for v in money)
    assert isinstance(charge, Charge)
