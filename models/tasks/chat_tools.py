"""Tool calling for chat: tools rendered through the model's own chat template, tool calls parsed from its output.

Models write tool calls in a few formats; the parser reads the common ones from the decoded text:
- Hermes / Qwen 2-3 / SmolLM3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call;
- Llama 3.x and Mistral: the whole answer is a JSON object `{"name": ..., "parameters"|"arguments": {...}}` or a
  JSON list of them (their `<|python_tag|>` / `[TOOL_CALLS]` markers are special tokens, gone once decoded).

`tool_choice: "required"` or a named function is enforced by constrained decoding instead (models/tasks/
constrained.py): the model then writes only JSON (a list of calls, or the named function's arguments), which
`forced_calls` turns into tool calls whatever the model's own format.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from models.errors import InvalidInput
from models.types import StreamChunk

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


# Requests: what the client asked for


@dataclass(frozen=True)
class ToolRequest:
    """The tools of one chat request, validated: `mode` is auto, required, named or none."""

    tools: list[dict[str, Any]]
    mode: str
    name: str | None = None  # the function a named tool_choice forces
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.mode != "none"

    def parameters_of(self, name: str) -> dict[str, Any]:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or {"type": "object"}
        raise KeyError(name)


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidInput("tools must be a list of {type: function, function: {...}} objects")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidInput(f"tools[{i}].type must be 'function' (the only tool type supported)")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidInput(f"tools[{i}].function.name is required")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidInput(f"tools[{i}].function.parameters must be a JSON schema object")
        if fn["name"] in names:
            raise InvalidInput(f"tools[{i}].function.name {fn['name']!r} is given twice")
        names.add(fn["name"])
    return tools


def tool_request(params: dict[str, Any]) -> ToolRequest | None:
    """The validated tools of a request's parameters (`tools`, `tool_choice`, `parallel_tool_calls`), or None."""
    tools = params.get("tools")
    choice = params.get("tool_choice")
    parallel = params.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidInput("parallel_tool_calls must be a boolean")
    if not tools:
        if choice not in (None, "none"):
            raise InvalidInput("tool_choice needs tools")
        return None
    tools = _check_tools(tools)
    name = None
    if choice is None:
        mode = "auto"
    elif choice in ("auto", "none", "required"):
        mode = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not any(t["function"]["name"] == name for t in tools):
            raise InvalidInput(f"tool_choice names a function that is not in tools: {name!r}")
        mode = "named"
    else:
        raise InvalidInput(
            "tool_choice must be 'none', 'auto', 'required' or {type: function, function: {name}}"
        )
    return ToolRequest(tools=tools, mode=mode, name=name, parallel=parallel is not False)


# Templates


def template_source(tokenizer: Any, with_tools: bool) -> str | None:
    """The chat template apply_chat_template would use (a named `tool_use` one when tools are given)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        if with_tools and "tool_use" in template:
            return template["tool_use"]
        return template.get("default")
    return template


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template reads the `tools` variable (else it would drop the tools silently)."""
    source = template_source(tokenizer, with_tools=True)
    if not source:
        return False
    import jinja2
    from jinja2 import meta

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except jinja2.TemplateSyntaxError:
        return "tools" in source
    return "tools" in meta.find_undeclared_variables(ast)


def check_supported(tokenizer: Any, tools: ToolRequest | None) -> None:
    if tools is not None and tools.active and not template_supports_tools(tokenizer):
        raise InvalidInput("tools: this model's chat template has no tool support")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them: tool-call arguments as objects, not JSON strings."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for call in calls:
                fn = dict(call.get("function") or {}) if isinstance(call, dict) else {}
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass  # a template that wants the string still gets it
                fixed.append({**call, "function": fn} if isinstance(call, dict) else call)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


# Parsing


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": args},
    }


def _as_call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return _call(obj["name"], args)


