"""object-detection with a transformers detector (DETR, YOLOS, ...): [{label, score, box: {xmin, ymin, xmax,
ymax}}] in pixels of the input image."""

from __future__ import annotations

from typing import Any

from models.base import param_float
from models.tasks.image_classification import load_pipeline
from models.tasks.media_runner import MediaRunner
from models.types import OBJECT_DETECTION, TaskRequest


class ObjectDetectionRunner(MediaRunner):
    tasks = (OBJECT_DETECTION,)

    def load(self) -> None:
        self.pipe = load_pipeline("object-detection", self)

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        param_float(request.parameters, "threshold", lo=0, hi=1)
        self.image(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        threshold = request.parameters.get("threshold", self.spec.defaults.get("threshold", 0.5))
        out = self.pipe(self.image(request), threshold=float(threshold))
        usage = self.media_usage(request)
        self.forget(request)
        return [
            {
                "label": str(o["label"]),
                "score": float(o["score"]),
                "box": {k: int(o["box"][k]) for k in ("xmin", "ymin", "xmax", "ymax")},
            }
            for o in out
        ], usage
