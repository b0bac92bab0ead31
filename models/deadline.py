"""The compute deadline: how long one request may compute on its replica (`limits.max_compute_s`).

Enforced through the stoppable runner mechanism (TaskRunner.run_steps / stream's `should_stop`): once the
request's compute passes the limit, `should_stop()` holds, the runner stops at its next step, and the executor
raises ComputeDeadlineExceeded (504, naming the limit) carrying the compute that ran, which is charged.
A runner that cannot stop (a single forward pass: embeddings, classification) is not cut short.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from core.errors import ServiceError
from models.catalog import ModelSpec
from models.types import CHAT_COMPLETION, COMPLETION, TEXT_GENERATION, TEXT_TO_IMAGE

# Per task, seconds of compute; a model's `limits.max_compute_s` wins. Sized so a request within the default caps
# on the hardware it is meant for finishes well inside (a 1024x1024, 50-step FLUX image on an L4 takes ~60 s),
# while one that would hold a CPU replica for many minutes is stopped.
DEFAULT_MAX_COMPUTE_S: dict[str, float] = {
    TEXT_TO_IMAGE: 120.0,
    TEXT_GENERATION: 120.0,
    CHAT_COMPLETION: 120.0,
    COMPLETION: 120.0,
}
FALLBACK_MAX_COMPUTE_S = 60.0


def max_compute_s(spec: ModelSpec) -> float:
    """The compute limit of one request of this model, in seconds."""
    if spec.limits.max_compute_s is not None:
        return spec.limits.max_compute_s
    return DEFAULT_MAX_COMPUTE_S.get(spec.task, FALLBACK_MAX_COMPUTE_S)


class ComputeDeadlineExceeded(ServiceError):
    """504: the request used its model's compute limit and was stopped; `compute_ns` of it ran and is charged."""

    status_code = 504
    error_type = "timeout"

    @property
    def compute_ns(self) -> int:
        return int(self.extra.get("compute_ns", 0))  # type: ignore[call-overload]

    @classmethod
    def after(cls, compute_ns: int, limit_s: float) -> ComputeDeadlineExceeded:
        return cls(
            f"The request reached this model's compute limit of {limit_s:g} s (limits.max_compute_s) and was "
            f"stopped; the {compute_ns / 1e9:.3f} s of compute that ran is charged. Ask for less work (fewer "
            "steps, pixels or tokens).",
            compute_ns=compute_ns,
            limit_s=limit_s,
        )


class Deadline:
    """A request's compute limit, read by the runner's `should_stop` (`expired` stays True once it has been)."""

    def __init__(self, limit_s: float, elapsed_ns: Callable[[], int] | None = None) -> None:
        self.limit_s = limit_s
        self.limit_ns = int(limit_s * 1e9)
        started = time.perf_counter_ns()
        self.elapsed_ns = elapsed_ns or (lambda: time.perf_counter_ns() - started)
        self.expired = False

    def passed(self) -> bool:
        if not self.expired and self.elapsed_ns() >= self.limit_ns:
            self.expired = True
        return self.expired

    def exceeded(self, compute_ns: int) -> ComputeDeadlineExceeded:
        return ComputeDeadlineExceeded.after(compute_ns, self.limit_s)
