"""text-generation, TGI style: `{"inputs", "parameters", "stream"}` -> [{"generated_text"}] or TGI SSE events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Response

from models.catalog import ModelSpec
from models.errors import InvalidInput
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
    "top_n_tokens",  # details.top_tokens / each event's top_tokens
    "frequency_penalty",
    "grammar",  # {"type": "json" | "regex", "value"}: constrained decoding (models/tasks/constrained.py)
)


# TGI parameters this server does not implement, with the value that means "off". Set to anything else, they are
# refused with a 400 that names them. Not in the words of transformers' "`model_kwargs` are not used" error: on
# that one huggingface_hub's InferenceClient retries without them, but also marks the model as not served by TGI
# for the rest of the process, after which it refuses to stream from it and drops `details`.
_TGI_UNSUPPORTED = {
    "best_of": 1,
    "decoder_input_details": False,
    "truncate": None,
    "typical_p": None,
    "watermark": False,
    "adapter_id": None,
}


def _refuse_unsupported(params: dict[str, Any]) -> None:
    unused = [k for k, off in _TGI_UNSUPPORTED.items() if params.get(k) not in (None, off)]
    if unused:
        names = ", ".join(f"parameters.{k}" for k in unused)
        raise InvalidInput(f"{names}: not supported by this server; leave it out or set it to its default")


def _top(entries: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if entries is None:
        return None
    return [{k: e[k] for k in ("id", "text", "logprob", "special")} for e in entries]


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
        if output.get("top_tokens") is not None:
            details["top_tokens"] = [_top(t) for t in output["top_tokens"]]
    return details


class TextGenerationAdapter(TaskAdapter):
    task = TEXT_GENERATION
    can_stream = True

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        body = require_dict(body)
        given = parameters_of(body)
        _refuse_unsupported(given)
        params = {k: v for k, v in given.items() if k in _PARAMS and v is not None}
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
            "top_tokens": _top(chunk.top_logprobs),
        }
