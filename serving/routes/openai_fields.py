"""Which OpenAI request fields this server honours, accepts as no-ops, or refuses; and the OpenAI shapes of
logprobs and tool calls in answers. The user-facing table is docs/openai-fields.md: keep the two in step.

No field is dropped silently: a field is either honoured, accepted because it cannot change the answer (an
identifier, a caching hint), or refused with a 400 that names it. An unknown field is refused too, as OpenAI
itself does ("Unrecognized request argument supplied").
"""

from __future__ import annotations

from typing import Any

from models.errors import InvalidInput
from models.tasks.constrained import response_format_constraint

_CHAT_HONOURED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        # extensions that vLLM and TGI accept too
        "top_k",
        "repetition_penalty",
    }
)
_COMPLETION_HONOURED = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "best_of",
        "echo",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "top_k",
        "repetition_penalty",
    }
)
# Accepted and without effect on the answer: identifiers and hints for OpenAI's own storage and caching.
_NO_OPS = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key"})
# Known OpenAI fields this server does not implement, with why.
_REFUSED = {
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning effort is not supported",
    "verbosity": "verbosity is not supported",
    "functions": "deprecated by OpenAI: use tools",
    "function_call": "deprecated by OpenAI: use tool_choice",
    "tool_prompt": "not supported: tools are rendered by the model's chat template",
    "suffix": "suffix (insertion) is not supported",
    "logprobs": "logprobs on completions are not supported (chat completions support them)",
    "service_tier": "only the default service tier exists",
    "store": "stored completions are not supported",
}
_STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})


def _refuse(name: str) -> InvalidInput:
    return InvalidInput(f"{name}: {_REFUSED[name]}")


def _allowed_value(name: str, value: Any) -> bool:
    """Refused fields that are fine at their default (an SDK may send the default explicitly)."""
    if value is None:
        return True
    return (
        (name == "modalities" and value == ["text"])
        or (name == "service_tier" and value in ("auto", "default"))
        or (name == "store" and value is False)
        or (name in ("functions",) and value == [])
    )


def _check_fields(body: dict[str, Any], honoured: frozenset[str]) -> None:
    for name, value in body.items():
        if name in honoured or name in _NO_OPS:
            continue
        if name in _REFUSED:
            if not _allowed_value(name, value):
                raise _refuse(name)
            continue
        raise InvalidInput(f"Unrecognized request argument supplied: {name}")
    options = body.get("stream_options")
    if isinstance(options, dict):
        for key in options:
            if key not in _STREAM_OPTIONS:
                raise InvalidInput(f"stream_options: unrecognized option {key}")


def check_chat(body: dict[str, Any]) -> None:
    """400 for a refused or unknown chat field, and for a response_format that cannot be enforced."""
    _check_fields(body, _CHAT_HONOURED)
    if body.get("n") not in (None, 1):
        raise InvalidInput("n: only one choice per request is supported (n=1)")
    response_format_constraint(body.get("response_format"))


def check_completion(body: dict[str, Any]) -> None:
    """400 for a refused or unknown completions field."""
    honoured = _COMPLETION_HONOURED
    if body.get("logprobs") is None:
        honoured = honoured | {"logprobs"}
    _check_fields(body, honoured)
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise InvalidInput(f"{name}: only one choice per request is supported ({name}=1)")


# Answers


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def logprob_entry(text: str, logprob: float, top: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One token of OpenAI's `logprobs.content`."""
    entry = _entry(text, logprob)
    entry["top_logprobs"] = [_entry(t["text"], t["logprob"]) for t in top or []]
    return entry


def logprobs_of(output: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `choices[i].logprobs` of a whole answer; the end-of-sequence token is not part of it."""
    tops = output.get("top_tokens") or [None] * len(output["tokens"])
    content = [
        logprob_entry(t["text"], t["logprob"], top)
        for t, top in zip(output["tokens"], tops, strict=True)
        if not t["special"]
    ]
    return {"content": content, "refusal": None}
