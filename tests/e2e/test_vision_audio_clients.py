"""The vision and audio tasks with the unmodified clients (huggingface_hub.InferenceClient and
@huggingface/inference) and raw HTTP, against the tiny models of models/catalog/vision-audio.yaml served over
HTTP in this process (the real ingress, parsing, runners and metering; no Ray)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml
from huggingface_hub import InferenceClient
from huggingface_hub.errors import BadRequestError
from PIL import Image

JS = Path(__file__).parent / "js"
CATALOG = Path(__file__).parents[2] / "models" / "catalog" / "vision-audio.yaml"
IMAGE_LABELS = {"cat", "dog", "bird", "car", "tree"}


def _png(width: int = 64, height: int = 48) -> bytes:
    pixels = (np.random.RandomState(0).rand(height, width, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _audio(seconds: float = 1.0, rate: int = 16000, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32"), rate, format=fmt)
    return buf.getvalue()


PNG, WAV = _png(), _audio()


@pytest.fixture(scope="module")
def url(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    from fixtures.net import serve_in_thread

    from serving.config import Settings
    from serving.http import create_app
    from serving.ingress import IngressCore
    from serving.inprocess import InProcessBackend

    work = tmp_path_factory.mktemp("vision-audio")
    settings = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "models": yaml.safe_load(CATALOG.read_text())["models"],
            "metering": {"database_url": f"sqlite:///{work / 'ledger.db'}", "spool_dir": str(work / "spool")},
        },
        env={},
    )
    catalog, _ = settings.validated()
    core = IngressCore(settings, InProcessBackend(catalog, settings.load_options(), torch_threads=1))
    try:
        with serve_in_thread(create_app(core)) as base:
            yield base
    finally:
        core.metering.close()


def client(url: str, model: str) -> InferenceClient:
    return InferenceClient(base_url=f"{url}/models/{model}", api_key="hf_test_token")


# The Python client


def test_image_classification(url):
    c = client(url, "local/tiny-vit")
    out = c.image_classification(PNG)  # raw bytes, no Content-Type
    assert len(out) == 5 and {o.label for o in out} == IMAGE_LABELS
    assert all(isinstance(o.score, float) for o in out)
    assert [o.score for o in out] == sorted((o.score for o in out), reverse=True)
    assert sum(o.score for o in out) == pytest.approx(1.0, abs=1e-4)
    top2 = c.image_classification(PNG, top_k=2, function_to_apply="sigmoid")  # JSON with base64
    assert len(top2) == 2 and top2[0].label == out[0].label


def test_object_detection(url):
    c = client(url, "local/tiny-yolos")
    out = c.object_detection(PNG)
    assert out and all(o.label in IMAGE_LABELS and 0.5 <= o.score <= 1 for o in out)
    for o in out:
        b = o.box
        assert all(isinstance(v, int) for v in (b.xmin, b.ymin, b.xmax, b.ymax))
        assert 0 <= b.xmin <= b.xmax <= 64 and 0 <= b.ymin <= b.ymax <= 48
    assert c.object_detection(PNG, threshold=0.99) == []


def test_image_segmentation_masks_are_png_of_the_input_size(url):
    out = client(url, "local/tiny-segformer").image_segmentation(PNG)
    assert out and {o.label for o in out} <= {"background", "cat", "dog"}
    for o in out:
        assert isinstance(o.mask, Image.Image) and o.mask.size == (64, 48) and o.mask.mode == "L"
        assert o.score is None  # semantic segmentation: no score
    union = np.maximum.reduce([np.asarray(o.mask) for o in out])
    assert union.min() == 255  # every pixel belongs to a segment


def test_image_to_text_python_gets_a_list(url):
    out = client(url, "local/tiny-captioner").image_to_text(PNG)
    assert isinstance(out.generated_text, str) and out.generated_text.strip()


def test_zero_shot_image_classification(url):
    out = client(url, "local/tiny-clip").zero_shot_image_classification(
        PNG, candidate_labels=["cat", "dog", "car"]
    )
    assert {o.label for o in out} == {"cat", "dog", "car"}
    assert sum(o.score for o in out) == pytest.approx(1.0, abs=1e-4)


def test_visual_question_answering(url):
    out = client(url, "local/tiny-vilt").visual_question_answering(PNG, "What is in the picture?", top_k=3)
    assert len(out) == 3 and all(isinstance(o.answer, str) and 0 <= o.score <= 1 for o in out)


def test_document_question_answering_with_word_boxes(url):
    c = client(url, "local/tiny-layoutlm-qa")
    boxes = [["cat", [0, 0, 100, 100]], ["dog", [100, 0, 200, 100]], ["car", [200, 0, 300, 100]]]
    out = c.document_question_answering(PNG, "Which animal?", word_boxes=boxes)
    assert out and out[0].answer in {"cat", "dog", "car", "cat dog", "dog car", "cat dog car"}
    assert isinstance(out[0].score, float) and isinstance(out[0].start, int) and isinstance(out[0].end, int)
    with pytest.raises(BadRequestError, match="word_boxes is required"):  # no OCR engine on this server
        c.document_question_answering(PNG, "Which animal?")
    with pytest.raises(
        BadRequestError, match=r"word_boxes\[1\] .* x0 <= x1"
    ):  # a box of negative width: was a 500
        c.document_question_answering(
            PNG, "Which animal?", word_boxes=[boxes[0], ["dog", [200, 0, 100, 100]]]
        )


def test_image_to_image(url):
    c = client(url, "local/tiny-flux-img2img")
    out = c.image_to_image(PNG)  # raw bytes: the output keeps the input's size (rounded to the pipeline's)
    assert isinstance(out, Image.Image) and out.size == (64, 48)
    a = c.image_to_image(PNG, prompt="a cat", target_size={"width": 32, "height": 32}, seed=3)
    b = c.image_to_image(PNG, prompt="a cat", target_size={"width": 32, "height": 32}, seed=3)
    assert a.size == (32, 32) and a.tobytes() == b.tobytes()


def test_automatic_speech_recognition(url):
    c = client(url, "local/tiny-wav2vec2-asr")
    out = c.automatic_speech_recognition(WAV)
    assert isinstance(out.text, str) and out.text and out.chunks is None
    # FLAC at 44.1 kHz, resampled on the server; timestamps as chunks
    stamped = c.automatic_speech_recognition(
        _audio(1.0, 44100, "FLAC"), extra_body={"return_timestamps": True}
    )
    assert stamped.chunks and all(
        isinstance(ch.text, str) and len(ch.timestamp) == 2 for ch in stamped.chunks
    )
    assert stamped.chunks[-1].timestamp[1] <= 1.01


def test_audio_classification(url):
    out = client(url, "local/tiny-wav2vec2-audio-classifier").audio_classification(WAV, top_k=2)
    assert len(out) == 2 and {o.label for o in out} <= {"speech", "music", "noise"}


def test_audio_to_audio(url):
    out = client(url, "local/tiny-speecht5-vc").audio_to_audio(WAV)
    assert len(out) == 1 and out[0].label == "speech" and out[0].content_type == "audio/flac"
    samples, rate = sf.read(io.BytesIO(out[0].blob))
    assert rate == 16000 and len(samples) > 0


def test_text_to_speech(url):
    audio = client(url, "local/tiny-vits").text_to_speech("hello there")
    samples, rate = sf.read(io.BytesIO(audio))
    assert audio[:4] == b"fLaC" and rate == 16000 and len(samples) > 0


# Raw HTTP: forms the clients do not send, headers, and errors


def test_raw_http_forms_and_headers(url):
    r = httpx.post(f"{url}/models/local/tiny-vit", content=PNG, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.headers["x-compute-characters"] == "-1"
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    r2 = httpx.post(f"{url}/models/local/tiny-vit", json={"inputs": data_url, "parameters": {"top_k": 1}})
    assert r2.status_code == 200 and r2.json()[0]["label"] == r.json()[0]["label"]
    # curl --data-binary @file sends application/x-www-form-urlencoded
    r3 = httpx.post(
        f"{url}/models/local/tiny-wav2vec2-asr",
        content=WAV,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r3.status_code == 200 and r3.headers["x-compute-audio-length"] == "1.000"
    assert "x-compute-audio-length" in r3.headers["access-control-expose-headers"]
    # image-to-text: the hosted shape for other clients, the bare object for the JS client
    assert isinstance(httpx.post(f"{url}/models/local/tiny-captioner", content=PNG).json(), list)
    js = httpx.post(
        f"{url}/models/local/tiny-captioner",
        content=PNG,
        headers={"User-Agent": "@huggingface/inference/4.13.30"},
    )
    assert isinstance(js.json()["generated_text"], str)
    # text-to-audio through the explicit pipeline route, WAV by Accept
    wav = httpx.post(
        f"{url}/models/local/tiny-vits-audio/pipeline/text-to-audio",
        json={"inputs": "a dog barking"},
        headers={"Accept": "audio/wav"},
    )
    assert (
        wav.status_code == 200 and wav.headers["content-type"] == "audio/x-wav" and wav.content[:4] == b"RIFF"
    )
    # VQA the way the Python client sends it: question and image at the root
    vqa = httpx.post(
        f"{url}/models/local/tiny-vilt",
        json={
            "inputs": base64.b64encode(PNG).decode(),
            "question": "What?",
            "image": base64.b64encode(PNG).decode(),
        },
    )
    assert vqa.status_code == 200 and vqa.headers["x-compute-characters"] == "5"


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        (
            "local/tiny-vit",
            {"content": b"\x89PNG\r\n\x1a\n garbage", "headers": {"Content-Type": "image/png"}},
            "inputs is not a readable image",
        ),
        ("local/tiny-vit", {"content": PNG[: len(PNG) // 2]}, "inputs is a corrupt or truncated image"),
        (
            "local/tiny-vit",
            {"content": WAV, "headers": {"Content-Type": "audio/wav"}},
            "Content-Type audio/wav: task image-classification takes an image file",
        ),
        (
            "local/tiny-wav2vec2-asr",
            {"content": PNG, "headers": {"Content-Type": "image/png"}},
            "Content-Type image/png: task automatic-speech-recognition takes an audio file",
        ),
        (
            "local/tiny-wav2vec2-asr",
            {"content": b"RIFF\x00\x00\x00\x00WAVEjunk"},
            "inputs is not a readable audio file",
        ),
        (
            "local/tiny-vit",
            {"content": PNG, "headers": {"Content-Type": "text/plain"}},
            "Content-Type text/plain",
        ),
        ("local/tiny-vit", {"json": {"inputs": "https://example.com/cat.png"}}, "does not fetch remote URLs"),
        ("local/tiny-vit", {"json": {"inputs": "not base64!"}}, "inputs must be base64-encoded"),
        (
            "local/tiny-vit",
            {"json": {"inputs": base64.b64encode(PNG).decode(), "parameters": {"top_k": 0}}},
            "parameters.top_k must be >= 1",
        ),
        (
            "local/tiny-clip",
            {"json": {"inputs": base64.b64encode(PNG).decode()}},
            "parameters.candidate_labels",
        ),
        ("local/tiny-vilt", {"content": PNG}, "needs a question"),
        (
            "local/tiny-vilt",
            {"json": {"inputs": {"image": base64.b64encode(PNG).decode()}}},
            "inputs.question",
        ),
        (
            "local/tiny-wav2vec2-asr",
            {
                "json": {
                    "inputs": base64.b64encode(WAV).decode(),
                    "parameters": {"return_timestamps": "sometimes"},
                }
            },
            "parameters.return_timestamps",
        ),
        ("local/tiny-speecht5-vc", {"content": _audio(31.0)}, "more than this model's limit of 30 s"),
        (
            "local/tiny-flux-img2img",
            {
                "json": {
                    "inputs": base64.b64encode(PNG).decode(),
                    "parameters": {"target_size": {"width": 33, "height": 32}},
                }
            },
            "parameters.target_size.width must be a multiple of",
        ),
        ("local/tiny-vits", {"json": {"inputs": ""}}, "inputs must not be empty"),
        # characters the voice's vocabulary lacks (was a 500), and audio too short to make a frame (was a 500)
        ("local/tiny-vits", {"json": {"inputs": "0 1 2"}}, "are in this model's vocabulary"),
        ("local/tiny-wav2vec2-audio-classifier", {"content": _audio(0.01)}, "shorter than the 100 ms"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(url, model, kwargs, message):
    r = httpx.post(f"{url}/models/{model}", **kwargs)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]


def test_too_many_pixels_is_a_400(url):
    buf = io.BytesIO()
    Image.new("RGB", (5000, 3400)).save(buf, format="PNG")  # 17 M pixels: over the default 4096 x 4096
    r = httpx.post(
        f"{url}/models/local/tiny-vit", content=buf.getvalue(), headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 400 and "more than this model's limit of 16777216" in r.json()["error"]


# The JS client


@pytest.fixture(scope="module")
def js_client_dir() -> Path:
    """@huggingface/inference installed once into the cache directory test_js_client.py uses, with this test's
    script beside it (ES modules resolve packages from the script's own directory)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the JS client test")
    target = Path(os.environ.get("HFI_JS_CACHE", Path.home() / ".cache" / "hfi" / "js-client"))
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(JS / "package.json", target / "package.json")
    shutil.copy(JS / "vision_audio.mjs", target / "vision_audio.mjs")
    if not (target / "node_modules" / "@huggingface" / "inference").exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=target, check=True, timeout=300
        )
    return target


