"""The Ray Serve deployments: one ModelDeployment per catalog model, and the HTTP Ingress."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from hardware_profiles import HardwareProfile
from models.catalog import ModelSpec
from models.errors import ServiceError
from models.executor import ModelExecutor
from models.types import RunResult, StreamChunk, TaskRequest
from serving.batching import Batcher
from serving.config import Settings
from serving.streaming import iterate_in_thread

log = logging.getLogger("serving.deployment")


@serve.deployment
class ModelDeployment:
    """One replica of one model: loads it once, runs requests (batched where configured), times them."""

    def __init__(self, spec: dict[str, Any], profile: dict[str, Any], settings: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.spec = ModelSpec.model_validate(spec)
        self.profile = HardwareProfile.model_validate(profile)
        options = Settings.load(settings).load_options()  # secrets (HF_TOKEN) come from this replica's env
        self.executor = ModelExecutor(self.spec, options, self.profile.torch_threads)
        batching = self.spec.batching
        self.batcher: Batcher | None = None
        if batching is not None and self.executor.runner.batchable:
            self.batcher = Batcher(self._run_batch, batching.max_batch_size, batching.batch_wait_timeout_s)

    async def info(self) -> dict[str, Any]:
        return {
            "revision": self.executor.revision,
            "tasks": list(self.executor.tasks()),
            "device": self.executor.device,
            "load_seconds": self.executor.load_seconds,
            "batching": self.batcher is not None,
        }

    async def run(self, request: TaskRequest) -> RunResult:
        if self.batcher is not None:
            return await self.batcher.submit(request)
        return await asyncio.to_thread(self.executor.run, request)

    async def _run_batch(
        self, requests: list[TaskRequest], queue_ns: list[int]
    ) -> list[RunResult | ServiceError]:
        return await asyncio.to_thread(self.executor.run_batch, requests, queue_ns)

    async def stream(self, request: TaskRequest) -> AsyncIterator[StreamChunk | RunResult]:
        async for item in iterate_in_thread(lambda: self.executor.stream(request)):
            yield item


class RayBackend:
    """The ingress's view of the model deployments: Serve handles by model id."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self.handles = handles

    async def info(self, model_id: str) -> dict[str, Any]:
        return await self.handles[model_id].info.remote()

    async def run(self, model_id: str, request: TaskRequest) -> RunResult:
        return await self.handles[model_id].run.remote(request)

    async def stream(self, model_id: str, request: TaskRequest) -> AsyncIterator[StreamChunk | RunResult]:
        gen = self.handles[model_id].options(stream=True).stream.remote(request)
        finished = False
        try:
            async for item in gen:
                yield item
            finished = True
        finally:
            if not finished:
                gen.cancel()  # the client went away: stop the replica's generation too


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP entry point: the FastAPI app of serving/http.py over Ray handles to the models."""

    def __init__(self, handles: dict[str, DeploymentHandle], settings: dict[str, Any]) -> None:
        from serving.ingress import IngressCore

        logging.basicConfig(level=logging.INFO)
        self.core = IngressCore(Settings.load(settings), RayBackend(handles), set_request_id_header=False)

    def __del__(self) -> None:  # Serve calls this on replica shutdown: drain the charge spool
        core = getattr(self, "core", None)
        if core is not None:
            core.close()

    def __serve_build_asgi_app__(self) -> Any:
        from serving.http import create_app

        return create_app(self.core)
