"""The ingress: HTTP in (the wire contract), one model call through a backend, metering, HTTP out.

`IngressCore` is plain async Python over a `ModelBackend` (Ray deployment handles in production, in-process
executors in unit tests); `create_app` puts the FastAPI routes on it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from billing.ratelimit import RateLimiter
from billing.service import Admission, BillingService, estimate_nanousd
from core.ids import uuid7
from metering import metrics
from metering.pricing import usd_per_second
from metering.records import (
    STATUS_CLIENT_DISCONNECTED,
    STATUS_DEADLINE_EXCEEDED,
    STATUS_OK,
    Charge,
    UsageRecord,
)
from metering.service import MeteringService
from models.catalog import ModelSpec
from models.compute_estimate import check_compute_estimate
from models.deadline import ComputeDeadlineExceeded
from models.errors import InvalidInput, ModelLoading, ModelNotFound, PayloadTooLarge, UnprocessableRequest
from models.types import Interrupted, RunResult, StreamChunk, TaskRequest
from serving.body import decode_body
from serving.config import Settings
from serving.errors import error_body, error_status, unwrap
from serving.replicas import wants_wait
from serving.routes.accounts import bearer_token
from serving.routes.base import Parsed, RequestContext, TaskAdapter, sse
from serving.routes.registry import ADAPTERS, choose_task
from serving.security import check_input_chars
from serving.streaming import LeavableStream, leavable_stream

log = logging.getLogger("serving.ingress")
T = TypeVar("T")

EXPOSED_HEADERS = [
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-compute-audio-length",
    "x-request-id",
    "x-sha",
    "inference-id",
    "x-hfi-cost-usd",
    "x-queue-time",
    "x-inference-time",
    "x-total-time",
    "x-prompt-tokens",
    "x-generated-tokens",
]


class ModelBackend(Protocol):
    """Where model work runs: `info` waits for a ready replica, `run` and `stream` do the work."""

    async def info(self, model_id: str) -> dict[str, Any]: ...

    async def run(self, model_id: str, request: TaskRequest) -> RunResult: ...

    def stream(self, model_id: str, request: TaskRequest) -> AsyncIterator[StreamChunk | RunResult]: ...


@dataclass
class Job:
    """One admitted request on its way through the ingress: what metering and the response need."""

    ctx: RequestContext
    spec: ModelSpec
    info: dict[str, Any]
    adapter: TaskAdapter
    parsed: Parsed
    admission: Admission

    @property
    def characters(self) -> int:
        """x-compute-characters: the characters of text input."""
        parsed = self.parsed
        return parsed.characters if parsed.characters is not None else parsed.request.input_characters()


# The longest client request id kept with a charge (the ledger's client_request_id column holds 256).
MAX_CLIENT_REQUEST_ID_CHARS = 256


# Set by hfi-haproxy (serving/haproxy_launcher.py) on a request whose `x-request-id` the proxy made up: the client
# sent none.
GENERATED_ID_HEADER = "x-hfi-generated-request-id"


def _client_header(headers: Any, name: str) -> str | None:
    """A client-supplied id header, refused (400, naming it) when longer than the ledger keeps."""
    value = headers.get(name)
    if value is not None and len(value) > MAX_CLIENT_REQUEST_ID_CHARS:
        raise InvalidInput(
            f"header {name}: at most {MAX_CLIENT_REQUEST_ID_CHARS} characters, got {len(value)}"
        )
    return value


def _usage_extra(result: RunResult | None) -> dict[str, Any]:
    """What a charge records beside the time: a generation's prompt and generated tokens, and the replica's own
    counts (Timings.extra: the engine steps a continuously batched request took part in)."""
    if result is None:
        return {}
    extra: dict[str, Any] = dict(result.timings.extra)
    if "prompt_tokens" in result.usage:
        extra["prompt_tokens"] = int(result.usage["prompt_tokens"])
        extra["generated_tokens"] = int(result.usage.get("completion_tokens", 0))
    return extra


def _seconds(ns: int) -> str:
    return f"{ns / 1e9:.3f}"


class IngressCore:
    """Routes a request to its model, meters it, and shapes the response."""

    def __init__(
        self,
        settings: Settings,
        backend: ModelBackend,
        metering: MeteringService | None = None,
        billing: BillingService | None = None,
        *,
        set_request_id_header: bool = True,
    ) -> None:
        self.settings = settings
        self.catalog, self.profiles = settings.validated()
        # Admission's estimate per hardware profile, with the exact price it was made from (pricing's, the same
        # object until the price point changes) and the seconds: exact fractions cost more than the rest of an
        # admission from memory, so it is made again only when either changes.
        self._estimates: dict[str, tuple[Fraction, float, int]] = {}
        self.backend = backend
        self.metering = metering or MeteringService(settings.metering, self.profiles)
        self.billing = billing or BillingService(settings.billing, settings.metering.resolved_database_url())
        self._info: dict[str, dict[str, Any]] = {}
        self._background: set[asyncio.Task] = set()  # charges and settlements that outlive their request
        self.rate_limiter = RateLimiter()  # this process's counts per token and account (serving/security.py)
        # Behind Ray Serve's proxy, the proxy itself answers with x-request-id (the client's, when it sent one).
        self.set_request_id_header = set_request_id_header

    def prepare(self, spec: ModelSpec, tasks: tuple[str, ...]) -> None:
        """What a model's first request would otherwise make on its way, made before the replica takes traffic: the
        metric series of its answered and charged requests (at zero) and its profile's price terms. Never charged,
        never counted."""
        for task in tasks:
            metrics.prepare(spec.id, task, spec.hardware_profile)
        self.metering.prepare(spec.hardware_profile)

    # Looking things up

    def spec(self, model_id: str) -> ModelSpec:
        model_id = model_id.removesuffix(":hf-inference")
        spec = self.catalog.get(model_id)
        if spec is None:
            raise ModelNotFound(model_id)
        return spec

    async def model_info(self, spec: ModelSpec) -> dict[str, Any]:
        """The model's revision and tasks, from a ready replica; waits (bounded) while replicas start."""
        info = self._info.get(spec.id)
        if info is not None:
            return info
        try:
            info = await asyncio.wait_for(self.backend.info(spec.id), self.settings.model_wait_timeout_s)
        except asyncio.TimeoutError:
            raise ModelLoading(
                f"Model {spec.id} is currently loading", estimated_time=self.settings.model_wait_timeout_s
            ) from None
        self._info[spec.id] = info
        return info

    async def replica_up(self, spec: ModelSpec, request: Request, body: Any) -> int:
        """For a model that scales to zero: return once a replica is up (the ns the request was held), or raise
        ModelLoading (503, estimated_time) at once or when the wait is over (serving/replicas.py)."""
        cold = getattr(self.backend, "cold_starts", None)
        if cold is None or spec.id not in cold:
            return 0
        wait = wants_wait(request.headers, body)
        return await cold.ensure(spec.id, wait, self.settings.model_wait_timeout_s)

    # Requests

    def context(self, request: Request, spec: ModelSpec) -> RequestContext:
        headers = request.headers
        trace_id = _client_header(headers, "x-amzn-trace-id")
        client_id = None if GENERATED_ID_HEADER in headers else _client_header(headers, "x-request-id")
        client_id = client_id or trace_id
        inference_id = str(uuid7())
        ctx = RequestContext(
            request_id=client_id or inference_id,
            inference_id=inference_id,
            model_id=spec.id,
            started_at=dt.datetime.now(dt.timezone.utc),
            user_agent=headers.get("user-agent", ""),
            accept=headers.get("accept"),
            user=self.settings.billing.local_account,
            billed_account=self.settings.billing.local_account,
        )
        request.state.request_id = ctx.request_id
        return ctx

    async def read_json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"the request body is {length} bytes, more than the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body is more than the limit of {limit} bytes")
            chunks.append(chunk)
        # JSON, or a media file's raw bytes (image and audio tasks): serving/body.py decides.
        return decode_body(b"".join(chunks), request.headers.get("content-type"))

    async def handle(self, request: Request, model_id: str | None, hint: str | None = None) -> Response:
        """Serve one inference request and count it in the metrics, errors included."""
        started_ns = time.perf_counter_ns()
        try:
            response = await self._handle(request, model_id, hint)
        except (Exception, asyncio.CancelledError) as err:
            label = getattr(request.state, "metric_labels", None)
            if label is not None:
                metrics.observe_request(
                    **label,
                    status=499 if isinstance(err, asyncio.CancelledError) else error_status(err),
                    total_seconds=(time.perf_counter_ns() - started_ns) / 1e9,
                )
            raise
        label = getattr(request.state, "metric_labels", None)
        if label is not None and not isinstance(response, StreamingResponse):  # streams count at their end
            metrics.observe_request(
                **label,
                status=response.status_code,
                total_seconds=(time.perf_counter_ns() - started_ns) / 1e9,
                queue_seconds=request.state.queue_seconds,
                compute_seconds=request.state.compute_seconds,
            )
        return response

    async def _handle(self, request: Request, model_id: str | None, hint: str | None) -> Response:
        """The model from the URL (or, when None, the body's `model`); the task from `hint`, else the body's
        shape, else the model's own. Parsing (400/404/413/422) and admission (401/402/403) come before any
        compute, so a refused request is never charged."""
        if model_id is not None:
            spec = self.spec(model_id)
            body = await self.read_json(request)
        else:
            body = await self.read_json(request)
            name = body.get("model") if isinstance(body, dict) else None
            if not isinstance(name, str) or not name:
                raise UnprocessableRequest("model: a model id is required")
            spec = self.spec(name)
        ctx = self.context(request, spec)
        ctx.held_ns = await self.replica_up(spec, request, body)
        info = await self.model_info(spec)
        task = choose_task(tuple(info["tasks"]), spec.task, body, hint)
        request.state.metric_labels = {
            "model_id": spec.id,
            "task": task,
            "hardware_profile": spec.hardware_profile,
        }
        adapter = ADAPTERS[task]
        parsed = adapter.parse(body, spec, ctx)
        check_input_chars(parsed, spec)  # before the replica's lock: a refusal there would tie it up for free
        check_compute_estimate(parsed.request, spec, info)  # an image that cannot finish in time: never run
        if parsed.stream and not adapter.can_stream:
            raise InvalidInput(f"task {task} does not stream")
        job = Job(ctx, spec, info, adapter, parsed, await self.admit(request, ctx, spec))
        if parsed.stream:
            return self.streaming_response(job)
        try:
            result = await self.backend.run(spec.id, parsed.request)
        except Interrupted as gone:  # the client went away: charge what ran, flagged, and answer no one
            if gone.compute_ns > 0 or gone.result is not None:
                self.in_background(self.charge(job, gone.compute_ns, gone.result, STATUS_CLIENT_DISCONNECTED))
            else:  # no step ran (still queued, or refused on the replica): nothing to charge, as for a stream
                self.in_background(self.release(job.admission))
            raise asyncio.CancelledError from None
        except BaseException as err:
            stopped = unwrap(err)
            if isinstance(stopped, ComputeDeadlineExceeded):  # stopped at its compute limit: charge what ran
                charging = self.charge(job, stopped.compute_ns, None, STATUS_DEADLINE_EXCEEDED)
                await asyncio.shield(self.in_background(charging))
                raise stopped from None
            await asyncio.shield(self.in_background(self.release(job.admission)))
            raise
        result.timings.queue_ns += ctx.held_ns
        # The charge and its settlement go on if the client leaves now: they must not be cancelled half-way.
        charge = await asyncio.shield(self.in_background(self.charge(job, result.timings.compute_ns, result)))
        request.state.queue_seconds = result.timings.queue_ns / 1e9
        request.state.compute_seconds = result.timings.compute_ns / 1e9
        response = adapter.render(result, parsed, ctx)
        response.headers.update(self.base_headers(job))
        response.headers.update(self.result_headers(result, charge, ctx))
        return response

    def in_background(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `work` as a task of its own that a cancelled request cannot stop (held until it ends)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # Billing: admission before compute, settlement after

    async def admit(self, request: Request, ctx: RequestContext, spec: ModelSpec) -> Admission:
        """Resolve the caller and the billed account, and reserve an estimate (401/402/403/503 raise here).

        First of all: 503 while this process's spool cannot write its charges (`check_recording`)."""
        self.metering.check_recording()
        token, bill_to = bearer_token(request), request.headers.get("x-hf-bill-to")
        if self.settings.billing.mode == "open":  # nothing to reserve, no database work: no thread hop either
            admission = self.billing.admit(token, bill_to, spec.id, 0, ctx.started_at)
        else:
            estimate = self._estimate(spec.hardware_profile, ctx.started_at)
            # From memory (the cached token and policy, the account's budget lease) when it can: no thread hop,
            # no database; else a worker thread, which may wait on the database.
            admission_now = self.billing.admit_nowait(
                token, bill_to, spec.id, estimate, ctx.started_at, request_id=ctx.inference_id
            )
            if admission_now is not None:
                ctx.user, ctx.billed_account = admission_now.user, admission_now.billed_account
                return admission_now
            reserving = self.in_background(
                asyncio.to_thread(
                    self.billing.admit,
                    token,
                    bill_to,
                    spec.id,
                    estimate,
                    ctx.started_at,
                    request_id=ctx.inference_id,
                )
            )
            try:
                admission = await asyncio.shield(reserving)
            except (
                asyncio.CancelledError
            ):  # the client left while its estimate was being reserved: give it back
                self.in_background(self._release_when_reserved(reserving))
                raise
        ctx.user, ctx.billed_account = admission.user, admission.billed_account
        return admission

    def _estimate(self, profile: str, started_at: dt.datetime) -> int:
        """What admission reserves for a request on `profile`: `billing.estimate_compute_s` at its price then."""
        price = usd_per_second(self.profiles.get(profile).price_at(started_at))
        seconds = self.settings.billing.estimate_compute_s
        known = self._estimates.get(profile)
        if known is not None and known[0] is price and known[1] == seconds:
            return known[2]
        estimate = estimate_nanousd(price, seconds)
        self._estimates[profile] = (price, seconds, estimate)
        return estimate

    async def _release_when_reserved(self, reserving: asyncio.Task[Admission]) -> None:
        try:
            admission = await reserving
        except Exception:  # refused (401/402/403/503): nothing was reserved
            return
        await self.release(admission)

    async def release(self, admission: Admission) -> None:
        """Give back the reservation of a request that was not charged (in memory: written behind, batched)."""
        if admission.reservation_id is None:
            return
        try:
            self.billing.release(admission)
        except Exception:
            log.exception("billing: could not release a reservation")

    async def settle(self, job: Job, charge: Charge) -> None:
        """Replace the reservation by the true cost."""
        if job.admission.reservation_id is None:
            return
        try:
            self.billing.settle(  # queued in memory and written behind the response, batched
                job.admission,
                charge.cost_nanousd,
                request_id=job.ctx.inference_id,
                hardware_profile=job.spec.hardware_profile,
            )
        except Exception:
            log.exception("billing: could not settle request %s", job.ctx.inference_id)

    # Headers

    def base_headers(self, job: Job) -> dict[str, str]:
        """What every response of this request carries, streams included."""
        headers = {
            "inference-id": job.ctx.inference_id,
            "x-compute-type": job.spec.hardware_profile,
            "x-sha": str(job.info.get("revision", "")),
            "x-compute-characters": str(job.characters),
            "access-control-expose-headers": ", ".join(EXPOSED_HEADERS),
        }
        if self.set_request_id_header:
            headers["x-request-id"] = job.ctx.request_id
        return headers

    @staticmethod
    def result_headers(result: RunResult, charge: Charge | None, ctx: RequestContext) -> dict[str, str]:
        """Timings and the charge: known only once the model has answered (so never on a stream)."""
        t = result.timings
        headers = {
            "x-queue-time": _seconds(t.queue_ns),
            "x-inference-time": _seconds(t.compute_ns),
            "x-total-time": _seconds(time.perf_counter_ns() - ctx.started_ns),
        }
        if charge is not None:
            headers["x-compute-time"] = charge.compute_time_header
            headers["x-hfi-cost-usd"] = charge.cost_usd_header
        else:
            headers["x-compute-time"] = _seconds(t.compute_ns)
        if "input_audio_ms" in result.usage:
            headers["x-compute-audio-length"] = f"{result.usage['input_audio_ms'] / 1000:.3f}"
        if "prompt_tokens" in result.usage:
            headers["x-prompt-tokens"] = str(result.usage["prompt_tokens"])
            headers["x-generated-tokens"] = str(result.usage.get("completion_tokens", 0))
        return headers

    # Metering

    async def charge(
        self, job: Job, compute_ns: int, result: RunResult | None, status: str = STATUS_OK
    ) -> Charge | None:
        """Record the charge of a request that ran and settle its reservation.

        A metering or billing fault is logged and counted, never the client's problem.
        """
        ctx, timings = job.ctx, (result.timings if result is not None else None)
        usage = UsageRecord(
            request_id=ctx.inference_id,
            started_at=ctx.started_at,
            model_id=job.spec.id,
            revision=str(job.info.get("revision", "")),
            task=job.parsed.request.task,
            hardware_profile=job.spec.hardware_profile,
            compute_ns=compute_ns,
            queue_ns=timings.queue_ns if timings else 0,
            total_ns=time.perf_counter_ns() - ctx.started_ns,
            batch_size=timings.batch_size if timings else 1,
            batch_id=timings.batch_id if timings else None,
            batch_compute_ns=timings.batch_compute_ns if timings else None,
            batch_offset_ns=timings.batch_offset_ns if timings else 0,
            input_characters=max(0, job.characters),  # -1 (media input) in the header, 0 in the ledger
            input_images=int(result.usage.get("input_images", 0)) if result is not None else 0,
            input_audio_seconds=result.usage.get("input_audio_ms", 0) / 1000 if result is not None else 0.0,
            user=ctx.user,
            billed_account=ctx.billed_account,
            status=status,
            client_request_id=ctx.request_id if ctx.request_id != ctx.inference_id else None,
            extra=_usage_extra(result),
        )
        try:
            charge = await self.metering.record_async(usage)
        except Exception:
            log.exception("metering failed for request %s", ctx.inference_id)
            await self.release(job.admission)
            return None
        await self.settle(job, charge)
        return charge

    # Streams

    def streaming_response(self, job: Job) -> Response:
        headers = {**self.base_headers(job), "cache-control": "no-cache"}
        return StreamingResponse(self._metered_stream(job), media_type="text/event-stream", headers=headers)

    async def _metered_stream(self, job: Job) -> AsyncIterator[bytes]:
        """Stream the model's chunks; charge after the last token, or for what ran if the client left: every step
        the model ran for it until it dropped the stream, when the backend can tell (`LeavableStream.stop`), else
        the compute of the last chunk read.

        A stream that fails is not charged; its error is the last event (the status line is already sent).
        """
        consumed_ns = 0
        final: RunResult | None = None
        outcome = "disconnected"  # until the stream ends one way or the other
        source = leavable_stream(self.backend, job.spec.id, job.parsed.request)

        async def items() -> AsyncIterator[StreamChunk | RunResult]:
            nonlocal consumed_ns, final
            async for item in source:
                if isinstance(item, RunResult):
                    item.timings.queue_ns += job.ctx.held_ns
                    final, consumed_ns = item, item.timings.compute_ns
                else:
                    consumed_ns = item.elapsed_ns
                yield item

        try:
            async for data in job.adapter.render_stream(items(), job.parsed, job.ctx):
                yield data
            outcome = "ok"
        except Exception as err:
            outcome = "error"
            stopped = unwrap(err)
            if isinstance(stopped, ComputeDeadlineExceeded):  # stopped at its compute limit: charge what ran
                outcome, consumed_ns = "deadline", stopped.compute_ns
            _, body = error_body(err)
            yield sse(body)
        finally:
            settle = self._settle_stream(job, final, consumed_ns, outcome, source)
            await asyncio.shield(self.in_background(settle))

    async def _settle_stream(
        self,
        job: Job,
        final: RunResult | None,
        consumed_ns: int,
        outcome: str,
        source: LeavableStream | None = None,
    ) -> None:
        if source is not None:  # a stream left (or broken) mid-way: stop the model, learn what it ran
            stopped = await source.stop()
            if stopped is not None and final is None and outcome == "disconnected":
                consumed_ns = max(consumed_ns, stopped.compute_ns)
        spec = job.spec
        labels = {
            "model_id": spec.id,
            "task": job.parsed.request.task,
            "hardware_profile": spec.hardware_profile,
        }
        total_s = (time.perf_counter_ns() - job.ctx.started_ns) / 1e9
        if final is not None:
            await self.charge(job, final.timings.compute_ns, final)
            metrics.observe_request(
                **labels,
                status=200,
                total_seconds=total_s,
                queue_seconds=final.timings.queue_ns / 1e9,
                compute_seconds=final.timings.compute_ns / 1e9,
            )
        elif outcome == "deadline":
            await self.charge(job, consumed_ns, None, STATUS_DEADLINE_EXCEEDED)
            metrics.observe_request(**labels, status=504, total_seconds=total_s)
        elif outcome == "disconnected" and consumed_ns > 0:
            # The client went away mid-stream: charge the compute it consumed, flagged as such.
            await self.charge(job, consumed_ns, None, STATUS_CLIENT_DISCONNECTED)
            metrics.observe_request(**labels, status=499, total_seconds=total_s)
        else:
            await self.release(job.admission)
            metrics.observe_request(
                **labels, status=500 if outcome == "error" else 499, total_seconds=total_s
            )

    def close(self) -> None:
        """Drain metering and close the database connections (replica shutdown)."""
        self.metering.close()
        self.billing.close()
