"""Exact pricing: compute time x the profile's price in force, in integer nano-USD.

Rounding, stated once:

1. Compute is billed in whole milliseconds, rounded half-up from the measured nanoseconds (what x-compute-time
   shows): 1.4999 ms bills 1 ms, 1.5 ms bills 2 ms, under 0.5 ms bills 0 ms.
2. The cost is those milliseconds times the exact price per second (a fraction: $4.50/h is exactly 1/800 $/s),
   rounded half-up to a whole nano-USD. So each charge is within 0.5 nano-USD of the exact product of its
   billed milliseconds and its price, and sums of charges are exact integer sums.
3. The price is the profile's price point in force on the UTC date of `started_at` (see `PricePoint`).

No binary floating point anywhere: integers, `Fraction` and `Decimal` only.
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from hardware_profiles import HardwareProfile, PricePoint, ProfileCatalog
from metering.errors import InvalidUsage
from metering.records import Charge, UsageRecord

NANO = 10**9
NS_PER_MS = 10**6
MS_PER_SECOND = 1000
SECONDS_PER_HOUR = 3600


def _div_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half-up, for non-negative integers (integer arithmetic only)."""
    if numerator < 0 or denominator <= 0:
        raise ValueError("cannot price a negative amount")
    return (2 * numerator + denominator) // (2 * denominator)


def billed_ms(compute_ns: int) -> int:
    """Billed whole milliseconds of `compute_ns` nanoseconds, rounded half-up."""
    return _div_half_up(compute_ns, NS_PER_MS)


def cost_nanousd(compute_ms: int, usd_per_second: Fraction) -> int:
    """The cost of `compute_ms` milliseconds at `usd_per_second`, in nano-USD rounded half-up."""
    # compute_ms / 1000 * (p / q) * 10^9 = compute_ms * p * 10^6 / q, exactly
    return _div_half_up(
        compute_ms * usd_per_second.numerator * (NANO // MS_PER_SECOND), usd_per_second.denominator
    )


def usd_per_hour_str(point: PricePoint) -> str:
    """The price point per hour as an exact decimal string (a per-second price times 3600 stays exact)."""
    if point.usd_per_hour is not None:
        return format(point.usd_per_hour, "f")  # as written in the catalog: "4.50"
    assert point.usd_per_second is not None
    with localcontext() as ctx:
        ctx.prec = 60
        return _plain(point.usd_per_second * SECONDS_PER_HOUR)


# What pricing needs of a price point, worked out once per point ($/s as a fraction, $/h as written): keyed by
# id() and checked by identity and by the prices themselves, so a changed or reloaded point is worked out again.
_POINTS: dict[int, tuple[PricePoint, Any, Any, Fraction, str]] = {}


def _point_terms(point: PricePoint) -> tuple[Fraction, str]:
    cached = _POINTS.get(id(point))
    if (
        cached is None
        or cached[0] is not point
        or cached[1] != point.usd_per_hour
        or cached[2] != point.usd_per_second
    ):
        if len(_POINTS) > 1024:
            _POINTS.clear()
        cached = (
            point,
            point.usd_per_hour,
            point.usd_per_second,
            point.usd_per_second_exact,
            usd_per_hour_str(point),
        )
        _POINTS[id(point)] = cached
    return cached[3], cached[4]


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def price(usage: UsageRecord, profile: HardwareProfile) -> Charge:
    """Price one usage record with the profile's price in force when the request started."""
    try:
        point = profile.price_at(usage.started_at_utc)
    except LookupError as err:
        raise InvalidUsage(str(err)) from None
    per_second, per_hour = _point_terms(point)
    ms = billed_ms(usage.compute_ns)
    return Charge(
        usage=usage,
        compute_ms=ms,
        price_usd_per_hour=per_hour,
        price_effective_from=point.effective_from,
        cost_nanousd=cost_nanousd(ms, per_second),
    )


def price_in_catalog(usage: UsageRecord, profiles: ProfileCatalog) -> Charge:
    """Validate `usage`, find its profile in the catalog and price it; InvalidUsage if impossible."""
    usage.validate()
    if usage.hardware_profile not in profiles:
        raise InvalidUsage(
            f"unknown hardware profile {usage.hardware_profile!r} (known: {', '.join(profiles.names())})"
        )
    return price(usage, profiles.get(usage.hardware_profile))
