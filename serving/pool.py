"""Pools: many small models sharing replicas, each loaded on its first request and evicted least recently used.

A catalog `pools` entry is one Serve application (`serving.app:build_pool_app`) whose deployment, PoolDeployment,
hosts every model that names the pool. The first pool is mounted at `/models`: HAProxy (and Serve's proxy) route by
the longest prefix, so every `/models/{id}...` request that no model application of its own claims reaches it in one
hop, pooled models and unknown ids (404) alike. The router reaches pooled models by handle (`/v1/...`,
`/pipeline/...`), with the model id as an argument (BoundModelHandle).

Why not Serve's model multiplexing: its routing works on the `serve_multiplexed_model_id` header or handle option,
which the clients do not send and HAProxy does not read; its LRU is by count only; and its loader runs on the
replica's event loop. Here a load runs on a worker thread (the replica keeps answering), a model in use is never
evicted, the bound is a count and a memory budget, and each model keeps its own batcher.

Metering is unchanged: a request is timed on the replica that ran it and charged to its model id, at the model's
hardware profile, which must be the pool's (models/catalog.py checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from core.errors import ServiceError
from models.catalog import ModelCatalog, ModelSpec, PoolSpec
from models.types import Progress, RunResult, StreamChunk, TaskRequest
from serving.batching import Batcher
from serving.inprocess import LocalBackend

log = logging.getLogger("serving.pool")


def executor_memory_bytes(executor: Any) -> int:
    """What a loaded model holds: its runner's own count when it has one, else its files' size."""
    measure = getattr(executor.runner, "memory_bytes", None)
    if callable(measure):
        try:
            return int(measure())
        except Exception:  # a count is an estimate: never fail a load over it
            log.warning("could not measure %s", executor.spec.id, exc_info=True)
    directory = executor.source.directory
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@dataclass
class PoolEntry:
    """One loaded model of a pool: its executor (and batcher), how many requests use it now, its size."""

    model_id: str
    backend: LocalBackend
    memory_bytes: int
    in_use: int = 0
    loaded_at: float = field(default_factory=time.monotonic)


class ModelPool:
    """The models of one pool on one replica: loaded on first use (on a worker thread, once however many requests
    ask at the same time), kept in least-recently-used order, and evicted, idle ones only, while more than
    `max_models` are loaded or their weights pass `max_memory_bytes`."""

    def __init__(
        self,
        specs: list[ModelSpec],
        load: Callable[[ModelSpec], Any],
        *,
        max_models: int,
        max_memory_bytes: int,
        measure: Callable[[Any], int] = executor_memory_bytes,
    ) -> None:
        self.specs = {s.id: s for s in specs}
        self._load = load
        self._measure = measure
        self.max_models = max_models
        self.max_memory_bytes = max_memory_bytes
        self.entries: OrderedDict[str, PoolEntry] = OrderedDict()
        self._loading: dict[str, asyncio.Task[PoolEntry]] = {}
        self.loads = 0
        self.evictions = 0
        self.load_counts: dict[str, int] = {}  # loads per model (a second one follows an eviction)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self.specs

    @property
    def memory_bytes(self) -> int:
        return sum(e.memory_bytes for e in self.entries.values())

    @asynccontextmanager
    async def use(self, model_id: str) -> AsyncIterator[PoolEntry]:
        """The model's entry, loaded if need be and held (never evicted) until the block ends."""
        entry = await self._acquire(model_id)
        try:
            yield entry
        finally:
            entry.in_use -= 1
            self._evict()  # a model over the bounds that was busy can go now

    async def _acquire(self, model_id: str) -> PoolEntry:
        while True:
            entry = self.entries.get(model_id)
            if entry is not None:
                entry.in_use += 1
                self.entries.move_to_end(model_id)
                return entry
            loading = self._loading.get(model_id)
            if loading is None:
                loading = self._loading[model_id] = asyncio.ensure_future(self._load_entry(model_id))
                loading.add_done_callback(lambda _t, m=model_id: self._loading.pop(m, None))
            await asyncio.shield(loading)  # a caller that leaves does not stop the load for the others

    async def _load_entry(self, model_id: str) -> PoolEntry:
        spec = self.specs[model_id]
        started = time.perf_counter()
        executor = await asyncio.to_thread(self._load, spec)
        batchers: dict[str, Batcher] = {}
        if spec.batching is not None and executor.runner.batchable:
            batch = spec.batching

            async def run_batch(requests: list[TaskRequest], queue_ns: list[int]) -> list[Any]:
                return await asyncio.to_thread(executor.run_batch, requests, queue_ns)

            batchers[spec.id] = Batcher(run_batch, batch.max_batch_size, batch.batch_wait_timeout_s)
        entry = PoolEntry(model_id, LocalBackend({spec.id: executor}, batchers), self._measure(executor))
        self.entries[model_id] = entry
        self.loads += 1
        self.load_counts[model_id] = self.load_counts.get(model_id, 0) + 1
        log.info(
            "pool: loaded %s in %.1fs (%.1f MB; %d loaded, %.1f MB)",
            model_id,
            time.perf_counter() - started,
            entry.memory_bytes / 1e6,
            len(self.entries),
            self.memory_bytes / 1e6,
        )
        self._evict(keep=model_id)
        return entry

    def _over(self) -> bool:
        return len(self.entries) > self.max_models or self.memory_bytes > self.max_memory_bytes

    def _evict(self, keep: str | None = None) -> None:
        evicted = False
        for model_id in list(self.entries):  # least recently used first
            if not self._over():
                break
            entry = self.entries[model_id]
            if model_id == keep or entry.in_use > 0:
                continue
            del self.entries[model_id]
            for batcher in entry.backend.batchers.values():
                batcher.close()  # its idle worker holds the model
            self.evictions += 1
            evicted = True
            log.info("pool: evicted %s (least recently used)", model_id)
        if evicted:
            gc.collect()  # give the weights back now, not at the next collection

    def status(self) -> dict[str, Any]:
        return {
            "loaded": list(self.entries),
            "memory_bytes": self.memory_bytes,
            "max_models": self.max_models,
            "max_memory_bytes": self.max_memory_bytes,
            "loads": self.loads,
            "evictions": self.evictions,
            "load_counts": dict(self.load_counts),
        }


