"""Exact pricing: compute time x the profile's price in force, in integer nano-USD.

Rounding, stated once:

1. Compute is billed in the measured nanoseconds: the cost is compute_ns x the exact price per second (a
   fraction: $4.50/h is exactly 1/800 $/s; one nanosecond at $1/s is one nano-USD), rounded half-up to a whole
   nano-USD. A request alone is within 0.5 nano-USD of the exact product.
2. A request that shared a batch is priced as its slice of the batch, [offset, offset + compute_ns) of the
   batch's compute time: cost(offset + compute_ns) - cost(offset). The slices of one batch telescope, so the
   charges of a batch add up exactly to the batch's own rounded cost, and no share is lost to rounding.
3. A request that ran any compute on a priced profile costs at least `min_charge_nanousd` (the settings' default
   is 1, the smallest unit of the cost look-up): a batch's charges then add up to its cost plus what the
   minimums added, each at most the minimum.
4. Whole milliseconds (half-up) are only for display: x-compute-time, 3 decimals. The ledger keeps nanoseconds.
5. The price is the profile's price point in force on the UTC date of `started_at` (see `PricePoint`).

No binary floating point anywhere: integers, `Fraction` and `Decimal` only.
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from hardware_profiles import HardwareProfile, PricePoint, ProfileCatalog
from metering.errors import InvalidUsage
from metering.records import Charge, UsageRecord

NS_PER_MS = 10**6
SECONDS_PER_HOUR = 3600


def _div_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half-up, for non-negative integers (integer arithmetic only)."""
    if numerator < 0 or denominator <= 0:
        raise ValueError("cannot price a negative amount")
    return (2 * numerator + denominator) // (2 * denominator)


def billed_ms(compute_ns: int) -> int:
    """Whole milliseconds of `compute_ns` nanoseconds, rounded half-up: what x-compute-time shows."""
    return _div_half_up(compute_ns, NS_PER_MS)


def cost_nanousd(compute_ns: int, usd_per_second: Fraction) -> int:
    """The cost of `compute_ns` nanoseconds at `usd_per_second`, in nano-USD rounded half-up."""
    # compute_ns / 10^9 * (p / q) * 10^9 = compute_ns * p / q, exactly
    return _div_half_up(compute_ns * usd_per_second.numerator, usd_per_second.denominator)


def slice_cost_nanousd(
    offset_ns: int, compute_ns: int, usd_per_second: Fraction, min_charge_nanousd: int = 0
) -> int:
    """The cost of the slice [offset_ns, offset_ns + compute_ns) of a batch's compute time (offset 0: a
    request alone), at least `min_charge_nanousd` when it ran any compute at a price above zero."""
    cost = cost_nanousd(offset_ns + compute_ns, usd_per_second)
    if offset_ns:
        cost -= cost_nanousd(offset_ns, usd_per_second)
    if compute_ns > 0 and usd_per_second > 0 and cost < min_charge_nanousd:
        return min_charge_nanousd
    return cost


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


def usd_per_second(point: PricePoint) -> Fraction:
    """The point's price per second, exact: worked out once per point (the same object until the point changes, so
    a caller may key its own figures on it)."""
    return _point_terms(point)[0]


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def price(usage: UsageRecord, profile: HardwareProfile, min_charge_nanousd: int = 0) -> Charge:
    """Price one usage record with the profile's price in force when the request started."""
    try:
        point = profile.price_at(usage.started_at_utc)
    except LookupError as err:
        raise InvalidUsage(str(err)) from None
    per_second, per_hour = _point_terms(point)
    return Charge(
        usage=usage,
        compute_ms=billed_ms(usage.compute_ns),
        price_usd_per_hour=per_hour,
        price_effective_from=point.effective_from,
        cost_nanousd=slice_cost_nanousd(
            usage.batch_offset_ns, usage.compute_ns, per_second, min_charge_nanousd
        ),
    )


def price_in_catalog(usage: UsageRecord, profiles: ProfileCatalog, min_charge_nanousd: int = 0) -> Charge:
    """Validate `usage`, find its profile in the catalog and price it; InvalidUsage if impossible."""
    usage.validate()
    if usage.hardware_profile not in profiles:
        raise InvalidUsage(
            f"unknown hardware profile {usage.hardware_profile!r} (known: {', '.join(profiles.names())})"
        )
    return price(usage, profiles.get(usage.hardware_profile), min_charge_nanousd)
