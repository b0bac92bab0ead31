"""zero-shot-image-classification with a CLIP-like model: an image and candidate labels -> [{label, score}]."""

from __future__ import annotations

from typing import Any

from models.base import param_str
from models.errors import InvalidInput
from models.tasks.image_classification import load_pipeline
from models.tasks.media_runner import MediaRunner
from models.types import ZERO_SHOT_IMAGE_CLASSIFICATION, TaskRequest

MAX_LABELS = 100


def candidate_labels(params: dict[str, Any]) -> list[str]:
    labels = params.get("candidate_labels")
    if isinstance(labels, str):  # the older comma-separated form
        labels = [s.strip() for s in labels.split(",") if s.strip()]
    if not isinstance(labels, list) or not labels:
        raise InvalidInput("parameters.candidate_labels is required: a non-empty list of strings")
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"parameters.candidate_labels has {len(labels)} labels, more than {MAX_LABELS}")
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise InvalidInput(f"parameters.candidate_labels[{i}] must be a non-empty string")
    return labels


class ZeroShotImageClassificationRunner(MediaRunner):
    tasks = (ZERO_SHOT_IMAGE_CLASSIFICATION,)

    def load(self) -> None:
        self.pipe = load_pipeline("zero-shot-image-classification", self)

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        candidate_labels(request.parameters)
        template = param_str(request.parameters, "hypothesis_template")
        if template is not None and "{}" not in template:
            raise InvalidInput("parameters.hypothesis_template must contain {} where the label goes")
        self.image(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        p = request.parameters
        kwargs = {"candidate_labels": candidate_labels(p)}
        if p.get("hypothesis_template"):
            kwargs["hypothesis_template"] = p["hypothesis_template"]
        out = self.pipe(self.image(request), **kwargs)
        usage = self.media_usage(request)
        self.forget(request)
        return [{"label": str(o["label"]), "score": float(o["score"])} for o in out], usage
