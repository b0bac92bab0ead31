"""text-to-speech and text-to-audio with a transformers text-to-waveform model (VITS, MMS-TTS, MusicGen, Bark):
text -> audio bytes, FLAC by default (what the hosted service answers), WAV/OGG/MP3 when the client's Accept
asks for one."""

from __future__ import annotations

from typing import Any

from models.base import TaskRunner, param_int
from models.errors import InvalidInput
from models.media import audio_format, encode_audio
from models.tasks.image_classification import load_pipeline
from models.tasks.image_to_text import generation_kwargs
from models.types import TEXT_TO_AUDIO, TEXT_TO_SPEECH, TaskRequest


class TextToSpeechRunner(TaskRunner):
    tasks = (TEXT_TO_SPEECH, TEXT_TO_AUDIO)

    def load(self) -> None:
        self.pipe = load_pipeline("text-to-audio", self)
        # Models that generate token by token (MusicGen, Bark) take generate() options; VITS takes none.
        self.generates = hasattr(self.pipe.model, "generate") and self.pipe.model.can_generate()

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        self.texts(request.inputs, allow_list=False)
        tokenizer = getattr(self.pipe, "tokenizer", None)
        # A character-level vocabulary (VITS, MMS-TTS) drops what it lacks: a text of only such characters ("123"
        # for an English voice) leaves the model nothing to read.
        if tokenizer is not None and len(tokenizer(request.inputs)["input_ids"]) == 0:
            raise InvalidInput(
                f"inputs: none of the characters of {request.inputs[:80]!r} are in this model's vocabulary"
                " (spell numbers and symbols out)"
            )
        generation_kwargs(request.parameters, self.spec.limits.max_new_tokens)
        param_int(request.parameters, "seed", lo=0, hi=2**63 - 1)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        import numpy as np
        import torch

        p = request.parameters
        if p.get("seed") is not None:
            torch.manual_seed(int(p["seed"]))
        kwargs: dict[str, Any] = {}
        generate = generation_kwargs(p, self.spec.limits.max_new_tokens)
        if generate and self.generates:
            kwargs["generate_kwargs"] = generate
        out = self.pipe(request.inputs, **kwargs)
        samples = np.asarray(out["audio"], dtype=np.float32).reshape(-1)
        rate = int(out["sampling_rate"])
        fmt, media_type = audio_format(request.accept)
        content = encode_audio(samples, rate, fmt)
        return {"content": content, "media_type": media_type}, {
            "output_audio_ms": round(len(samples) * 1000 / rate)
        }

    def work_units(self, request: TaskRequest) -> int:
        return max(1, request.input_characters())
