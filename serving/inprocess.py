"""A ModelBackend that runs executors in this process: no Ray. For unit tests, benchmarks' in-process
baseline, and a single-process debug server. Batching here is per call (no cross-request batching)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from models.catalog import ModelCatalog
from models.executor import ModelExecutor
from models.loading import LoadOptions
from models.types import RunResult, StreamChunk, TaskRequest
from serving.streaming import finish_despite_cancel, iterate_in_thread, result_of, run_with_progress


class InProcessBackend:
    def __init__(self, catalog: ModelCatalog, options: LoadOptions, torch_threads: int | None = None) -> None:
        self.executors = {spec.id: ModelExecutor(spec, options, torch_threads) for spec in catalog.models}

    async def info(self, model_id: str) -> dict[str, Any]:
        ex = self.executors[model_id]
        return {
            "revision": ex.revision,
            "tasks": list(ex.tasks()),
            "device": ex.device,
            "load_seconds": ex.load_seconds,
        }

    async def run(self, model_id: str, request: TaskRequest) -> RunResult:
        """Run one request; if the caller is cancelled, stop a stoppable model early, or let the work finish,
        and raise Interrupted with the compute that ran (as RayBackend does)."""
        executor = self.executors[model_id]
        if executor.stoppable:
            items = run_with_progress(executor, request)
            return await result_of(items, items.aclose)
        return await finish_despite_cancel(asyncio.to_thread(executor.run, request))

    async def stream(self, model_id: str, request: TaskRequest) -> AsyncIterator[StreamChunk | RunResult]:
        async for item in iterate_in_thread(lambda: self.executors[model_id].stream(request)):
            yield item
