"""Batch traceability on the charge: which batch a request ran in and the whole batch's compute time."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.timing import split_batch_ns
from hardware_profiles import load_profiles
from metering.errors import InvalidUsage
from metering.pricing import price_in_catalog
from metering.records import Charge, UsageRecord

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CATALOG = load_profiles()


def usage(compute_ns: int, **kw) -> UsageRecord:
    return UsageRecord("rid", T0, "m", "r", "feature-extraction", "cpu-basic", compute_ns, **kw)


def test_batch_fields_default_to_none_and_round_trip_through_the_spool_format() -> None:
    alone = price_in_catalog(usage(5_000_000), CATALOG)
    assert alone.usage.batch_id is None and alone.usage.batch_compute_ns is None
    batched = price_in_catalog(
        usage(5_000_000, batch_size=3, batch_id="b" * 32, batch_compute_ns=15_000_001), CATALOG
    )
    data = json.loads(json.dumps(batched.to_dict()))
    assert data["batch_id"] == "b" * 32 and data["batch_compute_ns"] == 15_000_001
    assert Charge.from_dict(data) == batched


def test_a_charge_spooled_before_the_batch_fields_existed_still_reads() -> None:
    data = price_in_catalog(usage(7_000_000), CATALOG).to_dict()
    del data["batch_id"], data["batch_compute_ns"]  # a spool line written by the previous version
    again = Charge.from_dict(data)
    assert again.usage.batch_id is None and again.usage.batch_compute_ns is None
    assert again.cost_nanousd == price_in_catalog(usage(7_000_000), CATALOG).cost_nanousd


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"batch_id": ""}, "batch_id"),
        ({"batch_id": "x" * 65}, "batch_id"),
        ({"batch_compute_ns": 4_999_999}, "batch_compute_ns"),  # a share larger than its batch
        ({"batch_compute_ns": -1}, "batch_compute_ns"),
        ({"batch_compute_ns": 1.5e7}, "batch_compute_ns"),  # not an integer
    ],
)
def test_invalid_batch_fields_are_refused(kw, match) -> None:
    with pytest.raises(InvalidUsage, match=match):
        price_in_catalog(usage(5_000_000, **kw), CATALOG)


@given(
    st.integers(min_value=0, max_value=10**12),
    st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=32),
)
def test_every_share_of_a_batch_is_a_valid_charge_and_they_add_up(batch_ns: int, weights) -> None:
    shares = split_batch_ns(batch_ns, weights)
    charges = [
        price_in_catalog(
            usage(s, batch_size=len(shares), batch_id="batch", batch_compute_ns=batch_ns), CATALOG
        )
        for s in shares
    ]
    assert sum(c.usage.compute_ns for c in charges) == batch_ns
    assert all(c.usage.batch_compute_ns == batch_ns for c in charges)
