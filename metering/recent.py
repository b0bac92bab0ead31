"""The requests of the last minute, per model, in this process: for `hfi status` (requests/s and p50).

Prometheus answers these over a cluster too, from the histograms (metering/metrics.py); this window is what a
single status call can read without a Prometheus server: each serving process keeps the finish time and latency
of its recent requests (bounded), and the status endpoint merges the windows of every replica.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0
MAX_SAMPLES_PER_MODEL = 20_000  # beyond that the oldest are dropped: a window of ~330 req/s per process


@dataclass(frozen=True)
class WindowStats:
    """One model's requests that finished within the window, in one process."""

    model_id: str
    requests: int
    errors: int
    latencies_s: list[float]  # every latency of the window (for a p50 merged over processes)


class RecentRequests:
    """A sliding window of finished requests per model (thread-safe; O(1) per request)."""

    def __init__(
        self,
        window_s: float = WINDOW_S,
        max_samples: int = MAX_SAMPLES_PER_MODEL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.max_samples = max_samples
        self.clock = clock
        self._lock = threading.Lock()
        self._samples: dict[str, deque[tuple[float, float, bool]]] = {}

    def observe(self, model_id: str, total_seconds: float, ok: bool = True) -> None:
        """Count a request of `model_id` that just finished after `total_seconds`."""
        now = self.clock()
        with self._lock:
            samples = self._samples.get(model_id)
            if samples is None:
                samples = self._samples[model_id] = deque(maxlen=self.max_samples)
            samples.append((now, float(total_seconds), ok))

    def snapshot(self) -> list[WindowStats]:
        """Every model's requests of the last `window_s` seconds (older ones are forgotten here)."""
        horizon = self.clock() - self.window_s
        out = []
        with self._lock:
            for model_id, samples in self._samples.items():
                while samples and samples[0][0] < horizon:
                    samples.popleft()
                out.append(
                    WindowStats(
                        model_id,
                        len(samples),
                        sum(1 for s in samples if not s[2]),
                        [s[1] for s in samples],
                    )
                )
        return out


def median(values: list[float]) -> float | None:
    """The median (p50) of `values`, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
