"""Phase timings measured on the replica, on a monotonic clock, in integer nanoseconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timings:
    """What the replica measured for one request.

    `compute_ns` is the billed phase: the replica's own work from the start of decoding the request to the end
    of post-processing (device-synchronised). `queue_ns` is the wait on the replica before that work began.
    For a request that ran in a batch, `compute_ns` is this request's share of `batch_compute_ns`.
    """

    compute_ns: int
    queue_ns: int = 0
    batch_size: int = 1
    batch_compute_ns: int | None = None
    batch_offset_ns: int = 0  # where this request's share starts in the batch (what metering prices)
    work_units: int = 1
    batch_id: str | None = None
    extra: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.compute_ns < 0 or self.queue_ns < 0:
            raise ValueError("timings cannot be negative")


class Stopwatch:
    """A monotonic stopwatch; `sync` runs before each reading (e.g. torch.cuda.synchronize on a GPU)."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self._sync = sync
        self._start_ns: int | None = None

    def start(self) -> Stopwatch:
        if self._sync is not None:
            self._sync()
        self._start_ns = time.perf_counter_ns()
        return self

    def elapsed_ns(self) -> int:
        if self._start_ns is None:
            raise RuntimeError("stopwatch not started")
        if self._sync is not None:
            self._sync()
        return time.perf_counter_ns() - self._start_ns


def split_batch_ns(total_ns: int, weights: list[int]) -> list[int]:
    """Split a batch's compute time by each request's share of the work; the parts add up to `total_ns`.

    Largest-remainder apportionment in integers: each part is floor(total * w / sum(w)), and the leftover
    nanoseconds go one each to the largest remainders (ties to the earlier request). Zero weights count as 1.
    """
    if total_ns < 0:
        raise ValueError("total_ns cannot be negative")
    if not weights:
        return []
    if any(w < 0 for w in weights):
        raise ValueError("weights cannot be negative")
    ws = [max(1, int(w)) for w in weights]
    total_w = sum(ws)
    parts = [total_ns * w // total_w for w in ws]
    remainders = [(total_ns * w % total_w, -i) for i, w in enumerate(ws)]
    leftover = total_ns - sum(parts)
    for _, neg_i in sorted(remainders, reverse=True)[:leftover]:
        parts[-neg_i] += 1
    return parts
