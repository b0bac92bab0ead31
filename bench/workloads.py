"""Workloads: what each benchmark request sends, per task, from built-in sets or a JSONL file.

A workload is a list of items (plain dicts, one per JSONL line); request `i` uses item `i mod len(items)`,
so a run is deterministic. Each item becomes a `RequestSpec`: the path under the endpoint's base URL, the
JSON body, the headers and how to read the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The tasks the benchmark can drive, and other names users type for them.
TASKS = (
    "text-to-image",
    "text-generation",
    "chat",
    "feature-extraction",
    "sentence-similarity",
    "text-classification",
)
TASK_ALIASES = {
    "chat-completion": "chat",
    "conversational": "chat",
    "embeddings": "feature-extraction",
    "sentiment-analysis": "text-classification",
}
STREAMING_TASKS = ("chat", "text-generation")

# How an answer is read.
READ_JSON = "json"
READ_IMAGE = "image"
READ_SSE_CHAT = "sse-chat"  # OpenAI chat.completion.chunk events, closed by `data: [DONE]`
READ_SSE_TGI = "sse-tgi"  # TGI text-generation events: {"token": {...}, "generated_text", "details"}


class WorkloadError(ValueError):
    """A workload file or option is invalid; the message names the line and the field."""

    status_code = 400


_PROMPTS = [
    "A red fox sitting in the snow at sunrise",
    "A lighthouse on a cliff during a storm, oil painting",
    "A bowl of ramen on a wooden table, studio lighting",
    "An astronaut riding a horse on the moon",
    "A watercolor map of an imaginary island",
    "A cozy reading nook with plants and warm light",
    "A futuristic city skyline at night with neon signs",
    "A macro photo of a dew drop on a leaf",
]
_QUESTIONS = [
    "What is the capital of France?",
    "Explain what a GPU is in one sentence.",
    "Give me three tips for writing clear code.",
    "What is 12 times 7?",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Name two planets of the solar system.",
    "Summarise the rules of chess in two sentences.",
]
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps above a sleepy hound.",
    "Machine learning models need data to learn from.",
    "I loved this film, the acting was wonderful.",
    "The service was slow and the food was cold.",
    "Paris is the capital and largest city of France.",
    "Inference servers batch requests to use the GPU well.",
    "It rained all day, so we stayed inside and read.",
]

BUILTIN: dict[str, list[dict[str, Any]]] = {
    "text-to-image": [{"prompt": p} for p in _PROMPTS],
    "text-generation": [{"prompt": q} for q in _QUESTIONS],
    "chat": [{"messages": [{"role": "user", "content": q}]} for q in _QUESTIONS],
    "feature-extraction": [{"inputs": s} for s in _SENTENCES],
    "sentence-similarity": [
        {"source_sentence": s, "sentences": [t for t in _SENTENCES if t != s][:3]} for s in _SENTENCES
    ],
    "text-classification": [{"inputs": s} for s in _SENTENCES],
}


def normalize_task(task: str) -> str:
    """The canonical task name, or a WorkloadError naming the tasks it knows."""
    name = TASK_ALIASES.get(task.strip().lower(), task.strip().lower())
    if name not in TASKS:
        raise WorkloadError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return name


@dataclass(frozen=True)
class WorkloadParams:
    """Per-task knobs given on the command line; an item's own fields win over them."""

    max_tokens: int = 32
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    seed: int | None = 0
    stream: bool = True
    chat_route: str = "openai"  # openai: /v1/chat/completions; model: /models/{id}/v1/chat/completions

    def as_dict(self) -> dict[str, Any]:
        """The knobs as a plain dict, for the run file."""
        return {
            "max_tokens": self.max_tokens,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.num_inference_steps,
            "seed": self.seed,
            "stream": self.stream,
            "chat_route": self.chat_route,
        }


@dataclass(frozen=True)
class RequestSpec:
    """One request as sent: path under the base URL, JSON body, extra headers, and how to read the answer."""

    path: str
    body: dict[str, Any]
    read: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        """Whether the answer is an event stream."""
        return self.read in (READ_SSE_CHAT, READ_SSE_TGI)


@dataclass
class Workload:
    """The items of one task and how to turn item `i` into a request."""

    task: str
    model_id: str
    items: list[dict[str, Any]]
    params: WorkloadParams = field(default_factory=WorkloadParams)
    source: str = "builtin"

    def __post_init__(self) -> None:
        self.task = normalize_task(self.task)
        if not self.items:
            raise WorkloadError("the workload has no items")
        for n, item in enumerate(self.items, start=1):
            _check_item(self.task, item, where=f"{self.source} item {n}")

    def request(self, index: int) -> RequestSpec:
        """The request for the `index`-th request of a run (items are used round-robin)."""
        item = self.items[index % len(self.items)]
        return build_request(self.task, self.model_id, item, self.params)


