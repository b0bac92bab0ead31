"""Vision and audio tasks: a media file in (the raw body, or base64 in JSON), JSON or media bytes out.

Request forms, as the clients send them:
- the file itself as the body, with its Content-Type or none (Python without parameters, JS for most tasks);
- JSON `{"inputs": "<base64 or data: URL>", "parameters": {...}}` (Python with parameters, JS segmentation);
- JSON `{"inputs": {"image": "<base64>", "question": "..."}}` (visual and document question answering, JS
  zero-shot image classification); the Python client puts `question` and `image` at the root instead.
A remote `http(s)://` URL in `inputs` is passed on, and the runner refuses it (400) unless the model's
`options.allow_remote_urls` lets it fetch.
"""

from __future__ import annotations

from typing import Any

from fastapi import Response

from models.catalog import ModelSpec
from models.errors import InvalidInput
from models.media import decode_base64
from models.types import (
    AUDIO_CLASSIFICATION,
    AUDIO_TO_AUDIO,
    AUTOMATIC_SPEECH_RECOGNITION,
    DOCUMENT_QUESTION_ANSWERING,
    IMAGE_CLASSIFICATION,
    IMAGE_SEGMENTATION,
    IMAGE_TO_IMAGE,
    IMAGE_TO_TEXT,
    OBJECT_DETECTION,
    TEXT_TO_AUDIO,
    TEXT_TO_SPEECH,
    VISUAL_QUESTION_ANSWERING,
    ZERO_SHOT_IMAGE_CLASSIFICATION,
    RunResult,
    TaskRequest,
)
from serving.body import RawBody
from serving.routes.base import (
    Parsed,
    RequestContext,
    TaskAdapter,
    json_response,
    parameters_of,
    require_dict,
    require_inputs,
)
from serving.routes.media_schemas import OPENAPI

_GENERATION = (
    "generation_parameters",
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "num_beams",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "seed",
)


def client_of(user_agent: str) -> str:
    """`python` (huggingface_hub), `js` (@huggingface/inference, huggingface.js) or `other`, from User-Agent."""
    ua = user_agent.lower()
    if "@huggingface/inference" in ua or "huggingface.js" in ua:
        return "js"
    if "hf_hub/" in ua or "huggingface_hub/" in ua:
        return "python"
    return "other"


def file_value(value: Any, field: str) -> bytes | str:
    """A JSON media value: base64 or a data: URL (decoded here), or a remote URL (left to the runner)."""
    if isinstance(value, str):
        if value.startswith(("http://", "https://")):
            return value
        return decode_base64(value, field)
    raise InvalidInput(f"{field} must be the file as a base64 string, got {type(value).__name__}")


def raw_file(body: RawBody, family: str, task: str) -> bytes:
    """The raw body's bytes, once its declared type fits the task (a wrong Content-Type is a 400)."""
    if body.family is not None and body.family != family:
        raise InvalidInput(
            f"Content-Type {body.content_type}: task {task} takes an {family} file ({family}/*), or JSON"
        )
    return body.content


