"""What every task family's routes share: the adapter interface, the request context, SSE helpers."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
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


def dumps(content: Any) -> bytes:
    """Compact UTF-8 JSON. orjson (an embedding's 384 floats: 13 us here, 330 us with the json module, on the
    replica's event loop, which shares the GIL with the model); what orjson refuses (keys that are not strings,
    integers past 64 bits) goes through the json module. Floats keep their exact value; orjson writes a small one as
    0.000033827... where the json module wrote 3.3827...e-05, and a NaN as null, which a JSON parser can read."""
    try:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(dumps(content), status_code=status_code, media_type="application/json")


def sse(data: Any) -> bytes:
    """One server-sent event; `data: ` with the space, which the Python client needs."""
    payload = data.encode() if isinstance(data, str) else dumps(data)
    return b"data: " + payload + b"\n\n"


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
