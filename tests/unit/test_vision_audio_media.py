"""Media bodies and files without a model: how a body becomes JSON or a file (serving/body.py), how the vision
and audio routes read it (serving/routes/media.py), and how images and audio are decoded (models/media.py)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from models.catalog import ModelSpec
from models.errors import InvalidInput
from models.media import (
    audio_format,
    audio_seconds,
    decode_audio,
    decode_base64,
    decode_image,
    encode_audio,
    image_size,
    media_bytes,
)
from serving.body import RawBody, decode_body
from serving.routes.base import RequestContext
from serving.routes.media import (
    AutomaticSpeechRecognitionAdapter,
    ImageClassificationAdapter,
    VisualQuestionAnsweringAdapter,
    ZeroShotImageClassificationAdapter,
    client_of,
)


def _png(size=(8, 6), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds=0.5, rate=8000, channels=1, fmt="WAV") -> bytes:
    data = np.zeros((int(seconds * rate), channels), dtype="float32") + 0.25
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt)
    return buf.getvalue()


# serving/body.py


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", None, "application/x-www-form-urlencoded"]
)
def test_json_bodies_parse_whatever_the_declared_type(content_type):
    assert decode_body(b'{"inputs": "hi"}', content_type) == {"inputs": "hi"}


@pytest.mark.parametrize(
    ("content_type", "declared"),
    [
        ("image/png", "image/png"),
        ("audio/wav; codecs=1", "audio/wav"),
        (None, None),
        ("application/octet-stream", "application/octet-stream"),
        ("application/x-www-form-urlencoded", None),  # curl --data-binary @file
    ],
)
def test_files_become_raw_bodies(content_type, declared):
    body = decode_body(_png(), content_type)
    assert isinstance(body, RawBody) and body.content == _png() and body.content_type == declared


def test_bad_bodies_are_400s():
    with pytest.raises(InvalidInput, match="empty"):
        decode_body(b"  ", "image/png")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        decode_body(b'{"inputs": ', "application/json")
    with pytest.raises(InvalidInput, match="Content-Type text/plain"):
        decode_body(_png(), "text/plain")
    with pytest.raises(InvalidInput, match="Content-Type multipart/form-data is not accepted"):
        decode_body(_png(), "multipart/form-data; boundary=x")


# serving/routes/media.py


def _ctx(user_agent: str = "") -> RequestContext:
    return RequestContext("r", "i", "m", None, user_agent=user_agent)


SPEC = ModelSpec.model_validate({"id": "local/x", "task": "image-classification", "source": {"path": "x"}})


def test_clients_are_told_apart_by_user_agent():
    assert client_of("unknown/None; hf_hub/2.4.0; python/3.11.7; torch/2.13.0+cpu") == "python"
    assert client_of("huggingface_hub/0.28.0; python/3.10") == "python"
    assert client_of("@huggingface/inference/4.13.30") == "js"
    assert client_of("@huggingface/inference/4.13.30 Mozilla/5.0 (X11)") == "js"
    assert client_of("curl/8.5.0") == "other"


def test_image_adapter_reads_raw_bytes_base64_data_urls_and_keeps_urls():
    a = ImageClassificationAdapter()
    png = _png()
    raw = a.parse(RawBody(png, "image/png"), SPEC, _ctx())
    assert raw.request.inputs == png and raw.request.parameters == {} and raw.characters == -1
    b64 = base64.b64encode(png).decode()
    for value in (
        b64,
        b64.rstrip("="),
        f"data:image/png;base64,{b64}",
        base64.urlsafe_b64encode(png).decode(),
    ):
        parsed = a.parse({"inputs": value, "parameters": {"top_k": 2, "other": 1}}, SPEC, _ctx())
        assert parsed.request.inputs == png and parsed.request.parameters == {"top_k": 2}
    url = "https://example.com/a.png"
    assert a.parse({"inputs": url}, SPEC, _ctx()).request.inputs == url  # the runner refuses or fetches it
    with pytest.raises(InvalidInput, match="Content-Type audio/wav"):
        a.parse(RawBody(b"RIFF", "audio/wav"), SPEC, _ctx())
    with pytest.raises(InvalidInput, match="inputs must be the file as a base64 string"):
        a.parse({"inputs": [1, 2]}, SPEC, _ctx())


def test_audio_adapter_refuses_images_and_video():
    a = AutomaticSpeechRecognitionAdapter()
    for content_type in ("image/jpeg", "video/mp4"):
        with pytest.raises(InvalidInput, match="takes an audio file"):
            a.parse(RawBody(b"x", content_type), SPEC, _ctx())
    assert a.parse(RawBody(b"x", "audio/flac"), SPEC, _ctx()).request.inputs == b"x"


def test_question_forms_of_both_clients():
    a = VisualQuestionAnsweringAdapter()
    b64 = base64.b64encode(b"img").decode()
    js = a.parse({"inputs": {"image": b64, "question": "Why?"}, "parameters": {"top_k": 1}}, SPEC, _ctx())
    py = a.parse({"inputs": b64, "question": "Why?", "image": b64, "parameters": {}}, SPEC, _ctx())
    assert js.request.inputs == py.request.inputs == {"image": b"img", "question": "Why?"}
    assert js.characters == 4
    with pytest.raises(InvalidInput, match="needs a question"):
        a.parse(RawBody(b"img", None), SPEC, _ctx())
    z = ZeroShotImageClassificationAdapter()
    assert z.parse({"inputs": {"image": b64}}, SPEC, _ctx()).request.inputs == b"img"


# models/media.py


def test_base64_errors_name_the_field():
    assert decode_base64("data:image/png;base64,aGk=", "inputs") == b"hi"
    with pytest.raises(InvalidInput, match=r"inputs\.image must be base64"):
        decode_base64("%%%", "inputs.image")
    with pytest.raises(InvalidInput, match="data: URL must be base64"):
        decode_base64("data:text/plain,hi", "inputs")


def test_remote_urls_are_refused_unless_allowed():
    with pytest.raises(InvalidInput, match="does not fetch remote URLs"):
        media_bytes("http://example.com/a.wav", "inputs", {})
    with pytest.raises(InvalidInput, match="inputs is empty"):
        media_bytes(b"", "inputs", {})


def test_images_decode_to_rgb_within_the_pixel_limit():
    img = decode_image(_png((8, 6), "RGBA"), "inputs", max_pixels=48)
    assert img.mode == "RGB" and img.size == (8, 6)
    assert decode_image(_png((8, 6), "L"), "inputs", 48).mode == "RGB"
    assert image_size(_png((8, 6))) == (8, 6) and image_size(b"nope") is None
    with pytest.raises(InvalidInput, match="8x6 = 48 pixels, more than this model's limit of 47"):
        decode_image(_png((8, 6)), "inputs", max_pixels=47)
    with pytest.raises(InvalidInput, match=r"inputs\.image is not a readable image"):
        decode_image(b"GIF89a nonsense", "inputs.image", 100)
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        big = io.BytesIO()
        Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(big, "PNG")
        decode_image(big.getvalue()[:-200], "inputs", 10_000)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_audio_decodes_to_mono_at_the_model_rate(fmt):
    audio = decode_audio(_wav(0.5, 8000, channels=2, fmt=fmt), "inputs", max_seconds=10, sampling_rate=16000)
    assert audio.sampling_rate == 16000 and audio.samples.ndim == 1
    assert audio.seconds == pytest.approx(0.5, abs=0.06)  # MP3 pads a frame
    if fmt in ("WAV", "FLAC"):
        assert np.allclose(audio.samples[2000:6000], 0.25, atol=1e-3)  # resampled, downmixed, level kept


def test_audio_limits_and_garbage():
    assert audio_seconds(_wav(0.5)) == pytest.approx(0.5) and audio_seconds(b"nope") is None
    with pytest.raises(InvalidInput, match=r"the audio is 2.0 s long, more than this model's limit of 1 s"):
        decode_audio(_wav(2.0), "inputs", max_seconds=1)
    with pytest.raises(InvalidInput, match=r"inputs is not a readable audio file.*WAV, FLAC"):
        decode_audio(b"ID3 not really an mp3", "inputs", max_seconds=10)
    # a truncated file that still has a header: a few samples, too short for any model's first frame (was a 500)
    with pytest.raises(InvalidInput, match=r"inputs: the audio is 1.0 ms long, shorter than the 100 ms"):
        decode_audio(_wav(0.5, 8000)[: 44 + 16], "inputs", max_seconds=10)
    assert decode_audio(_wav(0.1, 8000), "inputs", max_seconds=10).seconds == pytest.approx(0.1)


def test_generated_audio_formats():
    assert audio_format(None) == ("FLAC", "audio/flac")
    assert audio_format("*/*") == ("FLAC", "audio/flac")
    assert audio_format("audio/wav") == ("WAV", "audio/x-wav")
    samples = np.linspace(-2, 2, 1600).astype("float32")  # clipped to [-1, 1] on the way out
    for fmt, magic in (("FLAC", b"fLaC"), ("WAV", b"RIFF")):
        data = encode_audio(samples, 16000, fmt)
        decoded, rate = sf.read(io.BytesIO(data))
        assert data[:4] == magic and rate == 16000 and len(decoded) == 1600 and np.abs(decoded).max() <= 1.0


def test_json_of_an_output_is_plain():
    # A segmentation mask travels as a base64 PNG string in plain JSON.
    from models.media import png_base64

    mask = png_base64(Image.new("L", (4, 3), 255))
    assert json.loads(json.dumps({"mask": mask}))["mask"] == mask
    assert Image.open(io.BytesIO(base64.b64decode(mask))).size == (4, 3)
