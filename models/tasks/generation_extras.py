"""The OpenAI sampling options beyond temperature and top-p, as hooks the text-generation runner calls.

- `frequency_penalty` / `presence_penalty` (OpenAI's definition: minus `frequency * count + presence * (count > 0)`
  on each token's logit, counting the tokens generated so far), `logit_bias` (token id -> bias in [-100, 100]);
- `response_format` / `grammar` / forced tool calls (models/tasks/constrained.py);
- `tools` rendered through the chat template, tool calls parsed from the output (models/tasks/chat_tools.py);
- `top_logprobs` (OpenAI) / `top_n_tokens` (TGI): how many alternatives to record per generated token.

Two ways in: `generate()` takes `logits_processors` (bias, penalties, grammar); the batching engine
(models/tasks/llm_engine.py) takes `logits_hooks` (bias, grammar) for its per-row processing and applies the
penalties itself from `penalties(parameters)` (SamplingParams.frequency_penalty / presence_penalty). Either way
the output goes through `finish_output` / `finish_stream` (tool calls) before it leaves the runner.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from models.errors import InvalidInput
from models.tasks import chat_tools, constrained
from models.types import CHAT_COMPLETION, TEXT_GENERATION, StreamChunk, TaskRequest

MAX_TOP_LOGPROBS = 20


def tools_of(request: TaskRequest) -> chat_tools.ToolRequest | None:
    if request.task != CHAT_COMPLETION:
        return None
    return chat_tools.tool_request(request.parameters)


def penalties(params: dict[str, Any]) -> tuple[float, float]:
    """(frequency_penalty, presence_penalty), validated; 0 when not given."""
    out = []
    for name in ("frequency_penalty", "presence_penalty"):
        value = params.get(name)
        if value is None:
            out.append(0.0)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
            raise InvalidInput(f"{name} must be a number between -2 and 2")
        out.append(float(value))
    return out[0], out[1]


def _logit_bias(params: dict[str, Any], vocab_size: int) -> dict[int, float]:
    bias = params.get("logit_bias")
    if not bias:
        return {}
    if not isinstance(bias, dict):
        raise InvalidInput("logit_bias must map token ids to numbers")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidInput(f"logit_bias: {key!r} is not a token id") from None
        if not 0 <= token < vocab_size:
            raise InvalidInput(
                f"logit_bias: token id {token} is outside the vocabulary (0..{vocab_size - 1})"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise InvalidInput(f"logit_bias[{key}] must be a number between -100 and 100")
        out[token] = float(value)
    return out


def top_n(request: TaskRequest) -> int | None:
    """Alternatives to record per generated token, or None when the request wants no per-token logprobs:
    `top_logprobs` with `logprobs: true` (OpenAI), `top_n_tokens` (TGI; its `details` carry the chosen tokens')."""
    p = request.parameters
    if request.task == TEXT_GENERATION:
        name, value = "top_n_tokens", p.get("top_n_tokens")
        if value is None:
            return None
    else:
        name, value = "top_logprobs", p.get("top_logprobs")
        if p.get("logprobs") is not None and not isinstance(p["logprobs"], bool):
            raise InvalidInput("logprobs must be a boolean")
        if not p.get("logprobs"):
            if value:
                raise InvalidInput("top_logprobs needs logprobs: true")
            return None
        value = 0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidInput(f"{name} must be an integer between 0 and {MAX_TOP_LOGPROBS}")
    return value


def validate(runner: Any, request: TaskRequest) -> None:
    """Refuse, naming the field, what this model cannot honour; compiles the constraint once."""
    p = request.parameters
    penalties(p)
    _logit_bias(p, _vocab_size(runner))
    top_n(request)
    tools = tools_of(request)
    chat_tools.check_supported(runner.tokenizer, tools)
    constrained.check(runner.tokenizer, runner.eos_ids, constrained.constraint_of(p, tools))


def _vocab_size(runner: Any) -> int:
    return int(getattr(runner.model.config, "vocab_size", None) or len(runner.tokenizer))


def template_inputs(
    request: TaskRequest, messages: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra apply_chat_template arguments): the tools, unless tool_choice is none; earlier tool
    calls' arguments as objects, as chat templates expect them."""
    tools = tools_of(request)
    kwargs = {"tools": tools.tools} if tools is not None and tools.active else {}
    return chat_tools.template_messages(messages), kwargs


def needs_processors(request: TaskRequest) -> bool:
    """Whether this request needs per-request logits processing (bias, penalties, a grammar)."""
    p = request.parameters
    return (
        any(penalties(p))
        or bool(p.get("logit_bias"))
        or constrained.constraint_of(p, tools_of(request)) is not None
    )


def logits_processors(runner: Any, request: TaskRequest, prompt_len: int) -> list[Any]:
    """The per-request logits processors, in order: bias, penalties, then the grammar mask last."""
    p = request.parameters
    processors: list[Any] = []
    bias = _logit_bias(p, _vocab_size(runner))
    if bias:
        processors.append(LogitBias(bias))
    frequency, presence = penalties(p)
    if frequency or presence:
        processors.append(Penalties(frequency, presence, prompt_len))
    constraint = constrained.constraint_of(p, tools_of(request))
    if constraint is not None:
        processors.append(
            constrained.GrammarLogitsProcessor(runner.tokenizer, runner.eos_ids, constraint, prompt_len)
        )
    return processors


def logits_hooks(runner: Any, request: TaskRequest, prompt_len: int) -> list[Any]:
    """The same for the batching engine's per-row hooks, `(history, row) -> row`; its sampler applies the
    penalties itself (SamplingParams.frequency_penalty / presence_penalty)."""
    p = request.parameters
    hooks: list[Any] = []
    bias = _logit_bias(p, _vocab_size(runner))
    if bias:
        hooks.append(lambda history, row, b=LogitBias(bias): b(None, row))
    constraint = constrained.constraint_of(p, tools_of(request))
    if constraint is not None:
        grammar = constrained.GrammarLogitsProcessor(runner.tokenizer, runner.eos_ids, constraint, prompt_len)
        hooks.append(grammar.hook)
    return hooks


def finish_output(request: TaskRequest, output: dict[str, Any]) -> dict[str, Any]:
    return chat_tools.finish_output(tools_of(request), output)


def finish_stream(
    request: TaskRequest, items: Iterator[StreamChunk | dict[str, Any]]
) -> Iterator[StreamChunk | dict[str, Any]]:
    return chat_tools.stream_with_tools(tools_of(request), items)


class LogitBias:
    """OpenAI `logit_bias`: a fixed number added to some tokens' logits."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = list(bias)
        self.values = list(bias.values())

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.clone()
        scores[..., self.ids] += torch.tensor(self.values, dtype=scores.dtype, device=scores.device)
        return scores


class Penalties:
    """OpenAI frequency and presence penalties over the tokens generated so far (the prompt is not counted)."""

    def __init__(self, frequency: float, presence: float, prompt_len: int) -> None:
        self.frequency, self.presence, self.prompt_len = frequency, presence, prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
