"""Batch splitting: the shares add up to the batch time exactly and follow the work (hypothesis)."""

from __future__ import annotations

from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.timing import Stopwatch, Timings, split_batch_ns

totals = st.integers(min_value=0, max_value=10**13)
weights = st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=64)


@given(totals, weights)
def test_shares_sum_exactly_to_the_batch_time(total_ns: int, ws: list[int]) -> None:
    parts = split_batch_ns(total_ns, ws)
    assert len(parts) == len(ws)
    assert sum(parts) == total_ns
    assert all(isinstance(p, int) and p >= 0 for p in parts)


@given(totals, weights)
def test_each_share_is_within_one_nanosecond_of_its_exact_share(total_ns: int, ws: list[int]) -> None:
    eff = [max(1, w) for w in ws]  # zero work counts as one unit
    parts = split_batch_ns(total_ns, ws)
    for part, w in zip(parts, eff, strict=True):
        assert abs(part - Fraction(total_ns * w, sum(eff))) < 1


@given(totals, st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=1000))
def test_equal_work_gets_equal_shares(total_ns: int, k: int, w: int) -> None:
    parts = split_batch_ns(total_ns, [w] * k)
    assert max(parts) - min(parts) <= 1
    assert parts == sorted(parts, reverse=True)  # leftover nanoseconds go to the earlier requests


@given(totals, weights)
def test_more_work_never_gets_a_smaller_share(total_ns: int, ws: list[int]) -> None:
    parts = split_batch_ns(total_ns, ws)
    pairs = sorted(zip([max(1, w) for w in ws], parts, strict=True))
    for (w1, p1), (w2, p2) in pairwise(pairs):
        if w1 < w2:
            assert p1 <= p2 + 1


def test_examples_and_errors() -> None:
    assert split_batch_ns(10, [1, 1, 1]) == [4, 3, 3]
    assert split_batch_ns(100, [1, 3]) == [25, 75]
    assert split_batch_ns(5, []) == []
    with pytest.raises(ValueError):
        split_batch_ns(-1, [1])
    with pytest.raises(ValueError):
        split_batch_ns(1, [1, -2])


def test_timings_reject_negative_times_and_stopwatch_needs_start() -> None:
    with pytest.raises(ValueError):
        Timings(compute_ns=-1)
    with pytest.raises(RuntimeError):
        Stopwatch().elapsed_ns()
    synced = []
    watch = Stopwatch(sync=lambda: synced.append(1)).start()
    assert watch.elapsed_ns() >= 0
    assert len(synced) == 2  # the device is synchronised before each reading
