"""Registries keyed by name: task runners by Hub pipeline tag, default-model builders by name.

Entries are import strings so that a process imports only the heavy libraries it uses.
"""

from __future__ import annotations

import importlib
from typing import Any

from models.errors import TaskNotSupported

TASK_RUNNERS: dict[str, str] = {
    "text-to-image": "models.tasks.text_to_image:TextToImageRunner",
    "text-generation": "models.tasks.text_generation:TextGenerationRunner",
    "feature-extraction": "models.tasks.embeddings:SentenceEmbeddingRunner",
    "sentence-similarity": "models.tasks.embeddings:SentenceEmbeddingRunner",
    "text-classification": "models.tasks.text_classification:TextClassificationRunner",
}

BUILDERS: dict[str, str] = {
    "tiny-flux": "models.defaults:build_tiny_flux",
    "tiny-sentiment": "models.defaults:build_tiny_sentiment",
    "smollm2-135m-instruct": "models.defaults:build_smollm2",
    "all-minilm-l6-v2": "models.defaults:build_minilm",
}


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def runner_class(task: str) -> type:
    try:
        return _load(TASK_RUNNERS[task])
    except KeyError:
        raise TaskNotSupported(
            f"no runner for task {task!r} (supported: {', '.join(sorted(TASK_RUNNERS))})"
        ) from None


def builder(name: str) -> Any:
    try:
        return _load(BUILDERS[name])
    except KeyError:
        raise KeyError(f"unknown builder {name!r} (known: {', '.join(sorted(BUILDERS))})") from None
