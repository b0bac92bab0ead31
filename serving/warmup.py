"""Warm-up: one internal request that a replica runs on a model it just loaded, before the model takes traffic.

The first forward pass of a model pays for what later ones reuse (allocations, kernel choice, lazy initialisation,
a compile where the runner compiles), so the first user request would be the slowest. A model deployment runs this
in its constructor (Serve sends it nothing until the constructor returns); a pool runs it right after a load.

The request goes through the task's own adapter (the same parse and rendering as a client's request), with the
model's default parameters, and straight to the executor: it is never metered, so never charged, nor counted in the
request metrics.
A warm-up that fails is logged and the replica serves anyway (a real request then gets the real error).
"""

from __future__ import annotations

import base64
import io
import logging
import time
import uuid
import wave
from functools import cache
from typing import Any

from models.types import (
    AUDIO_CLASSIFICATION,
    AUDIO_TO_AUDIO,
    AUTOMATIC_SPEECH_RECOGNITION,
    DOCUMENT_QUESTION_ANSWERING,
    FEATURE_EXTRACTION,
    FILL_MASK,
    IMAGE_CLASSIFICATION,
    IMAGE_SEGMENTATION,
    IMAGE_TO_IMAGE,
    IMAGE_TO_TEXT,
    OBJECT_DETECTION,
    QUESTION_ANSWERING,
    SENTENCE_SIMILARITY,
    SUMMARIZATION,
    TABLE_QUESTION_ANSWERING,
    TEXT_CLASSIFICATION,
    TEXT_GENERATION,
    TEXT_TO_AUDIO,
    TEXT_TO_IMAGE,
    TEXT_TO_SPEECH,
    TOKEN_CLASSIFICATION,
    TRANSLATION,
    VISUAL_QUESTION_ANSWERING,
    ZERO_SHOT_CLASSIFICATION,
    ZERO_SHOT_IMAGE_CLASSIFICATION,
)

log = logging.getLogger("serving.warmup")

TEXT = "Warm-up: the quick brown fox jumps over the lazy dog."


@cache
def _png() -> str:
    """A small RGB PNG, base64."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 140, 160)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@cache
def _wav() -> str:
    """Half a second of quiet 16 kHz mono WAV, base64."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\x00\x01" * 8000)
    return base64.b64encode(buffer.getvalue()).decode()


def warmup_body(task: str, runner: Any = None) -> dict[str, Any] | None:
    """The JSON body of a warm-up request for `task` (None: the task has none, e.g. a tabular model, whose
    columns only its owner knows)."""
    bodies: dict[str, Any] = {
        TEXT_TO_IMAGE: lambda: {"inputs": TEXT},
        TEXT_GENERATION: lambda: {"inputs": TEXT, "parameters": {"max_new_tokens": 2}},
        FEATURE_EXTRACTION: lambda: {"inputs": TEXT},
        SENTENCE_SIMILARITY: lambda: {"inputs": {"source_sentence": TEXT, "sentences": [TEXT, "A cat."]}},
        TEXT_CLASSIFICATION: lambda: {"inputs": TEXT},
        TOKEN_CLASSIFICATION: lambda: {"inputs": TEXT},
        QUESTION_ANSWERING: lambda: {"inputs": {"question": "What jumps?", "context": TEXT}},
        FILL_MASK: lambda: {"inputs": f"The quick brown fox {_mask(runner)} over the lazy dog."},
        ZERO_SHOT_CLASSIFICATION: lambda: {
            "inputs": TEXT,
            "parameters": {"candidate_labels": ["animals", "cars"]},
        },
        SUMMARIZATION: lambda: {"inputs": TEXT},
        TRANSLATION: lambda: {"inputs": TEXT},
        TABLE_QUESTION_ANSWERING: lambda: {
            "inputs": {"query": "How many foxes?", "table": {"animal": ["fox", "dog"], "count": ["1", "2"]}}
        },
        IMAGE_CLASSIFICATION: lambda: {"inputs": _png()},
        OBJECT_DETECTION: lambda: {"inputs": _png()},
        IMAGE_SEGMENTATION: lambda: {"inputs": _png()},
        IMAGE_TO_TEXT: lambda: {"inputs": _png()},
        IMAGE_TO_IMAGE: lambda: {"inputs": _png(), "parameters": {"prompt": TEXT}},
        ZERO_SHOT_IMAGE_CLASSIFICATION: lambda: {
            "inputs": _png(),
            "parameters": {"candidate_labels": ["a fox", "a dog"]},
        },
        VISUAL_QUESTION_ANSWERING: lambda: {"inputs": {"image": _png(), "question": "What colour is it?"}},
        DOCUMENT_QUESTION_ANSWERING: lambda: {
            "inputs": {"image": _png(), "question": "What is the total?"},
            "parameters": {"word_boxes": [["Total", [0, 0, 400, 100]], ["42", [500, 0, 900, 100]]]},
        },
        AUTOMATIC_SPEECH_RECOGNITION: lambda: {"inputs": _wav()},
        AUDIO_CLASSIFICATION: lambda: {"inputs": _wav()},
        AUDIO_TO_AUDIO: lambda: {"inputs": _wav()},
        TEXT_TO_SPEECH: lambda: {"inputs": TEXT},
        TEXT_TO_AUDIO: lambda: {"inputs": TEXT},
    }
    make = bodies.get(task)
    return None if make is None else make()


def _mask(runner: Any) -> str:
    tokenizer = getattr(runner, "tokenizer", None)
    return str(getattr(tokenizer, "mask_token", None) or "[MASK]")


def warm_up(executor: Any) -> float | None:
    """Run the warm-up request of `executor`'s model (its catalog task) on it; the seconds it took, or None when
    the task has none or the warm-up failed (logged)."""
    from serving.routes.base import RequestContext
    from serving.routes.registry import ADAPTERS

    spec = executor.spec
    adapter = ADAPTERS.get(spec.task)
    body = warmup_body(spec.task, executor.runner)
    if adapter is None or body is None:
        log.info("%s: no warm-up for task %s", spec.id, spec.task)
        return None
    request_id = f"warmup-{uuid.uuid4()}"
    ctx = RequestContext(request_id=request_id, inference_id=request_id, model_id=spec.id, started_at=None)
    started = time.perf_counter()
    try:
        parsed = adapter.parse(body, spec, ctx)
        result = executor.run(parsed.request)
        if not parsed.stream:
            adapter.render(
                result, parsed, ctx
            )  # the response's encoding (JSON, PNG, WAV) has first calls too
    except Exception as err:
        log.warning("%s: the warm-up request failed (serving anyway): %s", spec.id, err)
        return None
    took = time.perf_counter() - started
    log.info("%s: warmed up in %.2f s", spec.id, took)
    return took
