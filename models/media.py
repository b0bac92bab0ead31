"""Images and audio in and out of the runners: decode client bytes within limits, encode results.

Every failure on client input is an InvalidInput (400) that names the field. Audio is decoded with libsndfile
(the `soundfile` wheel bundles it; no ffmpeg): WAV, FLAC, OGG (Vorbis, Opus), MP3, AIFF and the other formats
`soundfile.available_formats()` lists. Resampling to the model's rate uses scipy's polyphase filter.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any

from models.errors import InvalidInput

# What a media input may be once the route has parsed it: the file's bytes, or a remote URL (a str) that is
# fetched only where the model's `options.allow_remote_urls` says so.
MediaInput = bytes | str

AUDIO_FORMATS = "WAV, FLAC, OGG (Vorbis/Opus), MP3, AIFF"
# Shorter audio is refused: too short for any speech model's feature encoder (Wav2Vec2's first layers span 25 ms)
# to make one frame, and too short to say anything.
MIN_AUDIO_SECONDS = 0.1


def remote_url_refused(field: str) -> InvalidInput:
    return InvalidInput(
        f"{field}: this server does not fetch remote URLs; send the file's bytes as the request body or as "
        "base64 in JSON (the model's options.allow_remote_urls enables fetching)"
    )


def fetch_url(url: str, field: str, max_bytes: int, timeout_s: float = 10.0) -> bytes:
    """Fetch a remote input (only for models whose options allow it), bounded in size and time."""
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            if response.status_code != 200:
                raise InvalidInput(f"{field}: fetching {url} answered HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidInput(f"{field}: {url} is larger than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as err:
        raise InvalidInput(f"{field}: cannot fetch {url}: {type(err).__name__}") from None


def media_bytes(value: Any, field: str, options: dict[str, Any], max_bytes: int = 64 * 1024 * 1024) -> bytes:
    """The bytes of a media input: given bytes, or a remote URL fetched when the model allows it."""
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise InvalidInput(f"{field} is empty")
        return bytes(value)
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        if not options.get("allow_remote_urls"):
            raise remote_url_refused(field)
        return fetch_url(value, field, max_bytes)
    raise InvalidInput(f"{field} must be a file's bytes (raw body or base64), got {type(value).__name__}")


def decode_base64(value: str, field: str) -> bytes:
    """Standard or URL-safe base64, padded or not, or a `data:` URL."""
    if value.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidInput(f"{field}: a data: URL must be base64 (data:<type>;base64,...)")
    text = "".join(value.split())
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            data = base64.urlsafe_b64decode(text)
        else:
            data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"{field} must be base64-encoded file bytes, a data: URL or an http(s) URL"
        ) from None
    if not data:
        raise InvalidInput(f"{field} is empty")
    return data


# Images


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding it; None when unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return None


def decode_image(data: bytes, field: str, max_pixels: int, mode: str = "RGB") -> Any:
    """A PIL image in `mode`, refused (400) when unreadable or larger than `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidInput(
            f"{field} is not a readable image (PNG, JPEG, WebP, GIF, BMP, TIFF are accepted)"
        ) from None
    except Image.DecompressionBombError:
        raise InvalidInput(f"{field}: the image has too many pixels") from None
    width, height = img.size
    if width * height > max_pixels:
        raise InvalidInput(
            f"{field}: the image is {width}x{height} = {width * height} pixels, more than this model's limit "
            f"of {max_pixels}"
        )
    try:
        img.load()
        if img.mode != mode:
            if mode == "RGB" and img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            img = img.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InvalidInput(f"{field} is a corrupt or truncated image ({type(err).__name__})") from None
    return img


def encode_image(image: Any, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return buf.getvalue()


def png_base64(image: Any) -> str:
    return base64.b64encode(encode_image(image, "png")).decode()


# Audio


@dataclass
class Audio:
    """Mono float32 samples at `sampling_rate`."""

    samples: Any  # numpy float32, 1-D
    sampling_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sampling_rate if self.sampling_rate else 0.0


def audio_seconds(data: bytes) -> float | None:
    """The duration from the file's header, without decoding it; None when unreadable."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        return None
    return info.frames / info.samplerate if info.samplerate and info.frames >= 0 else None


def decode_audio(data: bytes, field: str, max_seconds: float, sampling_rate: int | None = None) -> Audio:
    """Decoded, downmixed to mono, resampled to `sampling_rate` when given; 400 when unreadable or too long."""
    import numpy as np
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            if f.frames > 0 and f.frames / rate > max_seconds:
                raise InvalidInput(
                    f"{field}: the audio is {f.frames / rate:.1f} s long, more than this model's limit of "
                    f"{max_seconds:g} s"
                )
            samples = f.read(dtype="float32", always_2d=True)
    except InvalidInput:
        raise
    except Exception as err:  # libsndfile's errors (LibsndfileError, RuntimeError, TypeError) on bad bytes
        raise InvalidInput(
            f"{field} is not a readable audio file ({type(err).__name__}); accepted formats: {AUDIO_FORMATS}"
        ) from None
    if samples.shape[0] == 0:
        raise InvalidInput(f"{field}: the audio has no samples")
    if samples.shape[0] / rate < MIN_AUDIO_SECONDS:  # a speech model's first convolution needs 25 ms or so
        raise InvalidInput(
            f"{field}: the audio is {samples.shape[0] / rate * 1000:.1f} ms long, shorter than the "
            f"{MIN_AUDIO_SECONDS * 1000:g} ms an audio model needs"
        )
    if samples.shape[0] / rate > max_seconds:  # formats whose header does not tell the length
        raise InvalidInput(
            f"{field}: the audio is {samples.shape[0] / rate:.1f} s long, more than this model's limit of "
            f"{max_seconds:g} s"
        )
    mono = samples.mean(axis=1).astype(np.float32)
    if not np.isfinite(mono).all():
        raise InvalidInput(f"{field}: the audio has samples that are not finite numbers")
    if sampling_rate and rate != sampling_rate:
        mono = resample(mono, rate, sampling_rate)
        rate = sampling_rate
    return Audio(mono, rate)


def resample(samples: Any, from_rate: int, to_rate: int) -> Any:
    import numpy as np
    from scipy.signal import resample_poly

    g = math.gcd(from_rate, to_rate)
    return resample_poly(samples, to_rate // g, from_rate // g).astype(np.float32)


def audio_format(accept: str | None) -> tuple[str, str]:
    """(soundfile format, media type) of generated audio: FLAC (what the hosted service answers) unless the client
    asks for WAV, OGG or MP3."""
    accept = (accept or "").lower()
    for media_type, fmt in (
        ("audio/wav", "WAV"),
        ("audio/x-wav", "WAV"),
        ("audio/wave", "WAV"),
        ("audio/ogg", "OGG"),
        ("audio/mpeg", "MP3"),
        ("audio/flac", "FLAC"),
    ):
        if media_type in accept:
            return fmt, "audio/x-wav" if fmt == "WAV" else media_type
    return "FLAC", "audio/flac"


def encode_audio(samples: Any, sampling_rate: int, fmt: str = "FLAC") -> bytes:
    import numpy as np
    import soundfile as sf

    data = np.asarray(samples, dtype=np.float32).reshape(-1)
    data = np.clip(np.nan_to_num(data), -1.0, 1.0)
    buf = io.BytesIO()
    subtype = {"FLAC": "PCM_16", "WAV": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    sf.write(buf, data, int(sampling_rate), format=fmt, subtype=subtype)
    return buf.getvalue()
