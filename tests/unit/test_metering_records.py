"""The charge record: every field the spec lists, JSON round trip, header formats."""

from __future__ import annotations

import datetime as dt
import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.money import usd_str
from hardware_profiles import load_profiles
from metering.ledger import _ROW_COLUMNS, charge_to_row, spooled_row
from metering.pricing import price_in_catalog
from metering.records import STATUS_CLIENT_DISCONNECTED, Charge, UsageRecord, seconds_str, with_derived
from metering.spool import decode_line, encode_line

UTC = dt.timezone.utc
CATALOG = load_profiles()


def test_charge_dict_carries_every_field_the_spec_lists() -> None:
    u = UsageRecord(
        "6f1c0a7e-1111-4a4a-9c9c-000000000001",
        dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "org/model",
        "abc123",
        "text-generation",
        "nvidia-l4",
        compute_ns=2_345_678_901,
        queue_ns=12_000_000,
        total_ns=2_400_000_000,
        batch_size=4,
        input_characters=42,
        user="alice",
        billed_account="acme",
        status=STATUS_CLIENT_DISCONNECTED,
    )
    data = price_in_catalog(u, CATALOG).to_dict()
    expected = {
        "request_id": u.request_id,
        "started_at": "2026-03-01T12:00:00.123456Z",
        "model_id": "org/model",
        "revision": "abc123",
        "task": "text-generation",
        "hardware_profile": "nvidia-l4",
        "price_usd_per_hour": "0.80",
        "price_effective_from": "2025-01-01",
        "compute_ms": 2346,
        "compute_seconds": "2.346",
        "queue_seconds": "0.012000",
        "total_seconds": "2.400000",
        "batch_size": 4,
        "input_characters": 42,
        "input_images": 0,
        "input_audio_seconds": 0.0,
        "cost_nanousd": 521_262,  # 2.345678901 s * 0.8/3600 $/s = 521261.98 nano-USD (billed from the ns)
        "cost_usd": "0.000521262",
        "user": "alice",
        "billed_account": "acme",
        "status": "client_disconnected",
    }
    assert {k: data[k] for k in expected} == expected
    json.dumps(data)  # JSON-ready as is


