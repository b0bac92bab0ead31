"""The executor: one loaded runner on one replica, timed on the replica's monotonic clock.

Compute is serialised by a lock (one forward pass at a time on a device), so the wait for the lock is queue
time and the work under it is compute time. Plain Python and threads: the Serve deployment wraps it, and unit
tests drive it without Ray.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from core.errors import ServiceError
from core.ids import uuid7
from core.timing import Stopwatch, Timings, split_batch_ns
from models.base import TaskRunner
from models.catalog import ModelSpec
from models.compute_estimate import StepCost
from models.deadline import Deadline, max_compute_s
from models.errors import GenerationError
from models.loading import LoadOptions, resolve_source
from models.registry import runner_class
from models.types import Interrupted, RunResult, StopRun, StreamChunk, TaskRequest

log = logging.getLogger(__name__)


def resolve_device(spec: ModelSpec) -> str:
    if spec.device != "auto":
        return spec.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(spec: ModelSpec, device: str) -> Any:
    import torch

    if spec.dtype == "auto":
        # bf16 on GPUs; fp32 on the CPU, where bf16 is far slower.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, spec.dtype)


class ModelExecutor:
    """Loads a model once and runs requests against it, returning outputs with their timings."""

    def __init__(self, spec: ModelSpec, options: LoadOptions, torch_threads: int | None = None) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.spec = spec
        started = time.perf_counter()
        self.source = resolve_source(spec, options)
        self.device = resolve_device(spec)
        cls: type[TaskRunner] = runner_class(spec.task)
        self.runner: TaskRunner = cls(
            spec, self.source.directory, self.device, resolve_dtype(spec, self.device)
        )
        self.runner.load()
        self.load_seconds = time.perf_counter() - started
        self._lock = threading.Lock()
        # An image model's seconds per denoising step by size, measured at start-up (serving/warmup.py); read by
        # the ingress to refuse requests past the compute limit (models/compute_estimate.py).
        self.step_cost: StepCost | None = None
        # Seconds the warm-up's batch of two took, its last run (serving/warmup.py): what a batch takes once warm,
        # before any request's batch says so.
        self.warm_batch_s: float | None = None
        log.info(
            "loaded %s (%s) on %s in %.1fs", spec.id, self.source.revision, self.device, self.load_seconds
        )

    @property
    def revision(self) -> str:
        return self.source.revision

    def tasks(self) -> tuple[str, ...]:
        allowed = self.runner.supported_tasks()
        if self.spec.tasks:
            return tuple(t for t in allowed if t in self.spec.tasks)
        return allowed

    def _guard(self, err: Exception) -> ServiceError:
        if isinstance(err, ServiceError):
            return err
        log.exception("model %s failed", self.spec.id, exc_info=err)
        return GenerationError("unknown error")

    @property
    def busy(self) -> bool:
        """Whether compute runs now: a forward pass under the lock (at most one at a time), or, for a concurrent
        runner (continuous batching), sequences in its engine's running batch."""
        occupancy = self.occupancy()
        if occupancy is not None:
            return occupancy[0] > 0
        return self._lock.locked()

    def occupancy(self) -> tuple[int, int] | None:
        """A concurrent runner's (requests computing now, requests waiting for their first step), from its engine;
        None under the lock, where only `busy` is known (the callers waiting for the lock are not counted)."""
        engine = getattr(self.runner, "engine", None) if self.runner.concurrent else None
        return engine.occupancy() if engine is not None else None

    @property
    def stoppable(self) -> bool:
        """Whether a request can report its steps and stop early (see `run`)."""
        return self.runner.stoppable

    def run(
        self,
        request: TaskRequest,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> RunResult:
        """Validate and run one request; compute time covers validation, the model and post-processing.

        With `should_stop`, a stoppable runner calls `on_step(compute_ns so far)` after each step and stops once
        `should_stop()` holds: Interrupted then carries the compute that ran."""
        if self.runner.concurrent:
            return self._run_concurrent(request, should_stop, on_step)
        arrived = time.perf_counter_ns()
        with self._lock:
            queue_ns = time.perf_counter_ns() - arrived
            watch = Stopwatch(self.runner.device_sync).start()
            # limits.max_compute_s: a stoppable runner stops there
            deadline = Deadline(max_compute_s(self.spec))
            try:
                self.runner.validate(request)
                if should_stop is None and not self.runner.stoppable:
                    output, usage = self.runner.run(request)
                else:
                    gone = should_stop or (lambda: False)
                    step = (lambda: on_step(watch.elapsed_ns())) if on_step is not None else (lambda: None)
                    output, usage = self.runner.run_steps(request, step, lambda: gone() or deadline.passed())
            except StopRun:
                if deadline.expired:
                    raise deadline.exceeded(watch.elapsed_ns()) from None
                raise Interrupted(watch.elapsed_ns()) from None
            except Exception as err:
                raise self._guard(err) from None
            compute_ns = watch.elapsed_ns()
        timings = Timings(
            compute_ns=compute_ns, queue_ns=queue_ns, work_units=self.runner.work_units(request)
        )
        return RunResult(output=output, timings=timings, usage=usage)

    def run_batch(
        self, requests: list[TaskRequest], queue_ns: list[int] | None = None
    ) -> list[RunResult | ServiceError]:
        """Run requests as one batch; the batch's compute time is split by each request's share of the work.

        Requests that fail validation get their error back and take no share; the rest run together.
        """
        results: list[RunResult | ServiceError | None] = [None] * len(requests)
        valid: list[int] = []
        for i, req in enumerate(requests):
            try:
                self.runner.validate(req)
                valid.append(i)
            except Exception as err:
                results[i] = self._guard(err)
        if valid:
            self._run_valid_batch(requests, valid, results, queue_ns or [0] * len(requests))
        assert all(r is not None for r in results)  # every request has its result or its error
        return results  # type: ignore[return-value]

    def _run_valid_batch(
        self, requests: list[TaskRequest], valid: list[int], results: list[Any], queue_ns: list[int]
    ) -> None:
        batch = [requests[i] for i in valid]
        arrived = time.perf_counter_ns()
        with self._lock:
            wait_ns = time.perf_counter_ns() - arrived
            watch = Stopwatch(self.runner.device_sync).start()
            try:
                outputs = self.runner.run_batch(batch)
            except Exception as err:
                guarded = self._guard(err)
                for i in valid:
                    results[i] = guarded
                return
            batch_ns = watch.elapsed_ns()
        weights = [self.runner.work_units(r) for r in batch]
        shares = split_batch_ns(batch_ns, weights)
        batch_id = uuid7().hex
        offset_ns = 0
        for i, (output, usage), share, weight in zip(valid, outputs, shares, weights, strict=True):
            timings = Timings(
                compute_ns=share,
                queue_ns=queue_ns[i] + wait_ns,
                batch_size=len(batch),
                batch_compute_ns=batch_ns,
                batch_offset_ns=offset_ns,
                work_units=weight,
                batch_id=batch_id,
            )
            offset_ns += share
            results[i] = RunResult(output=output, timings=timings, usage=usage)

    def stream(self, request: TaskRequest, report_stop: bool = False) -> Iterator[StreamChunk | RunResult]:
        """Yield chunks as they are generated, each stamped with the compute consumed so far, then a RunResult.

        Closing the generator (a client that went away) stops generation at the next token. With `report_stop`,
        closing it early raises Interrupted from `close()` with the compute that ran for the request until it
        stopped: the steps after the last chunk its consumer read included (continuous batching: until the engine
        dropped the sequence, which `close()` waits for, one step at most).
        """
        if self.runner.concurrent:
            yield from self._stream_concurrent(request, report_stop)
            return
        arrived = time.perf_counter_ns()
        stop = threading.Event()
        with self._lock:
            queue_ns = time.perf_counter_ns() - arrived
            watch = Stopwatch(self.runner.device_sync).start()
            deadline = Deadline(max_compute_s(self.spec))
            try:
                self.runner.validate(request)
                final: dict[str, Any] = {}
                for item in self.runner.stream(request, lambda: stop.is_set() or deadline.passed()):
                    if isinstance(item, StreamChunk):
                        item.elapsed_ns = watch.elapsed_ns()
                        yield item
                    else:
                        final = item
            except GeneratorExit:
                stop.set()  # the runner's generator is left at its yield: nothing more runs
                if report_stop:
                    raise Interrupted(watch.elapsed_ns()) from None
                raise
            except Exception as err:
                raise self._guard(err) from None
            compute_ns = watch.elapsed_ns()
            # stopped at the compute limit: 504, what ran is charged
            if deadline.expired and not stop.is_set():
                raise deadline.exceeded(compute_ns)
        timings = Timings(
            compute_ns=compute_ns, queue_ns=queue_ns, work_units=self.runner.work_units(request)
        )
        yield RunResult(output=final.get("output"), timings=timings, usage=final.get("usage", {}))

    # A concurrent runner (continuous batching): no lock, and each request's compute is its shares of the engine's
    # steps as the runner measured them (device-synchronised there), not a stopwatch around a call that mostly
    # waits for other requests' work. Validation is not billed here: it runs beside the engine, off its clock.

    def _run_concurrent(
        self,
        request: TaskRequest,
        should_stop: Callable[[], bool] | None,
        on_step: Callable[[int], None] | None,
    ) -> RunResult:
        consumed = [0]
        deadline = Deadline(max_compute_s(self.spec), elapsed_ns=lambda: consumed[0])
        gone = should_stop or (lambda: False)

        def step(elapsed_ns: int) -> None:
            consumed[0] = elapsed_ns
            if on_step is not None:
                on_step(elapsed_ns)

        try:
            self.runner.validate(request)
            output, usage, timings = self.runner.run_metered(
                request, lambda: gone() or deadline.passed(), step
            )
        except Interrupted as stopped:
            if deadline.expired:
                raise deadline.exceeded(stopped.compute_ns) from None
            raise
        except Exception as err:
            raise self._guard(err) from None
        return RunResult(output=output, timings=timings, usage=usage)

    def _stream_concurrent(
        self, request: TaskRequest, report_stop: bool
    ) -> Iterator[StreamChunk | RunResult]:
        stop = threading.Event()
        consumed = [0]
        deadline = Deadline(max_compute_s(self.spec), elapsed_ns=lambda: consumed[0])
        final: dict[str, Any] = {}
        items: Iterator[StreamChunk | dict[str, Any]] = iter(())
        try:
            self.runner.validate(request)
            items = self.runner.stream(request, lambda: stop.is_set() or deadline.passed())
            for item in items:
                if isinstance(item, StreamChunk):
                    item.elapsed_ns = consumed[0] = max(item.elapsed_ns, consumed[0])
                    yield item
                else:
                    final = item
        except GeneratorExit:
            stop.set()
            if report_stop:
                stopped = _drain_stopped(items, consumed[0])
                if stopped is not None:
                    raise stopped from None
            raise
        except Interrupted as stopped:
            # stopped at the compute limit: 504, what ran is charged
            if deadline.expired and not stop.is_set():
                raise deadline.exceeded(stopped.compute_ns) from None
            raise
        except Exception as err:
            raise self._guard(err) from None
        yield RunResult(output=final.get("output"), timings=final["timings"], usage=final.get("usage", {}))


def _drain_stopped(items: Iterator[StreamChunk | dict[str, Any]], consumed_ns: int) -> Interrupted | None:
    """What a concurrent runner's stream, told to stop, ran for its request until it stopped: read it to its end
    (the engine drops the sequence before its next step, or it ended meanwhile) for the compute of every step it
    took part in. None if it failed instead (a failure is not charged)."""
    compute_ns = consumed_ns
    try:
        for item in items:
            if isinstance(item, StreamChunk):
                compute_ns = max(compute_ns, item.elapsed_ns)
            else:
                compute_ns = max(compute_ns, item["timings"].compute_ns)
    except Interrupted as stopped:
        compute_ns = max(compute_ns, stopped.compute_ns)
    except Exception:
        log.warning("a stream stopped by its consumer failed before it stopped", exc_info=True)
        return None
    return Interrupted(compute_ns)
