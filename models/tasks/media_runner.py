"""What the image and audio runners share: their input decoded once per request, within the model's limits,
work units from the file's header (pixels, audio milliseconds), and the usage they report."""

from __future__ import annotations

from typing import Any

from models.base import TaskRunner, param_int
from models.errors import InvalidInput
from models.media import (
    Audio,
    audio_seconds,
    decode_audio,
    decode_image,
    image_size,
    media_bytes,
)
from models.types import TaskRequest


class MediaRunner(TaskRunner):
    """A runner whose input is one image or one audio file (`inputs`, or `inputs.image` with a question)."""

    media: str = "image"  # or "audio"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._decoded: tuple[TaskRequest, Any] | None = None  # validate() decodes, run() reuses

    # Where the file is in the request: `inputs`, or `inputs.image` for the question-answering tasks.
    def media_value(self, request: TaskRequest) -> tuple[Any, str]:
        return request.inputs, "inputs"

    def _raw(self, request: TaskRequest) -> tuple[bytes, str]:
        value, field = self.media_value(request)
        return media_bytes(value, field, self.spec.options), field

    def image(self, request: TaskRequest) -> Any:
        """The request's image as RGB, decoded once."""
        if self._decoded is not None and self._decoded[0] is request:
            return self._decoded[1]
        data, field = self._raw(request)
        img = decode_image(data, field, self.spec.limits.max_input_pixels)
        self._decoded = (request, img)
        return img

    def audio(self, request: TaskRequest, sampling_rate: int | None) -> Audio:
        """The request's audio, mono at `sampling_rate`, decoded once."""
        if self._decoded is not None and self._decoded[0] is request:
            return self._decoded[1]
        data, field = self._raw(request)
        audio = decode_audio(data, field, self.spec.limits.max_audio_seconds, sampling_rate)
        self._decoded = (request, audio)
        return audio

    def forget(self, request: TaskRequest) -> None:
        if self._decoded is not None and self._decoded[0] is request:
            self._decoded = None

    def media_usage(self, request: TaskRequest) -> dict[str, int]:
        """Usage counts for metering: input images, or input audio in milliseconds."""
        decoded = self._decoded[1] if self._decoded is not None and self._decoded[0] is request else None
        if isinstance(decoded, Audio):
            return {"input_audio_ms": round(decoded.seconds * 1000)}
        return {"input_images": 1}

    def work_units(self, request: TaskRequest) -> int:
        """Pixels of the input image, or milliseconds of input audio (read from the header)."""
        value, _ = self.media_value(request)
        if not isinstance(value, (bytes, bytearray)):
            return 1
        if self.media == "audio":
            seconds = audio_seconds(bytes(value))
            return max(1, round((seconds or 0) * 1000))
        size = image_size(bytes(value))
        return max(1, size[0] * size[1]) if size else 1


def top_k(params: dict[str, Any], limit: int) -> int | None:
    return param_int(params, "top_k", lo=1, hi=limit)


def question_of(request: TaskRequest) -> str:
    """The question of a visual or document question: `inputs.question`, a non-empty string."""
    inputs = request.inputs
    question = inputs.get("question") if isinstance(inputs, dict) else None
    if not isinstance(question, str) or not question.strip():
        raise InvalidInput("inputs.question must be a non-empty string")
    return question


def image_of_question(request: TaskRequest) -> tuple[Any, str]:
    inputs = request.inputs
    if not isinstance(inputs, dict) or inputs.get("image") is None:
        raise InvalidInput("inputs.image is required (the image's bytes as base64)")
    return inputs["image"], "inputs.image"
