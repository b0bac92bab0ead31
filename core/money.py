"""Money is an integer number of nano-USD (10^-9 USD) everywhere: prices, charges, credits, limits."""

from __future__ import annotations

NANOUSD_PER_USD = 10**9  # $1.00


def usd_str(nanousd: int) -> str:
    """Nano-USD as an exact decimal string of USD with 9 decimals ("0.001250000")."""
    sign = "-" if nanousd < 0 else ""
    whole, frac = divmod(abs(nanousd), NANOUSD_PER_USD)
    return f"{sign}{whole}.{frac:09d}"
