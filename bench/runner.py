"""Load generators: closed loop (N clients, each sends again when answered) and open loop (Poisson arrivals).

Every run is bounded by a request count, a duration or both, and every request by a timeout. In open
loop a request is launched at its scheduled arrival time whatever the server is doing, and its latency is
measured from that time, so a slow server cannot hide its queue (no coordinated omission). `max_in_flight`
only bounds the client's own resources: a request waiting for a free slot is still timed from its arrival.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bench.client import RequestResult, send
from bench.workloads import Workload

CLOSED = "closed"
OPEN = "open"


class LoadError(ValueError):
    """The load options are inconsistent; the message names the option."""

    status_code = 400


@dataclass(frozen=True)
class LoadSpec:
    """One load level: closed loop at `concurrency` or open loop at `rate_rps`, bounded in count or time."""

    mode: str = CLOSED
    concurrency: int = 1
    rate_rps: float | None = None
    requests: int | None = None
    duration_s: float | None = None
    warmup_requests: int = 0
    timeout_s: float = 60.0
    seed: int = 0
    max_in_flight: int = 1024

    def __post_init__(self) -> None:
        if self.mode not in (CLOSED, OPEN):
            raise LoadError(f"mode must be {CLOSED!r} or {OPEN!r}")
        if self.requests is None and self.duration_s is None:
            raise LoadError("give --requests or --duration (or both): a run must be bounded")
        if self.requests is not None and self.requests < 1:
            raise LoadError("--requests must be at least 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise LoadError("--duration must be positive")
        if self.mode == CLOSED and self.concurrency < 1:
            raise LoadError("--concurrency must be at least 1")
        if self.mode == OPEN and not (self.rate_rps and self.rate_rps > 0 and math.isfinite(self.rate_rps)):
            raise LoadError("--rate must be a positive number of requests per second")
        if self.warmup_requests < 0 or self.timeout_s <= 0 or self.max_in_flight < 1:
            raise LoadError("--warmup must be >= 0, --timeout > 0 and --max-in-flight >= 1")

    @property
    def level(self) -> float:
        """The load level: concurrency in closed loop, arrival rate in open loop."""
        return float(self.concurrency) if self.mode == CLOSED else float(self.rate_rps or 0)


def poisson_arrivals(rate_rps: float, seed: int) -> Iterator[float]:
    """Arrival times (seconds from 0) of a Poisson process: exponential gaps with mean 1/rate, seeded."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        t += rng.expovariate(rate_rps)
        yield t


def arrival_schedule(
    rate_rps: float, seed: int, *, requests: int | None, duration_s: float | None
) -> list[float]:
    """The open loop's arrival times, cut at `requests` arrivals and/or before `duration_s`."""
    out: list[float] = []
    for t in poisson_arrivals(rate_rps, seed):
        if (requests is not None and len(out) >= requests) or (duration_s is not None and t >= duration_s):
            break
        out.append(t)
    return out


@dataclass
class PointResult:
    """The requests of one load level, and the wall time they took."""

    load: LoadSpec
    results: list[RequestResult]
    wall_s: float  # from the start of the measured phase to the last answer
    started_at_unix_s: float


Progress = Callable[[RequestResult], None]


async def run_point(
    base_url: str,
    workload: Workload,
    load: LoadSpec,
    *,
    token: str | None = None,
    progress: Progress | None = None,
) -> PointResult:
    """Warm up (uncounted), then run one load level and return every measured request."""
    import httpx

    slots = load.concurrency if load.mode == CLOSED else load.max_in_flight
    limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
    # trust_env=False: the target is exactly the URL given, never a proxy from the environment
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"), limits=limits, timeout=load.timeout_s, trust_env=False
    ) as client:
        if load.warmup_requests:
            await _warmup(client, workload, load, token)
        started_at = time.time()
        t0 = time.perf_counter()
        if load.mode == CLOSED:
            results = await _closed_loop(client, workload, load, t0, token, progress)
        else:
            results = await _open_loop(client, workload, load, t0, token, progress)
        wall_s = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return PointResult(load, results, wall_s, started_at)


async def _warmup(client, workload: Workload, load: LoadSpec, token: str | None) -> None:
    t0 = time.perf_counter()
    width = max(1, min(load.concurrency if load.mode == CLOSED else 4, load.warmup_requests))
    queue = iter(range(load.warmup_requests))

    async def worker() -> None:
        for i in queue:
            await send(client, workload.request(i), index=-1 - i, scheduled_s=0.0, t0=t0, token=token)

    await asyncio.gather(*(worker() for _ in range(width)))


async def _closed_loop(client, workload, load: LoadSpec, t0: float, token, progress) -> list[RequestResult]:
    results: list[RequestResult] = []
    counter = iter(range(load.requests if load.requests is not None else 2**62))
    deadline = None if load.duration_s is None else t0 + load.duration_s

    async def worker() -> None:
        for i in counter:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            now = time.perf_counter() - t0
            r = await send(client, workload.request(i), index=i, scheduled_s=now, t0=t0, token=token)
            results.append(r)
            if progress is not None:
                progress(r)

    await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    return results


async def _open_loop(client, workload, load: LoadSpec, t0: float, token, progress) -> list[RequestResult]:
    assert load.rate_rps is not None
    schedule = arrival_schedule(load.rate_rps, load.seed, requests=load.requests, duration_s=load.duration_s)
    slots = asyncio.Semaphore(load.max_in_flight)
    results: list[RequestResult] = []

    async def one(i: int, due_s: float) -> None:
        async with slots:
            r = await send(client, workload.request(i), index=i, scheduled_s=due_s, t0=t0, token=token)
        results.append(r)
        if progress is not None:
            progress(r)

    tasks = []
    for i, due_s in enumerate(schedule):
        delay = t0 + due_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due_s)))
    await asyncio.gather(*tasks)
    return results
