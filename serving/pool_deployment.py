"""The Serve deployment of a pool (serving/pool.py): HTTP for its models' routes in its own process, like a model
deployment, and the router's handle calls with the model id as an argument."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from hardware_profiles import HardwareProfile
from models.catalog import ModelSpec
from models.executor import ModelExecutor
from models.types import Progress, RunResult, StreamChunk, TaskRequest
from serving.config import Settings
from serving.deployment import HttpEntry
from serving.metrics_export import install_ray_metrics
from serving.pool import ModelPool, PoolBackend, as_deployed, model_handles
from serving.warmup import warm_up


@serve.deployment
@serve.ingress()
class PoolDeployment(HttpEntry):
    """One replica of a pool: loads its models on first use, evicts them least recently used."""

    def __init__(
        self, pool_name: str, profile: dict[str, Any], app_names: dict[str, str], settings: dict[str, Any]
    ) -> None:
        from serving.deployment import RayBackend

        logging.basicConfig(level=logging.INFO)
        install_ray_metrics()
        loaded = Settings.load(settings)
        catalog = loaded.validated()[0]
        pool_spec = catalog.pool(pool_name)
        self.profile = HardwareProfile.model_validate(profile)
        options = loaded.load_options()
        threads = self.profile.torch_threads
        calibrations = loaded.calibration_cache()

        def load(spec: ModelSpec) -> ModelExecutor:
            executor = ModelExecutor(spec, options, threads)
            if loaded.warmup:
                # before its first request runs on it: never charged (serving/warmup.py)
                warm_up(executor, calibrations=calibrations)
            return executor

        self.pool = ModelPool(
            catalog.pooled(pool_name),
            load,
            max_models=pool_spec.max_models,
            max_memory_bytes=pool_spec.max_memory_mb * 1024 * 1024,
        )
        others = [m for m in as_deployed(catalog) if m.id not in self.pool]
        remote = RayBackend(model_handles(catalog, app_names, skip=set(self.pool.specs)), others, app_names)
        self.backend = PoolBackend(self.pool, remote)
        self._serve(loaded, self.backend)

    async def pool_status(self) -> dict[str, Any]:
        return self.pool.status()

    # The router's calls (RayBackend through BoundModelHandle): each names its model.

    async def info(self, model_id: str) -> dict[str, Any]:
        return await self.backend.info(model_id)

    async def run(self, request: TaskRequest, model_id: str) -> RunResult:
        async with self.pool.use(model_id) as entry:
            batcher = entry.backend.batchers.get(model_id)
            if batcher is not None:
                return await batcher.submit(request)
            return await asyncio.to_thread(entry.backend.executors[model_id].run, request)

    async def run_progress(self, request: TaskRequest, model_id: str) -> AsyncIterator[Progress | RunResult]:
        async for item in self.backend.run_progress(model_id, request):
            yield item

    async def run_many(self, requests: list[TaskRequest], model_id: str) -> list[RunResult | Exception]:
        return await self.backend.run_many(model_id, requests)

    async def stream(self, request: TaskRequest, model_id: str) -> AsyncIterator[StreamChunk | RunResult]:
        async for item in self.backend.stream(model_id, request):
            yield item
