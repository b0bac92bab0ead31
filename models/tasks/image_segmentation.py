"""image-segmentation with a transformers segmenter (semantic, instance or panoptic): [{label, score?, mask}],
each mask a base64 PNG (mode L, the input's size), as the hosted service answers."""

from __future__ import annotations

from typing import Any

from models.base import param_float, param_str
from models.media import png_base64
from models.tasks.image_classification import load_pipeline
from models.tasks.media_runner import MediaRunner
from models.types import IMAGE_SEGMENTATION, TaskRequest

_SUBTASKS = ("semantic", "instance", "panoptic")


class ImageSegmentationRunner(MediaRunner):
    tasks = (IMAGE_SEGMENTATION,)

    def load(self) -> None:
        self.pipe = load_pipeline("image-segmentation", self)

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        p = request.parameters
        for name in ("threshold", "mask_threshold", "overlap_mask_area_threshold"):
            param_float(p, name, lo=0, hi=1)
        param_str(p, "subtask", choices=_SUBTASKS)
        self.image(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        p = request.parameters
        kwargs = {
            k: p[k]
            for k in ("threshold", "mask_threshold", "overlap_mask_area_threshold", "subtask")
            if p.get(k) is not None
        }
        out = self.pipe(self.image(request), **kwargs)
        usage = self.media_usage(request)
        self.forget(request)
        segments = []
        for o in out:
            segment: dict[str, Any] = {"label": str(o["label"])}
            # Semantic segmenters give no score: omit it (the JS client refuses null).
            if o.get("score") is not None:
                segment["score"] = float(o["score"])
            segment["mask"] = png_base64(o["mask"].convert("L"))
            segments.append(segment)
        return segments, usage