class PoolBackend:
    """The ModelBackend of a pool replica: its own models from the pool, any other model through `remote` (Ray
    handles), so that a request that reaches the pool's HTTP prefix for another model is still served."""

    def __init__(self, pool: ModelPool, remote: Any = None) -> None:
        self.pool = pool
        self.remote = remote
        # Serve's counts, and the models that scale to zero (reached by handle): the remote RayBackend's.
        self.replica_counts = getattr(remote, "replica_counts", None)
        self.cold_starts = getattr(remote, "cold_starts", None)

    def _remote(self) -> Any:
        if self.remote is None:
            raise ServiceError("this model is not served here")
        return self.remote

    async def info(self, model_id: str) -> dict[str, Any]:
        if model_id not in self.pool:
            return await self._remote().info(model_id)
        async with self.pool.use(model_id) as entry:
            return {**await entry.backend.info(model_id), "pool": True}

    async def run(self, model_id: str, request: TaskRequest) -> RunResult:
        if model_id not in self.pool:
            return await self._remote().run(model_id, request)
        async with self.pool.use(model_id) as entry:
            return await entry.backend.run(model_id, request)

    def reports_stop(self, model_id: str) -> bool:
        """Whether a stream of this model closed early can tell what ran (see LocalBackend.stream)."""
        return model_id in self.pool

    async def stream(
        self, model_id: str, request: TaskRequest, report_stop: bool = False
    ) -> AsyncIterator[StreamChunk | RunResult]:
        if model_id not in self.pool:
            async for item in self._remote().stream(model_id, request):
                yield item
            return
        async with self.pool.use(model_id) as entry:
            items = entry.backend.stream(model_id, request, report_stop)
            async with contextlib.aclosing(items):  # closed early: its Interrupted (what ran) comes out
                async for item in items:
                    yield item

    async def run_progress(self, model_id: str, request: TaskRequest) -> AsyncIterator[Progress | RunResult]:
        from serving.streaming import run_with_progress

        async with self.pool.use(model_id) as entry:
            async for item in run_with_progress(entry.backend.executors[model_id], request):
                yield item

    async def run_many(self, model_id: str, requests: list[TaskRequest]) -> list[RunResult | Exception]:
        async with self.pool.use(model_id) as entry:
            batcher = entry.backend.batchers.get(model_id)
            if batcher is not None:
                return await batcher.submit_many(requests)
            executor = entry.backend.executors[model_id]
            results: list[RunResult | Exception] = []
            for request in requests:
                try:
                    results.append(await asyncio.to_thread(executor.run, request))
                except ServiceError as err:
                    results.append(err)
            return results


class BoundModelHandle:
    """A Serve handle to a pool's deployment that passes one model's id with every call, so that the router's
    RayBackend calls a pooled model as it calls a model deployment of its own (`handle.run.remote(request)`)."""

    def __init__(self, handle: Any, model_id: str) -> None:
        self._handle = handle
        self._model_id = model_id

    def options(self, **kwargs: Any) -> BoundModelHandle:
        return BoundModelHandle(self._handle.options(**kwargs), self._model_id)

    def __getattr__(self, name: str) -> _BoundMethod:
        return _BoundMethod(getattr(self._handle, name), self._model_id)


class _BoundMethod:
    def __init__(self, method: Any, model_id: str) -> None:
        self._method = method
        self._model_id = model_id

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._method.remote(*args, model_id=self._model_id, **kwargs)


def as_deployed(catalog: ModelCatalog) -> list[ModelSpec]:
    """The catalog's models as their replicas run them: a pooled model has its pool's replicas (how many batches
    the router keeps in flight to it, serving/deployment.py calls_in_flight)."""
    return [
        spec
        if spec.pool is None
        else spec.model_copy(update={"replicas": catalog.pool(spec.pool).replicas, "autoscaling": None})
        for spec in catalog.models
    ]


def model_handles(catalog: ModelCatalog, app_names: dict[str, str], skip: set[str] | None = None) -> dict:
    """Serve handles by model id, for the router and for pool replicas (`skip`: the models served here): a model's
    own deployment, or its pool's deployment bound to its id. `app_names`: model id -> its application's name."""
    from ray import serve

    handles: dict[str, Any] = {}
    for spec in catalog.models:
        if spec.id not in app_names or spec.id in (skip or set()):
            continue
        if spec.pool is None:
            handles[spec.id] = serve.get_deployment_handle(spec.deployment_name, app_name=app_names[spec.id])
        else:
            pool: PoolSpec = catalog.pool(spec.pool)
            handle = serve.get_deployment_handle(pool.deployment_name, app_name=app_names[spec.id])
            handles[spec.id] = BoundModelHandle(handle, spec.id)
    return handles
