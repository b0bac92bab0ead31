"""Constrained decoding: `response_format` (JSON object, JSON schema), TGI's `grammar` and forced tool calls.

llguidance (guidance-ai; the library vLLM, SGLang and llama.cpp use) compiles a JSON schema or a regular expression
into a matcher that gives, at each step, the tokens that keep the output valid, as a bitmask over the vocabulary.
`GrammarLogitsProcessor` sets every other token's logit to -inf, so whatever the sampling, the answer parses.
JSON is written compactly (`{"a": 1, "b": [2, 3]}`): free whitespace lets small models loop on newlines.

The request side (`constraint_of`) is plain Python so the serving layer can refuse a bad format before queueing;
llguidance and torch are imported only when a constraint is compiled or applied.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from models.errors import InvalidInput
from models.tasks.chat_tools import ToolRequest

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """What the output must match: a JSON schema (`kind="json_schema"`) or a regular expression (`"regex"`)."""

    kind: str
    value: Any
    field: str  # the request field it came from, named in errors

    def grammar(self) -> str:
        from llguidance import LLMatcher

        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        return LLMatcher.grammar_from_json_schema(json.dumps(self.value), defaults=_JSON_OPTIONS)  # type: ignore[arg-type]


def _schema(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):  # TGI and some clients send the schema as a JSON string
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidInput(f"{where} must be a JSON schema object") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON schema object")
    return value


def response_format_constraint(fmt: Any, field: str = "response_format") -> Constraint | None:
    """The constraint an OpenAI `response_format` (or TGI `grammar`) asks for; None for plain text.

    Accepted: `{"type": "text"}`; `{"type": "json_object"}` (any JSON object); `{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}`; huggingface_hub's rewrite of the latter, `{"type":
    "json_object", "value": schema}`; TGI's `{"type": "json", "value": schema}`, `{"type": "json_schema", "value":
    {"name", "schema"}}` and `{"type": "regex", "value"}`.
    """
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidInput(f"{field} must be an object with a type")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        value = fmt.get("value")
        schema = {"type": "object"} if value is None else _schema(value, f"{field}.value")
        return Constraint("json_schema", schema, field)
    if kind == "json_schema":
        # OpenAI: {"json_schema": {...}}; TGI's grammar: {"value": {...}}
        spec = fmt.get("json_schema", fmt.get("value"))
        if not isinstance(spec, dict):
            raise InvalidInput(f"{field}.json_schema must be an object with a schema")
        schema = spec.get("schema")
        schema = {"type": "object"} if schema is None else _schema(schema, f"{field}.json_schema.schema")
        return Constraint("json_schema", schema, f"{field}.json_schema.schema")
    if kind in ("json", "regex") and "value" in fmt:
        if kind == "regex":
            if not isinstance(fmt["value"], str):
                raise InvalidInput(f"{field}.value must be a regular expression string")
            return Constraint("regex", fmt["value"], f"{field}.value")
        return Constraint("json_schema", _schema(fmt["value"], f"{field}.value"), f"{field}.value")
    raise InvalidInput(f"{field}.type must be one of text, json_object, json_schema")


def tool_constraint(tools: ToolRequest) -> Constraint | None:
    """The JSON a required or named tool_choice forces: a list of calls, or the named function's arguments."""
    if tools.mode == "named":
        assert tools.name is not None
        return Constraint("json_schema", tools.parameters_of(tools.name), "tool_choice")
    if tools.mode != "required":
        return None
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": tools.parameters_of(t["function"]["name"]),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools.tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not tools.parallel:
        schema["maxItems"] = 1
    return Constraint("json_schema", schema, "tool_choice")


def constraint_of(params: dict[str, Any], tools: ToolRequest | None) -> Constraint | None:
    """The one constraint of a request's parameters (`response_format`, `grammar`, a forced tool_choice)."""
    fmt = response_format_constraint(params.get("response_format"))
    if fmt is None and params.get("grammar") is not None:
        fmt = response_format_constraint(params["grammar"], "grammar")
    if tools is not None and tools.active:
        if fmt is not None:
            raise InvalidInput(
                "response_format: a JSON format cannot be combined with tools (use tool_choice none)"
            )
        return tool_constraint(tools)
    return fmt


# Compiling and applying


class _Compiler:
    """One llguidance tokenizer per Hugging Face tokenizer (building it takes about a second)."""

    _cache: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def tokenizer(cls, tokenizer: Any, eos_ids: set[int]) -> Any:
        with cls._lock:
            llt = cls._cache.get(tokenizer)
            if llt is None:
                import llguidance.hf

                llt = llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(eos_ids) or None)
                cls._cache[tokenizer] = llt
            return llt


def matcher(tokenizer: Any, eos_ids: set[int], constraint: Constraint) -> Any:
    """A fresh matcher for one generation; a grammar llguidance cannot compile is the client's 400."""
    from llguidance import LLMatcher

    llt = _Compiler.tokenizer(tokenizer, eos_ids)
    try:
        grammar = constraint.grammar()
    except ValueError as err:
        raise InvalidInput(f"{constraint.field}: {err}") from None
    m = LLMatcher(llt, grammar, log_level=0)
    if m.is_error():
        raise InvalidInput(f"{constraint.field}: not supported for constrained decoding: {m.get_error()}")
    return m


def check(tokenizer: Any, eos_ids: set[int], constraint: Constraint | None) -> None:
    """Compile the constraint once to refuse, before generation, what llguidance cannot enforce."""
    if constraint is not None:
        matcher(tokenizer, eos_ids, constraint)


class GrammarLogitsProcessor:
    """Allows only the tokens the grammar accepts next, for one generation.

    Called as a transformers logits processor (`input_ids` [1, n], `scores` [1, vocab]) or, through `hook`, as a
    per-row logits hook of the batching engine (`history`: prompt + generated ids, `row` [vocab]). Each call
    first feeds the grammar the token chosen at the previous step."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], constraint: Constraint, prompt_len: int) -> None:
        import numpy as np

        self.matcher = matcher(tokenizer, eos_ids, constraint)
        self.prompt_len = prompt_len
        self.eos = sorted(eos_ids)
        vocab = int(_Compiler.tokenizer(tokenizer, eos_ids).vocab_size)
        self.bitmask = np.zeros((vocab + 31) // 32, dtype=np.int32)

    def _masked(self, last: int | None, scores: Any) -> Any:
        import numpy as np
        import torch

        if last is not None:
            self.matcher.consume_token(last)
        vocab = scores.shape[-1]
        if self.matcher.is_error():  # cannot happen while the mask holds; end the answer rather than run on
            allowed = torch.zeros(vocab, dtype=torch.bool)
            allowed[[e for e in self.eos if e < vocab]] = True
        else:
            self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
            bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little").view(np.bool_)
            if bits.shape[0] < vocab:  # the model's logits may be padded past the tokenizer's vocabulary
                bits = np.concatenate([bits, np.zeros(vocab - bits.shape[0], dtype=np.bool_)])
            allowed = torch.from_numpy(bits[:vocab])
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        last = int(input_ids[0, -1]) if input_ids.shape[1] > self.prompt_len else None
        return self._masked(last, scores)

    def hook(self, history: list[int], row: Any) -> Any:
        return self._masked(history[-1] if len(history) > self.prompt_len else None, row)
