"""image-classification with a transformers image classifier: one image -> [{label, score}], best first."""

from __future__ import annotations

from typing import Any

from models.base import param_str
from models.tasks.media_runner import MediaRunner, top_k
from models.types import IMAGE_CLASSIFICATION, TaskRequest

_FUNCTIONS = ("sigmoid", "softmax", "none")


def load_pipeline(task: str, runner: Any, **kwargs: Any) -> Any:
    """A transformers pipeline over the runner's directory, on its device and dtype."""
    from transformers import pipeline

    return pipeline(task, model=str(runner.directory), device=runner.device, dtype=runner.dtype, **kwargs)


class ImageClassificationRunner(MediaRunner):
    tasks = (IMAGE_CLASSIFICATION,)

    def load(self) -> None:
        self.pipe = load_pipeline("image-classification", self)
        self.num_labels = int(self.pipe.model.config.num_labels)

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        top_k(request.parameters, 10_000)
        param_str(request.parameters, "function_to_apply", choices=_FUNCTIONS)
        self.image(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        p = request.parameters
        kwargs: dict[str, Any] = {"top_k": min(int(p.get("top_k") or 5), self.num_labels)}
        if p.get("function_to_apply"):
            kwargs["function_to_apply"] = p["function_to_apply"]
        out = self.pipe(self.image(request), **kwargs)
        usage = self.media_usage(request)
        self.forget(request)
        return [{"label": str(o["label"]), "score": float(o["score"])} for o in out], usage
