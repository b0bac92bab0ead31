"""Route adapters keyed by operation, and how an operation is chosen for a request."""

from __future__ import annotations

from typing import Any

from models.errors import TaskNotSupported
from models.types import (
    CHAT_COMPLETION,
    COMPLETION,
    FEATURE_EXTRACTION,
    SENTENCE_SIMILARITY,
    TEXT_GENERATION,
)
from serving.routes.base import TaskAdapter
from serving.routes.classification import TextClassificationAdapter
from serving.routes.embeddings import FeatureExtractionAdapter, SentenceSimilarityAdapter
from serving.routes.generation import TextGenerationAdapter
from serving.routes.media import MEDIA_ADAPTERS
from serving.routes.openai import ChatCompletionAdapter, CompletionAdapter
from serving.routes.tabular import TABULAR_ADAPTERS
from serving.routes.text_tasks import TEXT_ADAPTERS
from serving.routes.text_to_image import TextToImageAdapter

ADAPTERS: dict[str, TaskAdapter] = {
    a.task: a
    for a in (
        TextToImageAdapter(),
        TextGenerationAdapter(),
        ChatCompletionAdapter(),
        CompletionAdapter(),
        FeatureExtractionAdapter(),
        SentenceSimilarityAdapter(),
        TextClassificationAdapter(),
    )
}

ADAPTERS.update({a.task: a for a in MEDIA_ADAPTERS})  # vision and audio tasks
ADAPTERS.update({a.task: a for a in TEXT_ADAPTERS + TABULAR_ADAPTERS})  # text and tabular tasks

# Aliases clients use in /pipeline/{task} URLs.
TASK_ALIASES = {
    "conversational": CHAT_COMPLETION,
    "chat-completion": CHAT_COMPLETION,
    "text2text-generation": TEXT_GENERATION,
}


def choose_task(model_tasks: tuple[str, ...], primary: str, body: Any, hint: str | None) -> str:
    """The operation a request asks for: an explicit task in the URL, else the body's shape, else the model's."""
    if hint is not None:
        task = TASK_ALIASES.get(hint, hint)
        if task not in model_tasks or task not in ADAPTERS:
            raise TaskNotSupported(
                f"task {hint!r} is not served for this model (it serves: {', '.join(model_tasks)})"
            )
        return task
    if isinstance(body, dict):
        inputs = body.get("inputs")
        if "messages" in body and CHAT_COMPLETION in model_tasks:
            return CHAT_COMPLETION
        if SENTENCE_SIMILARITY in model_tasks and (
            (isinstance(inputs, dict) and "source_sentence" in inputs) or "source_sentence" in body
        ):
            return SENTENCE_SIMILARITY
        if "prompt" in body and "inputs" not in body and COMPLETION in model_tasks:
            return COMPLETION
    if primary in model_tasks:
        return primary
    if FEATURE_EXTRACTION in model_tasks:
        return FEATURE_EXTRACTION
    return model_tasks[0]