def builtin_workload(task: str, model_id: str, params: WorkloadParams | None = None) -> Workload:
    """The built-in items for `task`."""
    name = normalize_task(task)
    return Workload(name, model_id, [dict(i) for i in BUILTIN[name]], params or WorkloadParams(), "builtin")


def load_jsonl(path: str | Path, task: str, model_id: str, params: WorkloadParams | None = None) -> Workload:
    """Items from a JSONL file, one JSON object a line (blank lines and `#` comments skipped)."""
    items: list[dict[str, Any]] = []
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise WorkloadError(f"cannot read workload file {p}: {err.strerror}") from err
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise WorkloadError(f"{p}:{n}: not JSON ({err.msg})") from err
        if isinstance(value, str):
            value = {"inputs": value}
        if not isinstance(value, dict):
            raise WorkloadError(f"{p}:{n}: each line must be a JSON object or a string")
        items.append(value)
    return Workload(task, model_id, items, params or WorkloadParams(), source=str(p))


def _check_item(task: str, item: dict[str, Any], *, where: str) -> None:
    if "body" in item:
        if not isinstance(item["body"], dict):
            raise WorkloadError(f"{where}: `body` must be a JSON object")
        return
    need = {
        "text-to-image": ("prompt", "inputs"),
        "text-generation": ("prompt", "inputs"),
        "chat": ("messages", "prompt"),
        "feature-extraction": ("inputs", "text"),
        "sentence-similarity": ("source_sentence",),
        "text-classification": ("inputs", "text"),
    }[task]
    if not any(k in item for k in need):
        raise WorkloadError(f"{where}: a {task} item needs one of {', '.join(need)} (or a raw `body`)")
    if task == "sentence-similarity" and not isinstance(item.get("sentences"), list):
        raise WorkloadError(f"{where}: a sentence-similarity item needs `sentences`, a list of strings")


def build_request(task: str, model_id: str, item: dict[str, Any], params: WorkloadParams) -> RequestSpec:
    """Turn one workload item into the request the wire contract expects for `task`."""
    model_path = f"/models/{model_id}"
    if task == "chat":
        return _chat_request(model_id, item, params)
    if task == "text-generation":
        return _generation_request(model_path, item, params)
    if "body" in item:
        read = READ_IMAGE if task == "text-to-image" else READ_JSON
        headers = {"Accept": "image/png"} if task == "text-to-image" else {}
        return RequestSpec(model_path, dict(item["body"]), read, headers)
    if task == "text-to-image":
        parameters = {
            "width": item.get("width", params.width),
            "height": item.get("height", params.height),
            "num_inference_steps": item.get("num_inference_steps", params.num_inference_steps),
            "seed": item.get("seed", params.seed),
        }
        body = {"inputs": item.get("prompt", item.get("inputs")), "parameters": _drop_none(parameters)}
        return RequestSpec(model_path, body, READ_IMAGE, {"Accept": "image/png"})
    if task == "feature-extraction":
        return RequestSpec(model_path, {"inputs": item.get("inputs", item.get("text"))}, READ_JSON)
    if task == "sentence-similarity":
        inputs = {"source_sentence": item["source_sentence"], "sentences": list(item["sentences"])}
        return RequestSpec(model_path, {"inputs": inputs, "parameters": {}}, READ_JSON)
    # text-classification
    return RequestSpec(
        model_path, {"inputs": item.get("inputs", item.get("text")), "parameters": {}}, READ_JSON
    )


def _chat_request(model_id: str, item: dict[str, Any], params: WorkloadParams) -> RequestSpec:
    path = (
        "/v1/chat/completions" if params.chat_route == "openai" else f"/models/{model_id}/v1/chat/completions"
    )
    if "body" in item:
        body = dict(item["body"])
    else:
        messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        body = {"messages": messages, "max_tokens": item.get("max_tokens", params.max_tokens)}
        if params.seed is not None or "seed" in item:
            body["seed"] = item.get("seed", params.seed)
    body.setdefault("model", model_id)
    body["stream"] = params.stream
    if params.stream:
        # the last chunk then carries the usage counts, so tokens are counted by the server's tokenizer
        body.setdefault("stream_options", {"include_usage": True})
    return RequestSpec(path, body, READ_SSE_CHAT if params.stream else READ_JSON)


def _generation_request(model_path: str, item: dict[str, Any], params: WorkloadParams) -> RequestSpec:
    if "body" in item:
        body = dict(item["body"])
    else:
        parameters = _drop_none(
            {
                "max_new_tokens": item.get("max_tokens", params.max_tokens),
                "seed": item.get("seed", params.seed),
                "details": True,
            }
        )
        body = {"inputs": item.get("prompt", item.get("inputs")), "parameters": parameters}
    body["stream"] = params.stream
    return RequestSpec(model_path, body, READ_SSE_TGI if params.stream else READ_JSON)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
