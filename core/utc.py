"""Times are timezone-aware UTC: what the database gives back (SQLite drops the zone) and what callers give."""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


def as_utc(value: dt.datetime) -> dt.datetime:
    """A datetime in aware UTC (a naive one is taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def to_utc(value: dt.datetime | dt.date | None) -> dt.datetime | None:
    """A date (midnight UTC) or datetime (naive means UTC) as an aware UTC datetime; None stays None."""
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    return as_utc(value)
