"""Models that scale to zero (catalog `autoscaling.min_replicas: 0`), and what each model's replicas are doing.

Serve takes a model's last replica away `idle_timeout_s` after its last request (serving.app.idle_scaling). Such a
model has no HTTP route of its own: while it has no replica, no process of its own could answer. Its requests reach
the router (or the first pool, which takes `/models`), whose ColdStarts decides, from Serve's replica counts:

- a replica is running: the request goes to it by handle, as for any other model;
- none is: the first such request starts one (a handle call that waits in Serve's queue: Serve scales a deployment
  up from zero as soon as a handle has a request for it). Then
  - without `x-wait-for-model: true` (or the legacy body `options.wait_for_model`), the answer is at once a 503,
    `{"error": "Model X is currently loading", "estimated_time": S}` with `Retry-After`: S is what is left of the
    model's last measured start (or the catalog's `estimated_load_s` before one was measured);
  - with it, the request is held until the replica answers, up to `model_wait_timeout_s`, and at most
    `max_waiting_requests` at a time per model (past either, the same 503). The wait shows as `x-queue-time`.

Nothing of a start is billed: a replica's load runs before it takes requests, and a request is charged only the
compute timed on the replica that ran it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from models.catalog import ModelSpec
from models.errors import ModelLoading

log = logging.getLogger("serving.replicas")

LOADED = "loaded"
LOADING = "loading"
SCALED_TO_ZERO = "scaled_to_zero"

# How long one read of Serve's replica counts is used (a request to a model that is up reads none).
COUNTS_TTL_S = 1.0
# Counts this young are not read again before a 503.
FRESH_S = 0.25
# A start that takes longer than this is given up (the next request starts another).
WAKE_TIMEOUT_S = 900.0


def replica_state(counts: dict[str, int] | None) -> str:
    """LOADED (a replica runs), LOADING (one is starting, or wanted), SCALED_TO_ZERO (none, none wanted)."""
    if not counts:
        return LOADING
    if counts.get("running", 0) > 0:
        return LOADED
    if counts.get("starting", 0) > 0 or counts.get("target", 0) > 0:
        return LOADING
    return SCALED_TO_ZERO


def read_serve_counts() -> dict[str, dict[str, int]]:
    """Replicas per Serve application (running, starting, target), from Serve's controller (blocking)."""
    from serving.runtime_status import serve_replicas

    return serve_replicas()


