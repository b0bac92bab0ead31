"""Exact pricing: rounding bounds, price points by date, totals exact (hypothesis property tests)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.timing import split_batch_ns
from hardware_profiles import HardwareProfile, ProfileCatalog, load_profiles
from metering.errors import InvalidUsage
from metering.pricing import (
    billed_ms,
    cost_nanousd,
    price,
    price_in_catalog,
    slice_cost_nanousd,
    usd_per_hour_str,
)
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


@given(compute_ns, prices_usd_per_hour)
def test_cost_is_within_half_a_nanodollar_of_exact(ns: int, usd_h: Decimal) -> None:
    per_s = Fraction(usd_h) / 3600
    exact = Fraction(ns, 10**9) * per_s * 10**9
    cost = cost_nanousd(ns, per_s)
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
        Fraction(c.usage.compute_ns, 10**9) * Fraction(Decimal(c.price_usd_per_hour)) / 3600 * 10**9
        for c in charges
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
    h100 = price_in_catalog(usage(1_234_567_890), catalog)  # 1.23456789 s at 4.50 $/h = 1/800 $/s
    assert (h100.compute_ms, h100.cost_nanousd, h100.price_usd_per_hour) == (1235, 1_543_210, "4.50")
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


def batch_usages(total_ns: int, weights: list[int]) -> list[UsageRecord]:
    """The usage records of one batch, as the executor times them (shares and offsets)."""
    records, offset = [], 0
    for i, share in enumerate(split_batch_ns(total_ns, weights)):
        record = usage(share, profile="cpu-basic", rid=f"b{i}")
        record.batch_size, record.batch_compute_ns, record.batch_offset_ns = len(weights), total_ns, offset
        records.append(record)
        offset += share
    return records


def test_a_small_share_of_a_batch_is_never_free() -> None:
    """256 requests in one 20 ms batch on cpu-basic: each share is ~78 us, under half a millisecond."""
    charges = [price_in_catalog(u, load_profiles(), 1) for u in batch_usages(20_000_000, [9] * 256)]
    assert all(c.cost_nanousd >= 1 for c in charges)
    assert all(c.compute_time_header == "0.000" for c in charges)  # the display rounds; the bill does not


@given(
    st.integers(min_value=0, max_value=10**11),
    st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=64),
    prices_usd_per_hour,
)
def test_the_charges_of_a_batch_add_up_to_the_batch_cost(
    total: int, weights: list[int], usd_h: Decimal
) -> None:
    prof = profile_with(("2025-01-01", str(usd_h)))
    per_s = Fraction(usd_h) / 3600
    records = batch_usages(total, weights)
    assert sum(price(u, prof).cost_nanousd for u in records) == cost_nanousd(total, per_s)
    # with a minimum: the batch cost plus each top-up, and no charge of a share that ran is 0 at a price > 0
    with_min = [price(u, prof, 1).cost_nanousd for u in records]
    top_ups = sum(1 for u in records if u.compute_ns > 0 and per_s > 0 and price(u, prof).cost_nanousd == 0)
    assert sum(with_min) == cost_nanousd(total, per_s) + top_ups
    assert all(c >= 1 for c, u in zip(with_min, records, strict=True) if u.compute_ns and per_s)


def test_slice_cost_examples() -> None:
    per_s = Fraction(1, 800)  # 4.50 $/h: 1.25 nano-USD per microsecond
    assert slice_cost_nanousd(0, 1_000, per_s) == 1  # 1.25 rounds to 1
    assert slice_cost_nanousd(1_000, 1_000, per_s) == 2  # 2.5 -> 3, minus 1
    assert slice_cost_nanousd(0, 100, per_s) == 0  # 0.125: nothing without a minimum
    assert slice_cost_nanousd(0, 100, per_s, min_charge_nanousd=1) == 1
    assert slice_cost_nanousd(0, 0, per_s, min_charge_nanousd=1) == 0  # no compute, no minimum
    assert slice_cost_nanousd(0, 10**9, Fraction(0), min_charge_nanousd=1) == 0  # a free profile stays free


def test_a_batch_offset_needs_the_batch_time_and_stays_inside_it() -> None:
    record = usage(10, profile="cpu-basic")
    record.batch_offset_ns = 5
    with pytest.raises(InvalidUsage, match="batch_offset_ns needs batch_compute_ns"):
        price_in_catalog(record, load_profiles())
    record.batch_compute_ns = 12
    with pytest.raises(InvalidUsage, match="batch_compute_ns must be"):
        price_in_catalog(record, load_profiles())
    record.batch_compute_ns = 15
    assert price_in_catalog(record, load_profiles()).cost_nanousd >= 0
