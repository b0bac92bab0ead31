"""OpenAI chat completions and completions, streaming and not, validated like OpenAI does (422)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.catalog import ModelSpec
from models.errors import InvalidInput, UnprocessableRequest
from models.types import CHAT_COMPLETION, COMPLETION, RunResult, StreamChunk, TaskRequest
from serving.routes import openai_fields
from serving.routes.base import Parsed, RequestContext, TaskAdapter, json_response, require_dict, sse

_LOGPROB_FIELDS = ("logprobs", "top_logprobs")
_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop", "tool_calls": "tool_calls"}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1)  # more than 1: a 400 (openai_fields)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    top_k: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = Field(default=None, gt=0)


class ChatCompletionBody(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    parallel_tool_calls: bool | None = None


class CompletionBody(_Common):
    prompt: str | list[str]
    echo: bool | None = False


def _validate(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(require_dict(body))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise UnprocessableRequest(f"{where}: {first['msg']}") from None


def _sampling(body: _Common) -> dict[str, Any]:
    params: dict[str, Any] = {}
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    names = ("temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty", "logit_bias")
    for name in (*names, "top_k", "repetition_penalty"):
        value = getattr(body, name)
        if value is not None:
            params[name] = value
    return params


def _usage(result: RunResult) -> dict[str, int]:
    prompt, completion = result.usage.get("prompt_tokens", 0), result.usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChatCompletionAdapter(TaskAdapter):
    task = CHAT_COMPLETION
    can_stream = True

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        openai_fields.check_chat(require_dict(body))
        chat = _validate(ChatCompletionBody, body)
        params = _sampling(chat)
        for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format", *_LOGPROB_FIELDS):
            value = getattr(chat, name)
            if value is not None:
                params[name] = value
        chars = sum(len(m["content"]) for m in chat.messages if isinstance(m.get("content"), str))
        request = TaskRequest(CHAT_COMPLETION, chat.messages, params, ctx.request_id)
        include_usage = bool((chat.stream_options or {}).get("include_usage"))
        request.parameters["_include_usage"] = include_usage  # read back by render_stream; runners ignore it
        return Parsed(request, stream=bool(chat.stream), characters=chars)

    def render(self, result: RunResult, parsed: Parsed, ctx: RequestContext) -> Response:
        out = result.output
        message: dict[str, Any] = {"role": "assistant", "content": out["text"]}
        if out.get("tool_calls"):
            message["content"] = out["text"] or None
            message["tool_calls"] = out["tool_calls"]
        logprobs = openai_fields.logprobs_of(out) if parsed.request.parameters.get("logprobs") else None
        return json_response(
            {
                "id": f"chatcmpl-{ctx.inference_id}",
                "object": "chat.completion",
                "created": ctx.created,
                "model": ctx.model_id,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": _FINISH[out["finish_reason"]],
                        "logprobs": logprobs,
                    }
                ],
                "usage": _usage(result),
            }
        )

    def _chunk(
        self,
        ctx: RequestContext,
        delta: dict[str, Any],
        finish: str | None,
        usage: Any = None,
        choices: bool = True,
        logprobs: Any = None,
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{ctx.inference_id}",
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model_id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
            if choices
            else [],
        }
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    async def render_stream(
        self, items: AsyncIterator[StreamChunk | RunResult], parsed: Parsed, ctx: RequestContext
    ) -> AsyncIterator[bytes]:
        yield sse(self._chunk(ctx, {"role": "assistant", "content": ""}, None))
        want_logprobs = bool(parsed.request.parameters.get("logprobs"))
        async for item in items:
            if isinstance(item, RunResult):
                yield sse(self._chunk(ctx, {}, _FINISH[item.output["finish_reason"]]))
                if parsed.request.parameters.get("_include_usage"):
                    yield sse(self._chunk(ctx, {}, None, usage=_usage(item), choices=False))
                yield sse("[DONE]")
                return
            delta: dict[str, Any] = {"content": item.text} if item.text else {}
            if item.tool_calls:
                delta["tool_calls"] = item.tool_calls
            logprobs = None
            if want_logprobs and item.token_id is not None and not item.special:
                lp = item.logprob or 0.0
                entry = openai_fields.logprob_entry(item.token_text or "", lp, item.top_logprobs)
                logprobs = {"content": [entry], "refusal": None}
            if delta or logprobs:
                yield sse(self._chunk(ctx, delta, None, logprobs=logprobs))


class CompletionAdapter(TaskAdapter):
    task = COMPLETION
    can_stream = True

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        openai_fields.check_completion(require_dict(body))
        comp = _validate(CompletionBody, body)
        prompt = comp.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidInput("prompt: only one prompt per request is supported")
            prompt = prompt[0]
        params = _sampling(comp)
        params["_echo"] = bool(comp.echo)
        request = TaskRequest(COMPLETION, prompt, params, ctx.request_id)
        return Parsed(request, stream=bool(comp.stream))

    def _body(
        self, ctx: RequestContext, text: str, finish: str | None, obj: str = "text_completion"
    ) -> dict[str, Any]:
        return {
            "id": f"cmpl-{ctx.inference_id}",
            "object": obj,
            "created": ctx.created,
            "model": ctx.model_id,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        }

    def render(self, result: RunResult, parsed: Parsed, ctx: RequestContext) -> Response:
        text = result.output["text"]
        if parsed.request.parameters.get("_echo"):
            text = parsed.request.inputs + text
        body = self._body(ctx, text, _FINISH[result.output["finish_reason"]])
        body["usage"] = _usage(result)
        return json_response(body)

    async def render_stream(
        self, items: AsyncIterator[StreamChunk | RunResult], parsed: Parsed, ctx: RequestContext
    ) -> AsyncIterator[bytes]:
        if parsed.request.parameters.get("_echo"):
            yield sse(self._body(ctx, parsed.request.inputs, None))
        async for item in items:
            if isinstance(item, RunResult):
                final = self._body(ctx, "", _FINISH[item.output["finish_reason"]])
                final["usage"] = _usage(item)
                yield sse(final)
                yield sse("[DONE]")
                return
            if item.text:
                yield sse(self._body(ctx, item.text, None))
