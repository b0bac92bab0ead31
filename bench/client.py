"""Send one benchmark request and measure it: latency, time to first token, token times, billing headers.

Times are seconds on the run's monotonic clock (`time.perf_counter()` minus the run's start), so every
request of a run shares one time axis. Money is `Decimal`, parsed from the headers' exact decimal strings.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from bench.workloads import READ_IMAGE, READ_SSE_CHAT, RequestSpec

if TYPE_CHECKING:
    import httpx

# Response headers of the wire contract and of this backend's metering.
H_COMPUTE_TIME = "x-compute-time"
H_COMPUTE_TYPE = "x-compute-type"
H_COST_USD = "x-hfi-cost-usd"
H_INFERENCE_ID = "inference-id"
H_REQUEST_ID = "x-request-id"

ERROR_CONNECTION = "connection"
ERROR_TIMEOUT = "timeout"
ERROR_PROTOCOL = "protocol"


@dataclass
class RequestResult:
    """What one request did, measured by the client."""

    index: int
    scheduled_s: float  # when it was due (open loop: its arrival time; closed loop: when it was sent)
    sent_s: float
    end_s: float
    status: int  # HTTP status; 0 when no response came (see `error`)
    error: str | None = None  # "connection", "timeout", "protocol", or the server's error message
    client_request_id: str = ""
    request_id: str | None = None  # x-request-id of the response
    inference_id: str | None = None  # Inference-Id of the response: the ledger's key
    compute_seconds: Decimal | None = None  # x-compute-time
    compute_type: str | None = None  # x-compute-type
    cost_usd: Decimal | None = None  # x-hfi-cost-usd, or filled later from the price or the ledger
    cost_source: str | None = None  # header | price | ledger
    response_bytes: int = 0
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    tokens: int | None = None  # generated tokens: the server's usage count when it sent one

    @property
    def ok(self) -> bool:
        """A 2xx answer that was read to the end."""
        return 200 <= self.status < 300 and self.error is None

    @property
    def latency_s(self) -> float:
        """From when the request was due to the last byte: in open loop this includes client-side queueing."""
        return self.end_s - self.scheduled_s

    @property
    def ttft_s(self) -> float | None:
        """Time to first token, from when the request was due."""
        return None if self.first_token_s is None else self.first_token_s - self.scheduled_s

    @property
    def inter_token_s(self) -> list[float]:
        """Gaps between consecutive token events."""
        t = self.token_times_s
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def ledger_key(self) -> str:
        """The id the ledger keys this request's charge by (Inference-Id, else the request id)."""
        return self.inference_id or self.request_id or self.client_request_id


def parse_decimal(value: str | None) -> Decimal | None:
    """An exact decimal from a header value, or None when absent or malformed."""
    if value is None:
        return None
    try:
        d = Decimal(value.strip())
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


async def send(
    client: httpx.AsyncClient,
    spec: RequestSpec,
    *,
    index: int,
    scheduled_s: float,
    t0: float,
    token: str | None = None,
) -> RequestResult:
    """Send `spec` and read the answer to the end; never raises for a network or HTTP failure."""
    import httpx

    rid = str(uuid.uuid4())
    headers = {"X-Request-Id": rid, **spec.headers}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    sent_s = time.perf_counter() - t0
    result = RequestResult(index, scheduled_s, sent_s, sent_s, 0, client_request_id=rid)
    try:
        async with client.stream("POST", spec.path, json=spec.body, headers=headers) as resp:
            _read_headers(result, resp.headers)
            result.status = resp.status_code
            if resp.status_code >= 400:
                body = await resp.aread()
                result.response_bytes = len(body)
                result.error = _error_message(body)
            elif spec.streaming:
                await _read_stream(result, resp, spec.read, t0)
            else:
                body = await resp.aread()
                result.response_bytes = len(body)
                _check_body(result, body, spec.read, resp.headers.get("content-type", ""))
    except httpx.TimeoutException:
        result.error = ERROR_TIMEOUT
    except (httpx.TransportError, httpx.StreamError):
        result.error = ERROR_CONNECTION
    result.end_s = time.perf_counter() - t0
    return result


def _read_headers(result: RequestResult, headers: httpx.Headers) -> None:
    result.request_id = headers.get(H_REQUEST_ID)
    result.inference_id = headers.get(H_INFERENCE_ID)
    result.compute_seconds = parse_decimal(headers.get(H_COMPUTE_TIME))
    result.compute_type = headers.get(H_COMPUTE_TYPE)
    cost = parse_decimal(headers.get(H_COST_USD))
    if cost is not None:
        result.cost_usd, result.cost_source = cost, "header"


def _error_message(body: bytes) -> str:
    try:
        value = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace") or "error"
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return value["error"][:200]
    return json.dumps(value)[:200]


def _check_body(result: RequestResult, body: bytes, read: str, content_type: str) -> None:
    if read == READ_IMAGE:
        if not (body.startswith(b"\x89PNG\r\n\x1a\n") or body.startswith(b"\xff\xd8")):
            result.error = f"{ERROR_PROTOCOL}: expected an image, got {content_type or 'no content type'}"
        return
    try:
        value = json.loads(body)
    except ValueError:
        result.error = f"{ERROR_PROTOCOL}: the body is not JSON"
        return
    usage = value.get("usage") if isinstance(value, dict) else None
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        result.tokens = usage["completion_tokens"]
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        details = value[0].get("details")
        if isinstance(details, dict) and isinstance(details.get("generated_tokens"), int):
            result.tokens = details["generated_tokens"]


async def _read_stream(result: RequestResult, resp: httpx.Response, read: str, t0: float) -> None:
    nbytes = 0
    done = False
    counted = 0
    async for line in resp.aiter_lines():
        nbytes += len(line) + 1
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            event = json.loads(data)
        except ValueError:
            result.error = f"{ERROR_PROTOCOL}: an event is not JSON"
            break
        now = time.perf_counter() - t0
        if not isinstance(event, dict):
            continue
        if "error" in event:
            result.error = str(event["error"])[:200]
            break
        step = _chat_event(event) if read == READ_SSE_CHAT else _tgi_event(event)
        if step.token:
            counted += 1
            if result.first_token_s is None:
                result.first_token_s = now
            result.token_times_s.append(now)
        if step.usage_tokens is not None:
            result.tokens = step.usage_tokens
        done = done or step.final
    result.response_bytes = nbytes
    if result.tokens is None:
        result.tokens = counted
    if not done and result.error is None:
        what = "data: [DONE]" if read == READ_SSE_CHAT else "a final event with generated_text"
        result.error = f"{ERROR_PROTOCOL}: the stream ended without {what}"


@dataclass(frozen=True)
class _Event:
    token: bool  # the event carries generated text
    usage_tokens: int | None = None  # the server's count of generated tokens, when the event has one
    final: bool = False  # the event ends the stream (TGI's last event)


def _chat_event(event: dict[str, Any]) -> _Event:
    has_token = False
    for choice in event.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.get("content"):
            has_token = True
    usage = event.get("usage")
    count = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return _Event(has_token, count if isinstance(count, int) else None)


def _tgi_event(event: dict[str, Any]) -> _Event:
    token = event.get("token")
    has_token = isinstance(token, dict) and not token.get("special", False)
    details = event.get("details")
    count = details.get("generated_tokens") if isinstance(details, dict) else None
    final = event.get("generated_text") is not None
    return _Event(has_token, count if isinstance(count, int) else None, final)