@given(
    st.integers(min_value=0, max_value=10**13),
    st.integers(min_value=0, max_value=10**12),
    st.datetimes(min_value=dt.datetime(2025, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    st.text(min_size=1, max_size=40),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
def test_to_dict_from_dict_round_trip(
    compute: int, queue: int, when: dt.datetime, account: str, extra
) -> None:
    u = UsageRecord(
        "rid", when.replace(tzinfo=UTC), "m", "r", "t", "nvidia-h100", compute, queue_ns=queue,
        billed_account=account, extra=extra,
    )  # fmt: skip
    charge = price_in_catalog(u, CATALOG)
    again = Charge.from_dict(json.loads(json.dumps(charge.to_dict())))
    assert again == charge
    assert pickle.loads(pickle.dumps(charge)) == charge


def row_values(row: dict) -> list:
    return [row[name] for name in _ROW_COLUMNS]


@given(
    st.integers(min_value=0, max_value=10**13),
    st.datetimes(min_value=dt.datetime(2025, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    st.sampled_from([None, UTC, dt.timezone(dt.timedelta(hours=-5))]),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.booleans(),
    st.sets(st.sampled_from(["queue_ns", "batch_id", "batch_compute_ns", "user", "extra", "status"])),
)
def test_the_drains_row_of_a_spooled_record_is_the_charges_row(
    compute: int, when: dt.datetime, zone, extra, batched: bool, dropped: set[str]
) -> None:
    """The node drainer builds ledger rows straight from spool records (spooled_row): the same values as the row of
    the Charge the record is of, for aware and naive times, batch fields, extras, and optional fields left out."""
    u = UsageRecord(
        "rid", when.replace(tzinfo=zone), "m", "r", "t", "cpu-basic", compute, queue_ns=7, total_ns=9,
        batch_size=4 if batched else 1, batch_id="b1" if batched else None,
        batch_compute_ns=compute * 4 if batched else None, input_characters=3, input_audio_seconds=1.5,
        user="alice", billed_account="org", client_request_id="c-1", extra=extra,
    )  # fmt: skip
    charge = price_in_catalog(u, CATALOG)
    expected = row_values(charge_to_row(charge, None))  # type: ignore[arg-type]
    # as spooled now, and as an older spool wrote it (the whole to_dict)
    for data in (decode_line(encode_line(charge.spool_record())), json.loads(json.dumps(charge.to_dict()))):
        for name in dropped:  # lines written without a default field
            data.pop(name)
        assert spooled_row(data) == row_values(charge_to_row(Charge.from_dict(data), None))  # type: ignore[arg-type]
        if not dropped:
            assert spooled_row(data) == expected


@given(
    st.integers(min_value=0, max_value=10**13),
    st.datetimes(min_value=dt.datetime(2025, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    st.sampled_from([None, UTC, dt.timezone(dt.timedelta(hours=-5))]),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
def test_a_spooled_record_gives_back_the_whole_charge(compute: int, when: dt.datetime, zone, extra) -> None:
    """The spool keeps no derived field (the replica's CPU): with_derived, on the drainer's side, gives back the
    very dict to_dict gives, and leaves an older spool's whole record as it is."""
    u = UsageRecord(
        "rid", when.replace(tzinfo=zone), "m", "r", "t", "nvidia-h100", compute, queue_ns=1234567,
        total_ns=7654321, billed_account="org", extra=extra,
    )  # fmt: skip
    charge = price_in_catalog(u, CATALOG)
    whole = json.loads(json.dumps(charge.to_dict()))
    spooled = decode_line(encode_line(charge.spool_record()))
    assert "cost_usd" not in spooled and "compute_seconds" not in spooled
    assert with_derived(spooled) == whole
    assert with_derived(whole) is whole
    assert Charge.from_dict(spooled) == Charge.from_dict(whole)
    with pytest.raises(TypeError):
        with_derived(["not", "a", "charge"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"request_id": None},  # removed
        {"started_at": "yesterday"},
        {"started_at": 12},
        {"price_effective_from": "2026-13-01"},
        {"compute_ms": "many"},
        {"cost_nanousd": None},
        {"input_audio_seconds": "long"},
    ],
)
def test_a_record_that_is_no_charge_is_refused_by_both_readings(change: dict) -> None:
    u = UsageRecord("rid", dt.datetime(2026, 1, 1, tzinfo=UTC), "m", "r", "t", "cpu-basic", 5)
    data = price_in_catalog(u, CATALOG).to_dict()
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    errors = (KeyError, TypeError, ValueError, AttributeError)
    with pytest.raises(errors):
        spooled_row(data)
    with pytest.raises(errors):
        charge_to_row(Charge.from_dict(data), None)  # type: ignore[arg-type]


def test_naive_started_at_is_taken_as_utc() -> None:
    u = UsageRecord("r", dt.datetime(2026, 1, 1, 5), "m", "r", "t", "cpu-basic", 1)
    assert u.started_at_utc == dt.datetime(2026, 1, 1, 5, tzinfo=UTC)


def test_header_and_amount_formats() -> None:
    charge = price_in_catalog(
        UsageRecord("r", dt.datetime(2026, 1, 1), "m", "r", "t", "nvidia-h100", 593_400_000), CATALOG
    )
    assert charge.compute_time_header == "0.593"
    assert charge.cost_usd_header == "0.000741750"  # 593.4 ms (not the 593 ms shown) at 1/800 $/s
    assert usd_str(12_345_678_901) == "12.345678901"
    assert usd_str(-5) == "-0.000000005"
    assert seconds_str(1_234_567_891, 3) == "1.234"


@given(
    when=st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)),
    zone=st.sampled_from([None, dt.timezone.utc, dt.timezone(dt.timedelta(hours=5, minutes=30))]),
)
def test_the_drains_quick_sqlite_processors_write_what_sqlalchemys_write(when: dt.datetime, zone) -> None:
    """On SQLite the drain formats started_at, day and the price date with the datetime module's C code
    (`_quick_processor`): the same text as SQLAlchemy's own bind processors, or the ledger's range queries and
    reports would compare strings of two shapes."""
    from sqlalchemy import Date
    from sqlalchemy.dialects import sqlite

    from metering.ledger import UTCDateTime, _quick_processor

    dialect = sqlite.dialect()
    stamp = when.replace(tzinfo=zone)
    for column_type, value in ((UTCDateTime(), stamp), (Date(), stamp.date()), (Date(), stamp)):
        quick = _quick_processor(column_type, dialect)
        assert quick is not None
        assert quick(value) == column_type._cached_bind_processor(dialect)(value)
