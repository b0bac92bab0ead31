"""Exact pricing: compute time x the profile's price in force, in integer nano-USD.

Rounding, stated once: compute is billed in whole milliseconds, rounded half-up from the measured nanoseconds
(what x-compute-time shows); the cost is that many milliseconds times the exact price per second, rounded
half-up to a whole nano-USD. No binary floating point anywhere.
"""

from __future__ import annotations

from fractions import Fraction

from hardware_profiles import HardwareProfile
from metering.records import Charge, UsageRecord

NANO = 10**9
NS_PER_MS = 10**6


def round_half_up(value: Fraction) -> int:
    if value < 0:
        raise ValueError("cannot price a negative amount")
    return int(value + Fraction(1, 2))


def billed_ms(compute_ns: int) -> int:
    return round_half_up(Fraction(compute_ns, NS_PER_MS))


def cost_nanousd(compute_ms: int, usd_per_second: Fraction) -> int:
    return round_half_up(Fraction(compute_ms, 1000) * usd_per_second * NANO)


def price(usage: UsageRecord, profile: HardwareProfile) -> Charge:
    """Price one usage record with the profile's price in force when the request started."""
    point = profile.price_at(usage.started_at)
    ms = billed_ms(usage.compute_ns)
    usd_per_hour = (
        point.usd_per_hour if point.usd_per_hour is not None else point.usd_per_second_exact * 3600
    )
    return Charge(
        usage=usage,
        compute_ms=ms,
        price_usd_per_hour=str(usd_per_hour) if not isinstance(usd_per_hour, Fraction)
        else f"{usd_per_hour.numerator}/{usd_per_hour.denominator}",
        price_effective_from=point.effective_from,
        cost_nanousd=cost_nanousd(ms, point.usd_per_second_exact),
    )
