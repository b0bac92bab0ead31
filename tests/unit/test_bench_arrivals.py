"""The open loop's arrival process: Poisson at the requested rate, seeded, cut at the bounds.

The statistical checks use fixed seeds, so they are deterministic: each either always passes or always fails.
"""

from __future__ import annotations

import math

import pytest

from bench.runner import LoadError, LoadSpec, arrival_schedule, poisson_arrivals

# Kolmogorov-Smirnov critical value at alpha = 0.001 for large n: 1.95 / sqrt(n).
KS_C_ALPHA_0_001 = 1.95


def ks_statistic_exponential(samples: list[float], rate: float) -> float:
    """sup |F_n(x) - (1 - exp(-rate x))| over the sample."""
    xs = sorted(samples)
    n = len(xs)
    d = 0.0
    for i, x in enumerate(xs):
        cdf = 1.0 - math.exp(-rate * x)
        d = max(d, abs((i + 1) / n - cdf), abs(cdf - i / n))
    return d


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *times], times, strict=False)]


@pytest.mark.parametrize(("rate", "seed"), [(5.0, 0), (50.0, 1), (400.0, 7)])
def test_inter_arrival_times_are_exponential_at_the_requested_rate(rate: float, seed: int) -> None:
    times = arrival_schedule(rate, seed, requests=4000, duration_s=None)
    g = gaps(times)
    assert len(g) == 4000
    assert all(x > 0 for x in g)
    assert ks_statistic_exponential(g, rate) < KS_C_ALPHA_0_001 / math.sqrt(len(g))
    # the mean gap is 1/rate within 4 standard errors (std of an exponential = its mean)
    mean = sum(g) / len(g)
    assert abs(mean - 1 / rate) < 4 * (1 / rate) / math.sqrt(len(g))


def test_the_ks_check_rejects_the_wrong_rate() -> None:
    # the same arrivals tested against half or twice the rate fail: the check above has teeth
    g = gaps(arrival_schedule(50.0, 1, requests=4000, duration_s=None))
    bound = KS_C_ALPHA_0_001 / math.sqrt(len(g))
    assert ks_statistic_exponential(g, 25.0) > bound
    assert ks_statistic_exponential(g, 100.0) > bound


def test_counts_per_window_are_poisson() -> None:
    # chi-square of counts in 1 s windows against Poisson(rate): dispersion index near 1
    rate, seconds = 20.0, 500
    times = arrival_schedule(rate, 3, requests=None, duration_s=float(seconds))
    counts = [0] * seconds
    for t in times:
        counts[int(t)] += 1
    mean = sum(counts) / seconds
    assert abs(mean - rate) < 4 * math.sqrt(rate / seconds)
    chi2 = sum((c - mean) ** 2 for c in counts) / mean  # ~ chi-square with seconds-1 dof
    dof = seconds - 1
    assert abs(chi2 - dof) < 4 * math.sqrt(2 * dof)


def test_schedule_is_seeded_and_bounded() -> None:
    a = arrival_schedule(10.0, 42, requests=100, duration_s=None)
    assert a == arrival_schedule(10.0, 42, requests=100, duration_s=None)
    assert a != arrival_schedule(10.0, 43, requests=100, duration_s=None)
    assert a == sorted(a)
    by_time = arrival_schedule(10.0, 42, requests=None, duration_s=3.0)
    assert by_time and all(t < 3.0 for t in by_time)
    assert by_time == a[: len(by_time)]  # the same process, cut earlier
    both = arrival_schedule(10.0, 42, requests=5, duration_s=1000.0)
    assert len(both) == 5
    first = next(poisson_arrivals(10.0, 42))
    assert first == a[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "open", "rate_rps": 0, "requests": 1},
        {"mode": "open", "rate_rps": float("inf"), "requests": 1},
        {"mode": "closed", "concurrency": 0, "requests": 1},
        {"mode": "closed"},  # unbounded
        {"mode": "closed", "requests": 0},
        {"mode": "closed", "duration_s": -1.0},
        {"mode": "sideways", "requests": 1},
    ],
)
def test_load_spec_refuses_bad_options(kwargs: dict) -> None:
    with pytest.raises(LoadError) as err:
        LoadSpec(**kwargs)
    assert err.value.status_code == 400
