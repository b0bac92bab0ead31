"""ModelBackends that run executors in this process, no Ray hop: `LocalBackend` is what a model replica serves
its own HTTP requests with (its executor and batcher); `InProcessBackend` loads a whole catalog in one process
(unit tests, the benchmarks' in-process baseline, a single-process debug server)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from models.catalog import ModelCatalog
from models.compute_estimate import image_compute_info
from models.executor import ModelExecutor
from models.loading import LoadOptions
from models.types import RunResult, StreamChunk, TaskRequest
from serving.batching import Batcher
from serving.streaming import finish_despite_cancel, iterate_in_thread, run_stoppable


class LocalBackend:
    """Executors of this process by model id, each with its batcher where it has one."""

    def __init__(
        self, executors: dict[str, ModelExecutor], batchers: dict[str, Batcher] | None = None
    ) -> None:
        self.executors = executors
        self.batchers = batchers or {}

    def stoppable(self, model_id: str) -> bool:
        """Whether a request of this model reports its steps and stops early (never a batched one)."""
        return self.executors[model_id].stoppable and model_id not in self.batchers

    async def info(self, model_id: str) -> dict[str, Any]:
        ex = self.executors[model_id]
        return {
            "revision": ex.revision,
            "tasks": list(ex.tasks()),
            "device": ex.device,
            "load_seconds": ex.load_seconds,
            "batching": model_id in self.batchers,
            "stoppable": self.stoppable(model_id),
            # an image model's measured step cost: the ingress refuses what cannot finish in time
            "image_compute": image_compute_info(ex),
        }

    async def run(self, model_id: str, request: TaskRequest) -> RunResult:
        """Run one request; if the caller is cancelled, stop a stoppable model early, or let the work finish,
        and raise Interrupted with the compute that ran (as RayBackend does)."""
        executor, batcher = self.executors[model_id], self.batchers.get(model_id)
        if batcher is not None:
            return await finish_despite_cancel(batcher.submit(request))
        if executor.stoppable:
            return await run_stoppable(executor, request)
        return await finish_despite_cancel(asyncio.to_thread(executor.run, request))

    def reports_stop(self, model_id: str) -> bool:
        """Whether a stream of this model closed early can tell what ran (see `stream`): always, in process."""
        return True

    async def stream(
        self, model_id: str, request: TaskRequest, report_stop: bool = False
    ) -> AsyncIterator[StreamChunk | RunResult]:
        """The request's chunks, then its RunResult. With `report_stop`, closing it early (`aclose()`: its client
        went away) stops the model and raises Interrupted with the compute that ran for the request until the
        model dropped it (serving/streaming.py LeavableStream)."""
        executor = self.executors[model_id]
        items = iterate_in_thread(lambda: executor.stream(request, report_stop), report_stop)
        async with contextlib.aclosing(items):
            async for item in items:
                yield item


class InProcessBackend(LocalBackend):
    """Every model of `catalog` loaded in this process, unbatched (batching here is per call)."""

    def __init__(self, catalog: ModelCatalog, options: LoadOptions, torch_threads: int | None = None) -> None:
        super().__init__({spec.id: ModelExecutor(spec, options, torch_threads) for spec in catalog.models})
