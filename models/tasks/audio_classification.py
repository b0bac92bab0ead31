"""audio-classification with a transformers audio classifier (Wav2Vec2, AST, Whisper encoder): one audio file
-> [{label, score}], best first."""

from __future__ import annotations

from typing import Any

from models.base import param_str
from models.tasks.image_classification import load_pipeline
from models.tasks.media_runner import MediaRunner, top_k
from models.types import AUDIO_CLASSIFICATION, TaskRequest

_FUNCTIONS = ("sigmoid", "softmax", "none")


class AudioClassificationRunner(MediaRunner):
    tasks = (AUDIO_CLASSIFICATION,)
    media = "audio"

    def load(self) -> None:
        self.pipe = load_pipeline("audio-classification", self)
        self.sampling_rate = int(self.pipe.feature_extractor.sampling_rate)
        self.num_labels = int(self.pipe.model.config.num_labels)

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        top_k(request.parameters, 10_000)
        param_str(request.parameters, "function_to_apply", choices=_FUNCTIONS)
        self.audio(request, self.sampling_rate)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        p = request.parameters
        audio = self.audio(request, self.sampling_rate)
        kwargs: dict[str, Any] = {"top_k": min(int(p.get("top_k") or 5), self.num_labels)}
        if p.get("function_to_apply"):
            kwargs["function_to_apply"] = p["function_to_apply"]
        out = self.pipe({"raw": audio.samples, "sampling_rate": audio.sampling_rate}, **kwargs)
        usage = self.media_usage(request)
        self.forget(request)
        return [{"label": str(o["label"]), "score": float(o["score"])} for o in out], usage