def _json_calls(text: str) -> list[dict[str, Any]] | None:
    """Tool calls when `text` is only a JSON call, a list of them, or calls separated by `;` (Llama 3.2)."""
    text = text.strip()
    if not text or text[0] not in "{[":
        return None
    try:
        objs = [json.loads(text)]
    except ValueError:
        try:
            objs = [json.loads(part) for part in text.split(";") if part.strip()]
        except ValueError:
            return None
    if len(objs) == 1 and isinstance(objs[0], list):
        objs = objs[0]
    calls = [_as_call(o) for o in objs]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _block_call(body: str) -> dict[str, Any] | None:
    try:
        return _as_call(json.loads(body.strip()))
    except ValueError:
        return None


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a whole answer written in one of the formats this module reads."""
    if _OPEN in text:
        content, _, rest = text.partition(_OPEN)
        calls = []
        for block in (_OPEN + rest).split(_OPEN)[1:]:
            call = _block_call(block.split(_CLOSE)[0])
            if call is None:
                return text, []  # a malformed call: hand the text back as it is
            calls.append(call)
        return (content.strip() or None), calls
    calls = _json_calls(text)
    if calls is not None:
        return None, calls
    return text, []


def forced_calls(tools: ToolRequest, text: str) -> list[dict[str, Any]]:
    """Tool calls from the JSON that constrained decoding produced for a required or named tool_choice."""
    if tools.mode == "named":
        assert tools.name is not None
        return [_call(tools.name, text.strip())]
    try:
        items = json.loads(text)
    except ValueError:
        return []  # cut short by max_tokens: no complete call
    return [c for c in (_as_call(i) for i in items) if c is not None]


def _limit(tools: ToolRequest, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return calls if tools.parallel else calls[:1]


def finish_output(tools: ToolRequest | None, output: dict[str, Any]) -> dict[str, Any]:
    """A whole generation's output with `text` split into content and `tool_calls`."""
    if tools is None or not tools.active:
        return output
    text = output["text"]
    if tools.mode in ("named", "required"):
        content, calls = None, forced_calls(tools, text)
        if not calls:
            content = text
    else:
        content, calls = parse_tool_calls(text)
    calls = _limit(tools, calls)
    out = {**output, "text": content or ""}
    if calls:
        out["tool_calls"] = calls
        if output["finish_reason"] != "length":
            out["finish_reason"] = "tool_calls"
    return out


# Streaming


@dataclass
class ToolStream:
    """Turns a stream of text deltas into content deltas and whole tool calls, as the text arrives.

    Content is passed on at once, except a tail that may be the start of `<tool_call>`; from the first
    `<tool_call>` on, each closed block becomes one tool call. An answer that opens with `{` or `[` may be a
    JSON call (Llama, Mistral): it is held until the end and then parsed whole.
    """

    tools: ToolRequest
    buffer: str = ""
    mode: str = "start"  # start, content, calls, json, forced
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tools.mode in ("named", "required"):
            self.mode = "forced"

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to send now, tool calls completed by this delta)."""
        self.buffer += delta
        if self.mode == "start":
            stripped = self.buffer.lstrip()
            if not stripped:
                return "", []
            self.mode = "json" if stripped[0] in "{[" else "content"
        if self.mode == "content":
            return self._content()
        if self.mode == "calls":
            return "", self._blocks()
        return "", []

    def _content(self) -> tuple[str, list[dict[str, Any]]]:
        at = self.buffer.find(_OPEN)
        if at >= 0:
            content, self.buffer = self.buffer[:at], self.buffer[at:]
            self.mode = "calls"
            return content, self._blocks()
        keep = next((n for n in range(len(_OPEN) - 1, 0, -1) if self.buffer.endswith(_OPEN[:n])), 0)
        cut = len(self.buffer) - keep
        content, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return content, []

    def _blocks(self) -> list[dict[str, Any]]:
        done = []
        while _CLOSE in self.buffer:
            block, _, self.buffer = self.buffer.partition(_CLOSE)
            call = _block_call(block.split(_OPEN, 1)[-1])
            if call is not None:
                done.append(call)
        return self._accept(done)

    def _accept(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        room = len(calls) if self.tools.parallel else max(0, 1 - len(self.calls))
        calls = calls[:room]
        self.calls.extend(calls)
        return calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content, tool calls) still held when generation ends."""
        rest, self.buffer = self.buffer, ""
        if self.mode == "forced":
            calls = forced_calls(self.tools, rest)
            return ("" if calls else rest), self._accept(calls)
        if self.mode == "json":
            content, calls = parse_tool_calls(rest)
            return (content or ""), self._accept(calls)
        if self.mode == "calls":
            tail = rest.split(_OPEN, 1)[-1]
            call = _block_call(tail) if rest.strip() else None
            if call is not None:
                return "", self._accept([call])
            return ("" if not rest.strip() else rest), []
        return rest, []


def _indexed(calls: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
    return [{"index": first + i, **call} for i, call in enumerate(calls)]


def stream_with_tools(
    tools: ToolRequest | None, items: Iterator[StreamChunk | dict[str, Any]]
) -> Iterator[StreamChunk | dict[str, Any]]:
    """A runner's stream (text chunks, then the final {output, usage}) with tool calls split out of the text.

    Chunks keep their token ids and logprobs; their text becomes content only. Tool calls travel as chunks
    whose `tool_calls` hold OpenAI's streamed shape (index, id, type, function{name, arguments})."""
    if tools is None or not tools.active:
        yield from items
        return
    parser = ToolStream(tools)
    for item in items:
        if isinstance(item, StreamChunk):
            content, calls = parser.feed(item.text)
            item.text = content
            first = len(parser.calls) - len(calls)
            if calls:
                item.tool_calls = _indexed(calls, first)
            yield item
            continue
        content, calls = parser.finish()
        if content or calls:
            first = len(parser.calls) - len(calls)
            yield StreamChunk(text=content, tool_calls=_indexed(calls, first) if calls else None)
        output = dict(item["output"])
        if parser.calls:
            output["tool_calls"] = parser.calls
            if output["finish_reason"] != "length":
                output["finish_reason"] = "tool_calls"
        yield {**item, "output": output}
