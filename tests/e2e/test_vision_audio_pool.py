"""Vision and audio models through the all-tasks catalog's pool on real Ray Serve (tests/fixtures/tasks_service.py):
the file's bytes cross the Ray handle to a shared replica that loads the model on first use."""

from __future__ import annotations

import io

import httpx
import numpy as np
import soundfile as sf
from huggingface_hub import InferenceClient
from PIL import Image


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(1).rand(40, 56, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _flac(seconds: float = 1.5) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * 22050), dtype="float32") + 0.1, 22050, format="FLAC")
    return buf.getvalue()


def test_image_and_audio_models_in_the_pool(hfi_tasks_service):
    url = hfi_tasks_service.url
    detections = InferenceClient(base_url=f"{url}/models/local/tiny-yolos", api_key="hf_x").object_detection(
        _png()
    )
    assert detections and all(0 <= d.box.xmin <= d.box.xmax <= 56 for d in detections)
    r = httpx.post(f"{url}/models/local/tiny-wav2vec2-asr", content=_flac(), headers={"Content-Type": "audio/flac"},
                   timeout=120)  # fmt: skip
    assert r.status_code == 200 and isinstance(r.json()["text"], str)
    assert r.headers["x-compute-audio-length"] == "1.500" and r.headers["x-compute-characters"] == "-1"
    bad = httpx.post(f"{url}/models/local/tiny-vit", content=b"\x89PNG broken", timeout=120)
    assert bad.status_code == 400 and "inputs is not a readable image" in bad.json()["error"]
