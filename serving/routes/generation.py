"""text-generation, TGI style: `{"inputs", "parameters", "stream"}` -> [{"generated_text"}] or TGI SSE events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Response

from models.catalog import ModelSpec
from models.types import TEXT_GENERATION, RunResult, StreamChunk, TaskRequest
from serving.routes.base import (
    Parsed,
    RequestContext,
    TaskAdapter,
    json_response,
    parameters_of,
    require_dict,
    require_inputs,
    sse,
)

_PARAMS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "do_sample",
    "seed",
    "stop",
    "stop_sequences",
    "return_full_text",
    "details",
)


def _details(output: dict[str, Any], usage: dict[str, int], with_tokens: bool) -> dict[str, Any]:
    details: dict[str, Any] = {
        "finish_reason": output["finish_reason"],
        "generated_tokens": output["generated_tokens"],
        "seed": output.get("seed"),
        "input_length": usage.get("prompt_tokens"),
    }
    if with_tokens:
        details["prefill"] = []
        details["tokens"] = output["tokens"]
    return details


class TextGenerationAdapter(TaskAdapter):
    task = TEXT_GENERATION
    can_stream = True

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        body = require_dict(body)
        params = {k: v for k, v in parameters_of(body).items() if k in _PARAMS and v is not None}
        stream = body.get("stream") is True
        return Parsed(
            TaskRequest(TEXT_GENERATION, require_inputs(body), params, ctx.request_id), stream=stream
        )

    @staticmethod
    def _full_text(parsed: Parsed, text: str) -> str:
        if parsed.request.parameters.get("return_full_text"):
            return parsed.request.inputs + text
        return text

    def render(self, result: RunResult, parsed: Parsed, ctx: RequestContext) -> Response:
        out: dict[str, Any] = {"generated_text": self._full_text(parsed, result.output["text"])}
        if parsed.request.parameters.get("details"):
            out["details"] = _details(result.output, result.usage, with_tokens=True)
        return json_response([out])

    async def render_stream(
        self, items: AsyncIterator[StreamChunk | RunResult], parsed: Parsed, ctx: RequestContext
    ) -> AsyncIterator[bytes]:
        # Events lag one token behind so the last token's event can carry generated_text and details.
        pending: StreamChunk | None = None
        index = 0
        async for item in items:
            if isinstance(item, RunResult):
                last = pending or StreamChunk(text="", token_id=0, special=True)
                details = _details(item.output, item.usage, with_tokens=False)
                yield sse(self._event(index, last, self._full_text(parsed, item.output["text"]), details))
                return
            if item.token_id is None and pending is not None:  # held-back text flushed at the end
                pending.text += item.text
                continue
            if pending is not None:
                yield sse(self._event(index, pending, None, None))
                index += 1
            pending = item

    @staticmethod
    def _event(index: int, chunk: StreamChunk, generated_text: str | None, details: Any) -> dict[str, Any]:
        token = {
            "id": chunk.token_id or 0,
            "text": chunk.text,
            "logprob": chunk.logprob,
            "special": chunk.special,
        }
        return {
            "index": index,
            "token": token,
            "generated_text": generated_text,
            "details": details,
            "top_tokens": None,
        }
