"""The Ray Serve deployments: one ModelDeployment per catalog model, each its own Serve application that takes
its model's HTTP routes itself (one hop from the socket to the model), and the Ingress, a small router application
for the routes that name the model in the body (/v1/chat/completions, ...), which calls the models by handle."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.handle import DeploymentHandle

from core.errors import ServiceError
from hardware_profiles import HardwareProfile
from models.catalog import ModelSpec
from models.errors import ReplicaUnavailable
from models.executor import ModelExecutor
from models.types import Progress, RunResult, StreamChunk, TaskRequest
from serving.batching import Batcher, LoopOrThread
from serving.config import Settings
from serving.inprocess import LocalBackend
from serving.metrics_export import install_ray_metrics
from serving.replicas import ColdStarts, ReplicaCounts
from serving.streaming import finish_despite_cancel, iterate_in_thread, result_of, run_with_progress
from serving.warmup import warm_up_where_served

log = logging.getLogger("serving.deployment")
T = TypeVar("T")


class HttpEntry:
    """What every deployment that serves HTTP itself shares: Serve builds its FastAPI app (serving/http.py) over
    `self.core`, and the charge spool is drained when Serve shuts the replica down."""

    core: Any  # serving.ingress.IngressCore, set by the subclass's __init__ (`_serve`)
    # A model's or a pool's application is sent only `/models/...` paths: its app has the model routes alone.
    model_routes_only = True

    def _serve(self, settings: Settings, backend: Any) -> None:
        """Serve over `backend` (Serve's proxy sets the request id header), with the charge spool's sync process
        started now: its start is not the first request's wait."""
        from serving.ingress import IngressCore

        self.core = IngressCore(settings, backend, set_request_id_header=False)
        self.core.metering.start_sync_process()

    def __del__(self) -> None:  # Serve calls this on replica shutdown: drain the charge spool
        core = getattr(self, "core", None)
        if core is not None:
            core.close()

    def __serve_build_asgi_app__(self) -> Any:
        from serving.http import create_app

        return create_app(self.core, model_routes_only=self.model_routes_only)


@serve.deployment
@serve.ingress()
class ModelDeployment(HttpEntry):
    """One replica of one model: loads it once, runs requests (batched where configured), times them.

    It serves its model's HTTP routes itself (`/models/{id}...`: parse, admission, the model, metering, in this
    process), and the router's handle calls (`info`, `run`, `run_many`, `run_progress`, `stream`)."""

    def __init__(self, spec: dict[str, Any], profile: dict[str, Any], settings: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        install_ray_metrics()  # this replica's counters reach Prometheus through the node's Ray metrics agent
        self.spec = ModelSpec.model_validate(spec)
        self.profile = HardwareProfile.model_validate(profile)
        loaded = Settings.load(settings)
        options = loaded.load_options()  # secrets (HF_TOKEN) come from this replica's env
        self.executor = ModelExecutor(self.spec, options, self.profile.torch_threads)
        batching = self.spec.batching if self.executor.runner.batchable else None
        if loaded.warmup:
            # Before Serve sends it traffic, on the threads that run its requests' model calls; never charged.
            warm_up_where_served(
                self.executor,
                here_too=batching is not None and batching.on_loop_below_s > 0,
                calibrations=loaded.calibration_cache(),
            )
        self.batcher: Batcher | None = None
        if batching is not None:
            self.batcher = Batcher(self._run_batch, batching.max_batch_size, batching.batch_wait_timeout_s)
            # Not on the loop while the model's lock is held by a thread, which the loop must not wait for. Requests
            # of earlier batches that wait for their charges' spool sync do not keep a batch off the loop: their acks
            # wait for it (one short batch), but a thread's hand-over cost more CPU a request than metering itself
            # (benchmarks/metering_overhead.py: model CPU +0.10 ms a request against +0.02 ms on the loop).
            self.placement = LoopOrThread(batching.on_loop_below_s, busy=lambda: self.executor.busy)
            # The warm-up's batch (its last run: on this loop's thread where batches may run on it) stands for the
            # first request's, which would otherwise go to a thread, unknown, and pay the hop there and back.
            self.placement.average_s = self.executor.warm_batch_s
        batchers = {self.spec.id: self.batcher} if self.batcher is not None else {}
        self.local = LocalBackend({self.spec.id: self.executor}, batchers)
        self._serve(loaded, self.local)
        # the first request's metric series and price terms, made now
        self.core.prepare(self.spec, self.executor.tasks())

    async def info(self) -> dict[str, Any]:
        return await self.local.info(self.spec.id)

    async def run(self, request: TaskRequest) -> RunResult:
        if self.batcher is not None:
            return await self.batcher.submit(request)
        return await asyncio.to_thread(self.executor.run, request)

    async def run_progress(self, request: TaskRequest) -> AsyncIterator[Progress | RunResult]:
        """`run` for a stoppable model: heartbeats with the compute so far, then the result. Cancelling the
        stream (the client went away) stops the work at its next step."""
        async for item in run_with_progress(self.executor, request):
            yield item

    async def run_many(self, requests: list[TaskRequest]) -> list[RunResult | Exception]:
        """Run requests the ingress batched (one call for many): each result in order, an error as its value.

        On a batched replica they join the queue together with every other caller's requests."""
        if self.batcher is not None:
            return await self.batcher.submit_many(requests)
        results: list[RunResult | Exception] = []
        for request in requests:
            try:
                results.append(await asyncio.to_thread(self.executor.run, request))
            except ServiceError as err:
                results.append(err)
        return results

    async def _run_batch(
        self, requests: list[TaskRequest], queue_ns: list[int]
    ) -> list[RunResult | ServiceError]:
        return await self.placement.run(self.executor.run_batch, requests, queue_ns)

    async def stream(self, request: TaskRequest) -> AsyncIterator[StreamChunk | RunResult]:
        async for item in iterate_in_thread(lambda: self.executor.stream(request)):
            yield item


class RayBackend:
    """The ingress's view of the model deployments: Serve handles by model id.

    Requests to a model with `batching` go out in batches: the ingress queues them and sends one `run_many`
    call per batch (formed while the previous calls are in flight, as on the replica), so a busy batched model
    costs one Ray call per batch instead of one per request on both sides. The replica's batcher merges what
    every ingress sends. Calls in flight per model: its replicas (autoscaling: max_replicas x
    target_ongoing_requests, so that the autoscaler still sees the load).
    """

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        specs: list[ModelSpec] | None = None,
        app_names: dict[str, str] | None = None,
    ) -> None:
        self.handles = handles
        # Serve's replica counts (read when asked, at most once a second): /health, and the models that scale to
        # zero, for which a request finds out here whether a replica is up (serving/replicas.py).
        self.replica_counts = ReplicaCounts()
        cold = [s for s in specs or [] if s.scales_to_zero and s.id in handles]
        self.cold_starts = (
            ColdStarts(cold, app_names or {}, self._first_info, self.replica_counts) if cold else None
        )
        self.stoppable: dict[str, bool] = {}  # from each model's info: run through run_progress
        self.batchers: dict[str, Batcher] = {}
        for spec in specs or []:
            if spec.batching is not None and spec.id in handles:
                self.batchers[spec.id] = Batcher(
                    self._sender(handles[spec.id]),
                    spec.batching.max_batch_size,
                    spec.batching.batch_wait_timeout_s,
                    concurrency=calls_in_flight(spec),
                )

    async def info(self, model_id: str, *, outside_request: bool = False) -> dict[str, Any]:
        """The model's info from a replica. `outside_request`: not cancelled with the request that asked (a start
        of a model scaled to zero goes on for the next requests)."""
        remote = self.handles[model_id].info.remote
        info = await (detached(remote) if outside_request else remote())
        self.stoppable[model_id] = bool(info.get("stoppable"))
        return info

    async def _first_info(self, model_id: str) -> dict[str, Any]:
        return await self.info(model_id, outside_request=True)

    async def run(self, model_id: str, request: TaskRequest) -> RunResult:
        """Run one request. A replica that dies before answering (nothing charged) gets the request retried once,
        on another replica or the restarted one; then ReplicaUnavailable (503, Retry-After). A caller cancelled
        meanwhile (its client went away) gets Interrupted with the compute that ran (see serving/streaming.py)."""
        for attempt in range(REPLICA_ATTEMPTS):
            try:
                return await self._run_once(model_id, request)
            except REPLICA_GONE as err:
                if attempt + 1 == REPLICA_ATTEMPTS:
                    raise ReplicaUnavailable(
                        f"The replica serving {model_id} stopped before answering. Try again shortly.",
                        retry_after_s=REPLICA_RETRY_AFTER_S,
                    ) from err
                log.warning("a replica of %s died before answering (%s): retrying once", model_id, err)
        raise AssertionError("unreachable")

    async def _run_once(self, model_id: str, request: TaskRequest) -> RunResult:
        handle = self.handles[model_id]
        if self.stoppable.get(model_id):
            gen = detached(lambda: handle.options(stream=True).run_progress.remote(request))
            return await result_of(gen, gen.cancel)
        batcher = self.batchers.get(model_id)
        if batcher is not None:
            return await finish_despite_cancel(batcher.submit(request))
        return await finish_despite_cancel(detached(lambda: handle.run.remote(request)))

    @staticmethod
    def _sender(handle: DeploymentHandle) -> Any:
        async def send(requests: list[TaskRequest], waited_ns: list[int]) -> list[RunResult | Exception]:
            results = await handle.run_many.remote(requests)
            for result, waited in zip(results, waited_ns, strict=False):
                if isinstance(result, RunResult):
                    result.timings.queue_ns += waited  # the wait here is queueing too (never billed)
            return results

        return send

    async def stream(self, model_id: str, request: TaskRequest) -> AsyncIterator[StreamChunk | RunResult]:
        handle = self.handles[model_id]
        gen = detached(lambda: handle.options(stream=True).stream.remote(request))
        finished = False
        try:
            async for item in gen:
                yield item
            finished = True
        finally:
            if not finished:
                gen.cancel()  # the client went away: stop the replica's generation too


# Ray's word that the replica holding a request is gone (a process killed, a node lost) before it answered.
REPLICA_GONE = (RayActorError, WorkerCrashedError, NodeDiedError)
REPLICA_ATTEMPTS = 2
REPLICA_RETRY_AFTER_S = 2


def detached(call: Callable[[], T]) -> T:
    """Make a handle call outside the Serve request context: Serve cancels a request's own handle calls when
    its client disconnects, and the ingress must decide that itself (finish and charge, or stop and charge)."""
    return contextvars.Context().run(call)


def calls_in_flight(spec: ModelSpec) -> int:
    """How many batches the ingress keeps in flight to one batched model (see RayBackend)."""
    if spec.autoscaling is not None:
        return max(1, math.ceil(spec.autoscaling.max_replicas * spec.autoscaling.target_ongoing_requests))
    return max(1, spec.replicas or 1)


@serve.deployment
@serve.ingress()
class Ingress(HttpEntry):
    """The router application's HTTP entry: the FastAPI app of serving/http.py over Ray handles to the models.

    It takes the routes that no model application's prefix claims: those that name the model in the body
    (`/v1/chat/completions`, `/v1/completions`), `/pipeline/{task}/{id}`, `/hf-inference/...`, the listings, the
    account and billing APIs. Each model is found by its application's name (`app_names`: model id -> name)."""

    model_routes_only = False

    def __init__(self, app_names: dict[str, str], settings: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        install_ray_metrics()  # this replica's counters reach Prometheus through the node's Ray metrics agent
        loaded = Settings.load(settings)
        catalog = loaded.validated()[0]
        from serving.pool import as_deployed, model_handles

        # a pooled model's handle: its pool's deployment, bound to its id
        handles = model_handles(catalog, app_names)
        backend = RayBackend(handles, as_deployed(catalog), app_names)
        self._serve(loaded, backend)
