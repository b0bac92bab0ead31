"""automatic-speech-recognition with a transformers speech recognizer (Wav2Vec2 CTC, Whisper): one audio file
-> {text, chunks?}. Audio is decoded with libsndfile and resampled to the model's rate (models/media.py)."""

from __future__ import annotations

from typing import Any

from models.errors import InvalidInput
from models.tasks.image_classification import load_pipeline
from models.tasks.image_to_text import generation_kwargs
from models.tasks.media_runner import MediaRunner
from models.types import AUTOMATIC_SPEECH_RECOGNITION, TaskRequest

CHUNK_SECONDS = 30  # longer audio is transcribed in chunks (Whisper's window)


def timestamps(params: dict[str, Any]) -> bool | str | None:
    value = params.get("return_timestamps")
    if value is None or isinstance(value, bool) or value in ("word", "char"):
        return value
    raise InvalidInput(f"parameters.return_timestamps must be true, false, 'word' or 'char', got {value!r}")


class AutomaticSpeechRecognitionRunner(MediaRunner):
    tasks = (AUTOMATIC_SPEECH_RECOGNITION,)
    media = "audio"

    def load(self) -> None:
        self.pipe = load_pipeline("automatic-speech-recognition", self)
        self.sampling_rate = int(self.pipe.feature_extractor.sampling_rate)
        self.ctc = self.pipe.type != "seq2seq_whisper" and self.pipe.type != "seq2seq"

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        timestamps(request.parameters)
        generation_kwargs(request.parameters, self.spec.limits.max_new_tokens)
        self.audio(request, self.sampling_rate)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        p = request.parameters
        audio = self.audio(request, self.sampling_rate)
        kwargs: dict[str, Any] = {}
        stamps = timestamps(p)
        if stamps:
            kwargs["return_timestamps"] = ("word" if stamps is True else stamps) if self.ctc else True
        generate = generation_kwargs(p, self.spec.limits.max_new_tokens)
        if generate and not self.ctc:
            kwargs["generate_kwargs"] = generate
        if audio.seconds > CHUNK_SECONDS:
            kwargs["chunk_length_s"] = CHUNK_SECONDS
        out = self.pipe({"raw": audio.samples, "sampling_rate": audio.sampling_rate}, **kwargs)
        usage = self.media_usage(request)
        self.forget(request)
        result: dict[str, Any] = {"text": str(out.get("text", "")).strip()}
        if stamps and out.get("chunks") is not None:
            result["chunks"] = [
                {"text": str(c.get("text", "")), "timestamp": [t for t in (c.get("timestamp") or ())]}
                for c in out["chunks"]
            ]
        return result, usage