class ReplicaCounts:
    """Serve's replica counts per application, read at most once per `ttl_s` (concurrent callers share a read)."""

    def __init__(
        self,
        read: Callable[[], dict[str, dict[str, int]]] = read_serve_counts,
        *,
        ttl_s: float = COUNTS_TTL_S,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self.ttl_s = ttl_s
        self._clock_s = clock_s
        self._counts: dict[str, dict[str, int]] = {}
        self._read_at = -float("inf")
        self._reading: asyncio.Task[dict[str, dict[str, int]]] | None = None
        self.reads = 0

    async def get(self, *, max_age_s: float | None = None) -> dict[str, dict[str, int]]:
        """The counts, no older than `max_age_s` (default: ttl_s)."""
        max_age = self.ttl_s if max_age_s is None else max_age_s
        if self._clock_s() - self._read_at <= max_age:
            return self._counts
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(self._refresh())
        try:
            return await asyncio.shield(self._reading)
        except Exception as err:  # the controller is busy or restarting: the last counts stand
            log.warning("could not read Serve's replica counts: %s", err)
            return self._counts

    def invalidate(self) -> None:
        """Read again on the next `get` (a start just ended: the counts changed)."""
        self._read_at = -float("inf")

    async def _refresh(self) -> dict[str, dict[str, int]]:
        try:
            self.reads += 1
            counts = await asyncio.to_thread(self._read)
            self._counts, self._read_at = counts, self._clock_s()
            return counts
        finally:
            self._reading = None


@dataclass
class _Model:
    """One scale-to-zero model's start in progress, its last measured start and its held requests."""

    spec: ModelSpec
    app: str
    waking: asyncio.Task[Any] | None = None
    woke_at_s: float = 0.0
    measured_s: float | None = None
    held: int = 0


class ColdStarts:
    """The decision for a request to a model that may have no replica (see the module docstring).

    `call(model_id)` is the handle call that starts a replica when there is none and returns once one answers
    (the model's `info`)."""

    def __init__(
        self,
        specs: list[ModelSpec],
        app_names: dict[str, str],
        call: Callable[[str], Awaitable[Any]],
        counts: ReplicaCounts | None = None,
        *,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = {
            s.id: _Model(s, app_names.get(s.id, s.deployment_name)) for s in specs if s.scales_to_zero
        }
        self._call = call
        self.counts = counts or ReplicaCounts()
        self._clock_s = clock_s

    def __contains__(self, model_id: str) -> bool:
        return model_id in self.models

    async def state(self, model_id: str, *, max_age_s: float | None = None) -> str:
        model = self.models[model_id]
        if model.waking is not None and not model.waking.done():
            return LOADING
        counts = await self.counts.get(max_age_s=max_age_s)
        return replica_state(counts.get(model.app))

    async def ensure(self, model_id: str, wait: bool, wait_timeout_s: float) -> int:
        """Return when the model has a replica (the ns this request was held), or raise ModelLoading (503)."""
        model = self.models[model_id]
        if await self.state(model_id) == LOADED:
            return 0
        if await self.state(model_id, max_age_s=FRESH_S) == LOADED:  # the counts were not fresh: read again
            return 0
        waking = self.wake(model_id)
        spec = model.spec
        autoscaling = spec.autoscaling
        assert autoscaling is not None
        if not wait or model.held >= autoscaling.max_waiting_requests:
            raise self.loading(model_id)
        model.held += 1
        started = time.perf_counter_ns()
        try:
            await asyncio.wait_for(asyncio.shield(waking), wait_timeout_s)
        except asyncio.TimeoutError:
            raise self.loading(model_id) from None
        except Exception as err:  # the start failed (Serve gave up on the replica): say so, retry later
            log.warning("%s did not start: %s", model_id, err)
            raise self.loading(model_id) from None
        finally:
            model.held -= 1
        return time.perf_counter_ns() - started

    def loading(self, model_id: str) -> ModelLoading:
        return ModelLoading(
            f"Model {model_id} is currently loading", estimated_time=self.estimated_s(model_id)
        )

    def estimated_s(self, model_id: str) -> float:
        """What is left of the model's start: its last measured start (else the catalog's estimate), less the
        time since this one began; at least 1 s."""
        model = self.models[model_id]
        assert model.spec.autoscaling is not None
        total = model.measured_s if model.measured_s is not None else model.spec.autoscaling.estimated_load_s
        elapsed = self._clock_s() - model.woke_at_s if model.waking is not None else 0.0
        return round(max(1.0, total - elapsed), 1)

    def wake(self, model_id: str) -> asyncio.Task[Any]:
        """Start a replica of the model (once, however many requests ask): a handle call that Serve holds until
        one is up. Its duration is the model's measured start."""
        model = self.models[model_id]
        if model.waking is not None and not model.waking.done():
            return model.waking
        model.woke_at_s = self._clock_s()
        log.info("%s has no replica: starting one", model_id)
        model.waking = asyncio.get_running_loop().create_task(self._wake(model))
        model.waking.add_done_callback(_seen)
        return model.waking

    async def _wake(self, model: _Model) -> Any:
        try:
            info = await asyncio.wait_for(self._call(model.spec.id), WAKE_TIMEOUT_S)
        finally:
            self.counts.invalidate()
        model.measured_s = round(self._clock_s() - model.woke_at_s, 1)
        log.info("%s is up after %.1f s", model.spec.id, model.measured_s)
        return info


def _seen(task: asyncio.Task[Any]) -> None:
    """Retrieve a failed start's error (logged where it is awaited), so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()


def wants_wait(headers: Any, body: Any) -> bool:
    """Whether the client asked to wait for a model that is loading: the `x-wait-for-model: true` header, or the
    legacy `options.wait_for_model` in a JSON body."""
    if str(headers.get("x-wait-for-model", "")).strip().lower() in ("1", "true", "yes"):
        return True
    options = body.get("options") if isinstance(body, dict) else None
    return isinstance(options, dict) and options.get("wait_for_model") is True
