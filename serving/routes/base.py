"""What every task family's routes share: the adapter interface, the request context, SSE helpers."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Response

from models.catalog import ModelSpec
from models.errors import InvalidInput
from models.types import RunResult, StreamChunk, TaskRequest
from serving.body import RawBody


@dataclass
class RequestContext:
    """Plain, per-request facts the routes and metering need. Picklable."""

    request_id: str  # x-request-id: the client's, when it sent one
    inference_id: str  # our UUID: keys the charge
    model_id: str
    started_at: Any  # datetime, UTC
    started_ns: int = field(default_factory=time.perf_counter_ns)
    user_agent: str = ""
    accept: str | None = None
    user: str = "local"
    billed_account: str = "local"
    created: int = field(default_factory=lambda: int(time.time()))
    held_ns: int = (
        0  # held while the model's first replica started (x-wait-for-model): queue time, never billed
    )


@dataclass
class Parsed:
    request: TaskRequest
    stream: bool = False
    characters: int | None = None  # x-compute-characters when the inputs aren't all text to bill


class TaskAdapter:
    """Turns a wire-format body into a TaskRequest and a RunResult (or a stream) into the wire response."""

    task: str = ""
    can_stream: bool = False

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        raise NotImplementedError

    def render(self, result: RunResult, parsed: Parsed, ctx: RequestContext) -> Response:
        return json_response(result.output)

    def render_stream(
        self, items: AsyncIterator[StreamChunk | RunResult], parsed: Parsed, ctx: RequestContext
    ) -> AsyncIterator[bytes]:
        raise NotImplementedError


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(
        json.dumps(content, ensure_ascii=False, separators=(",", ":")),
        status_code=status_code,
        media_type="application/json",
    )


def sse(data: Any) -> bytes:
    """One server-sent event; `data: ` with the space, which the Python client needs."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def require_dict(body: Any) -> dict[str, Any]:
    if isinstance(body, RawBody):  # not JSON, and no media type that says it is a file
        raise InvalidInput(
            'the request body is not valid JSON: this task takes a JSON object {"inputs": ...}'
        )
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


def parameters_of(body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput("parameters must be a JSON object")
    return dict(params)


def require_inputs(body: dict[str, Any]) -> Any:
    if "inputs" not in body or body["inputs"] is None:
        raise InvalidInput("inputs is required")
    return body["inputs"]
