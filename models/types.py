"""Plain, picklable request and result types that cross Ray handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.timing import Timings

# Operations a runner can serve. Hub pipeline tags, plus the OpenAI-shaped operations of generation models.
TEXT_TO_IMAGE = "text-to-image"
TEXT_GENERATION = "text-generation"
CHAT_COMPLETION = "chat-completion"
COMPLETION = "completion"
FEATURE_EXTRACTION = "feature-extraction"
SENTENCE_SIMILARITY = "sentence-similarity"
TEXT_CLASSIFICATION = "text-classification"
# Text and tabular tasks (models/tasks/text_tasks.py, models/tasks/tabular.py).
QUESTION_ANSWERING = "question-answering"
FILL_MASK = "fill-mask"
TOKEN_CLASSIFICATION = "token-classification"
ZERO_SHOT_CLASSIFICATION = "zero-shot-classification"
SUMMARIZATION = "summarization"
TRANSLATION = "translation"
TABLE_QUESTION_ANSWERING = "table-question-answering"
TABULAR_CLASSIFICATION = "tabular-classification"
TABULAR_REGRESSION = "tabular-regression"
# Vision and audio tasks (models/tasks/<task>.py, serving/routes/media.py).
IMAGE_CLASSIFICATION = "image-classification"
IMAGE_SEGMENTATION = "image-segmentation"
OBJECT_DETECTION = "object-detection"
IMAGE_TO_TEXT = "image-to-text"
ZERO_SHOT_IMAGE_CLASSIFICATION = "zero-shot-image-classification"
IMAGE_TO_IMAGE = "image-to-image"
DOCUMENT_QUESTION_ANSWERING = "document-question-answering"
VISUAL_QUESTION_ANSWERING = "visual-question-answering"
AUTOMATIC_SPEECH_RECOGNITION = "automatic-speech-recognition"
AUDIO_CLASSIFICATION = "audio-classification"
AUDIO_TO_AUDIO = "audio-to-audio"
TEXT_TO_SPEECH = "text-to-speech"
TEXT_TO_AUDIO = "text-to-audio"


@dataclass
class TaskRequest:
    """One validated request for one operation of one model."""

    task: str
    inputs: Any
    parameters: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    accept: str | None = None  # the client's Accept header, for tasks that answer with media

    def input_characters(self) -> int:
        """Characters of text input, summed over every string in `inputs` (x-compute-characters)."""
        return _count_chars(self.inputs)


def _count_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_count_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count_chars(v) for v in value)
    return 0


@dataclass
class RunResult:
    """A runner's output with the replica's timings and, for generation, token counts."""

    output: Any
    timings: Timings
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class StreamChunk:
    """One streamed piece of generated text. The last item of a stream is a RunResult instead."""

    text: str
    token_id: int | None = None
    special: bool = False
    logprob: float | None = None
    elapsed_ns: int = 0  # compute consumed so far: what a client that disconnects here is charged
    token_text: str | None = None  # the token alone, decoded (logprobs requests)
    top_logprobs: list[dict[str, Any]] | None = None  # [{id, text, logprob}] when alternatives were asked for
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI streamed tool calls completed with this chunk


@dataclass
class Progress:
    """A heartbeat of a long request (image steps, generated tokens): the compute it has consumed so far, which is
    what a client that leaves at this point is charged."""

    elapsed_ns: int


class StopRun(Exception):
    """Raised inside a runner's step callback to stop the work early (its client went away)."""


class Interrupted(Exception):
    """The request's client went away after `compute_ns` of compute ran for it: charge that, flagged as such.

    `result` is the whole result when the work finished anyway (it could not stop early)."""

    def __init__(self, compute_ns: int, result: RunResult | None = None) -> None:
        super().__init__(f"the client went away after {compute_ns} ns of compute")
        self.compute_ns = compute_ns
        self.result = result

    def __reduce__(self):  # crosses Ray handles with its fields
        return (Interrupted, (self.compute_ns, self.result))