def test_js_client_vision_and_audio(url, js_client_dir, tmp_path):
    (tmp_path / "image.png").write_bytes(PNG)
    (tmp_path / "audio.wav").write_bytes(WAV)
    done = subprocess.run(
        ["node", "vision_audio.mjs"],
        cwd=js_client_dir,
        env={
            **os.environ,
            "BASE": url,
            "IMAGE": str(tmp_path / "image.png"),
            "AUDIO": str(tmp_path / "audio.wav"),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    ok = {k: v["ok"] for k, v in out.items() if "ok" in v}
    assert {o["label"] for o in ok["imageClassification"]} == IMAGE_LABELS
    assert ok["imageClassificationUntyped"] == ok["imageClassification"]  # a Blob with no type: sniffed
    assert ok["objectDetection"] and all(
        set(o["box"]) == {"xmin", "ymin", "xmax", "ymax"} for o in ok["objectDetection"]
    )
    for segment in ok["imageSegmentation"]:
        mask = Image.open(io.BytesIO(base64.b64decode(segment["mask"])))
        assert mask.format == "PNG" and mask.size == (64, 48) and "score" not in segment
    assert isinstance(ok["imageToText"]["generated_text"], str)  # the bare object the JS client wants
    assert {o["label"] for o in ok["zeroShotImageClassification"]} == {"cat", "dog"}
    assert isinstance(ok["visualQuestionAnswering"]["answer"], str)  # the client returns the best answer
    assert isinstance(ok["documentQuestionAnswering"]["answer"], str)
    assert ok["imageToImage"]["type"] == "image/jpeg" and ok["imageToImage"]["head"].startswith(
        "\u00ff\u00d8"
    )
    assert ok["imageToImagePrompt"]["type"] == "image/jpeg"
    assert isinstance(ok["automaticSpeechRecognition"]["text"], str)
    assert {o["label"] for o in ok["audioClassification"]} == {"speech", "music", "noise"}
    assert ok["audioToAudio"][0]["content-type"] == "audio/flac" and ok["audioToAudio"][0]["blob"]
    assert ok["textToSpeech"] == {**ok["textToSpeech"], "type": "audio/flac", "head": "fLaC"}
    assert ok["textToAudio"]["type"] == "audio/flac" and ok["textToAudio"]["size"] > 100
    # The server's message reaches the JS user as a string.
    assert "inputs is not a readable image" in out["corruptImage"]["error"]
    assert "Content-Type audio/wav" in out["wrongType"]["error"]


def test_openapi_describes_each_vision_and_audio_route(url):
    spec = httpx.get(f"{url}/openapi.json").json()
    for task in (
        "image-classification", "object-detection", "image-segmentation", "image-to-text",
        "zero-shot-image-classification", "visual-question-answering", "document-question-answering",
        "image-to-image", "automatic-speech-recognition", "audio-classification", "audio-to-audio",
        "text-to-speech", "text-to-audio",
    ):  # fmt: skip
        op = spec["paths"][f"/models/{{org}}/{{name}}/pipeline/{task}"]["post"]
        content = op["requestBody"]["content"]
        assert "application/json" in content and op["responses"]["200"]["content"]
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["required"] == ["error"]
        if task not in ("zero-shot-image-classification", "visual-question-answering",
                        "document-question-answering", "text-to-speech", "text-to-audio"):  # fmt: skip
            assert any(t.startswith(("image/", "audio/")) for t in content)  # the raw file as the body
    # the documented path is a real route: a request built from it is served
    r = httpx.post(f"{url}/models/local/tiny-vit/pipeline/image-classification", content=PNG)
    assert r.status_code == 200 and r.json()[0]["label"] in IMAGE_LABELS
