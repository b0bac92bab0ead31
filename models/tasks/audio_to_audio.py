"""audio-to-audio with a transformers speech-to-speech model (SpeechT5 voice conversion and a HiFi-GAN vocoder):
one audio file -> [{label, content-type, blob}], each blob a base64 audio file, as the hosted service answers.

The directory holds the model, its feature extractor, the vocoder in `vocoder/` (or `options.vocoder`, a local
directory) and a speaker embedding in `speaker_embeddings.npy` (zeros when absent)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from models.base import param_int
from models.media import audio_format, encode_audio
from models.tasks.media_runner import MediaRunner
from models.types import AUDIO_TO_AUDIO, TaskRequest


class AudioToAudioRunner(MediaRunner):
    tasks = (AUDIO_TO_AUDIO,)
    media = "audio"

    def load(self) -> None:
        import numpy as np
        import torch
        from transformers import AutoFeatureExtractor, SpeechT5ForSpeechToSpeech, SpeechT5HifiGan

        d = Path(self.directory)
        self.features = AutoFeatureExtractor.from_pretrained(str(d))
        self.sampling_rate = int(self.features.sampling_rate)
        self.model = (
            SpeechT5ForSpeechToSpeech.from_pretrained(str(d), dtype=self.dtype).to(self.device).eval()
        )
        vocoder_dir = Path(self.spec.options.get("vocoder") or d / "vocoder")
        self.vocoder = (
            SpeechT5HifiGan.from_pretrained(str(vocoder_dir), dtype=self.dtype).to(self.device).eval()
        )
        embedding_file = d / "speaker_embeddings.npy"
        dim = int(self.model.config.speaker_embedding_dim)
        embedding = np.load(embedding_file) if embedding_file.exists() else np.zeros(dim, dtype="float32")
        self.speaker = torch.tensor(embedding, dtype=self.dtype).reshape(1, dim).to(self.device)

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        param_int(request.parameters, "seed", lo=0, hi=2**63 - 1)
        self.audio(request, self.sampling_rate)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        import torch

        audio = self.audio(request, self.sampling_rate)
        if request.parameters.get("seed") is not None:
            torch.manual_seed(int(request.parameters["seed"]))
        enc = self.features(audio=audio.samples, sampling_rate=self.sampling_rate, return_tensors="pt")
        o = self.spec.defaults
        with torch.inference_mode():
            speech = self.model.generate_speech(
                enc["input_values"].to(self.device, self.dtype),
                speaker_embeddings=self.speaker,
                vocoder=self.vocoder,
                minlenratio=float(o.get("minlenratio", 0.0)),
                maxlenratio=float(o.get("maxlenratio", 20.0)),
            )
        fmt, media_type = audio_format(request.accept)
        blob = encode_audio(speech.float().cpu().numpy(), self.sampling_rate, fmt)
        usage = self.media_usage(request)
        self.forget(request)
        return [
            {"label": "speech", "content-type": media_type, "blob": base64.b64encode(blob).decode()}
        ], usage