def kept(params: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The parameters this task reads; unknown ones are ignored, as the hosted API does."""
    return {k: params[k] for k in names if params.get(k) is not None}


class MediaAdapter(TaskAdapter):
    """One media file in `inputs` (or as the body), `parameters` as listed."""

    family = "image"
    params: tuple[str, ...] = ()

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        if isinstance(body, RawBody):
            inputs: Any = raw_file(body, self.family, self.task)
            params: dict[str, Any] = {}
        else:
            body = require_dict(body)
            inputs = self.json_inputs(body)
            params = kept(parameters_of(body), self.params)
        request = TaskRequest(self.task, inputs, params, ctx.request_id, accept=ctx.accept)
        return Parsed(request, characters=self.characters(request))

    def json_inputs(self, body: dict[str, Any]) -> Any:
        return file_value(require_inputs(body), "inputs")

    def characters(self, request: TaskRequest) -> int:
        return -1  # x-compute-characters for image or audio input, as the hosted service says

    @property
    def openapi(self) -> dict[str, Any]:
        return OPENAPI[self.task]


class ImageClassificationAdapter(MediaAdapter):
    task = IMAGE_CLASSIFICATION
    params = ("top_k", "function_to_apply")


class ObjectDetectionAdapter(MediaAdapter):
    task = OBJECT_DETECTION
    params = ("threshold",)


class ImageSegmentationAdapter(MediaAdapter):
    task = IMAGE_SEGMENTATION
    params = ("threshold", "mask_threshold", "overlap_mask_area_threshold", "subtask")


class ImageToTextAdapter(MediaAdapter):
    """[{generated_text}] for the Python client and others (the hosted shape); the JS client (4.13.15+) accepts
    only the bare object."""

    task = IMAGE_TO_TEXT
    params = _GENERATION

    def render(self, result: RunResult, parsed: Parsed, ctx: RequestContext) -> Response:
        output = result.output
        if client_of(ctx.user_agent) == "js" and isinstance(output, list) and output:
            return json_response(output[0])
        return json_response(output)


class ZeroShotImageClassificationAdapter(MediaAdapter):
    task = ZERO_SHOT_IMAGE_CLASSIFICATION
    params = ("candidate_labels", "hypothesis_template")

    def json_inputs(self, body: dict[str, Any]) -> Any:
        inputs = require_inputs(body)
        if isinstance(inputs, dict):  # the JS client: {"image": base64}
            if inputs.get("image") is None:
                raise InvalidInput("inputs.image is required (the image as base64)")
            return file_value(inputs["image"], "inputs.image")
        return file_value(inputs, "inputs")


class QuestionAdapter(MediaAdapter):
    """An image and a question: `inputs: {image, question}`, or (Python) `question` and `image` at the root."""

    def json_inputs(self, body: dict[str, Any]) -> Any:
        inputs = body.get("inputs")
        if isinstance(inputs, dict):
            image, question, where = inputs.get("image"), inputs.get("question"), "inputs.image"
        else:
            image = body.get("image", inputs)
            question, where = body.get("question"), "image" if "image" in body else "inputs"
        if image is None:
            raise InvalidInput("inputs.image is required (the image as base64)")
        if not isinstance(question, str):
            raise InvalidInput("inputs.question is required: a string")
        return {"image": file_value(image, where), "question": question}

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        if isinstance(body, RawBody):
            raise InvalidInput(
                f'task {self.task} needs a question: send JSON {{"inputs": {{"image": <base64>, '
                '"question": ...}}'
            )
        return super().parse(body, spec, ctx)

    def characters(self, request: TaskRequest) -> int:
        return len(request.inputs["question"])


class VisualQuestionAnsweringAdapter(QuestionAdapter):
    task = VISUAL_QUESTION_ANSWERING
    params = ("top_k",)


class DocumentQuestionAnsweringAdapter(QuestionAdapter):
    task = DOCUMENT_QUESTION_ANSWERING
    params = (
        "doc_stride",
        "handle_impossible_answer",
        "lang",
        "max_answer_len",
        "max_question_len",
        "max_seq_len",
        "top_k",
        "word_boxes",
    )


class ImageToImageAdapter(MediaAdapter):
    """Answered with the image's bytes, PNG or JPEG by Accept (as text-to-image)."""

    task = IMAGE_TO_IMAGE
    params = (
        "prompt",
        "negative_prompt",
        "target_size",
        "num_inference_steps",
        "guidance_scale",
        "strength",
        "seed",
    )

    def characters(self, request: TaskRequest) -> int:
        return -1

    def render(self, result: RunResult, parsed: Parsed, ctx: RequestContext) -> Response:
        return Response(result.output["content"], media_type=result.output["media_type"])


class AutomaticSpeechRecognitionAdapter(MediaAdapter):
    task = AUTOMATIC_SPEECH_RECOGNITION
    family = "audio"
    params = ("return_timestamps", *_GENERATION)


class AudioClassificationAdapter(MediaAdapter):
    task = AUDIO_CLASSIFICATION
    family = "audio"
    params = ("top_k", "function_to_apply")


class AudioToAudioAdapter(MediaAdapter):
    """[{label, content-type, blob}], each blob a base64 audio file."""

    task = AUDIO_TO_AUDIO
    family = "audio"
    params = ("seed",)


class TextToSpeechAdapter(TaskAdapter):
    """`{"inputs": text, "parameters": {...}}` -> audio bytes (FLAC unless Accept asks for WAV, OGG or MP3)."""

    task = TEXT_TO_SPEECH

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        body = require_dict(body)
        params = kept(parameters_of(body), _GENERATION)
        return Parsed(TaskRequest(self.task, require_inputs(body), params, ctx.request_id, accept=ctx.accept))

    def render(self, result: RunResult, parsed: Parsed, ctx: RequestContext) -> Response:
        return Response(result.output["content"], media_type=result.output["media_type"])

    @property
    def openapi(self) -> dict[str, Any]:
        return OPENAPI[self.task]


class TextToAudioAdapter(TextToSpeechAdapter):
    task = TEXT_TO_AUDIO


MEDIA_ADAPTERS: tuple[TaskAdapter, ...] = (
    ImageClassificationAdapter(),
    ObjectDetectionAdapter(),
    ImageSegmentationAdapter(),
    ImageToTextAdapter(),
    ZeroShotImageClassificationAdapter(),
    VisualQuestionAnsweringAdapter(),
    DocumentQuestionAnsweringAdapter(),
    ImageToImageAdapter(),
    AutomaticSpeechRecognitionAdapter(),
    AudioClassificationAdapter(),
    AudioToAudioAdapter(),
    TextToSpeechAdapter(),
    TextToAudioAdapter(),
)
