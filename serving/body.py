"""The one place a request body becomes what the routes parse: JSON, or a media file's raw bytes.

Image and audio tasks take the file itself as the body (the Python client sends raw bytes with no
Content-Type; the JS client sends its Blob's type, often none), or JSON with the file as base64. Everything
else is JSON. Bodies with no Content-Type (or application/octet-stream) are sniffed: JSON when they parse as
JSON, else raw bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from models.errors import InvalidInput

_MEDIA_PREFIXES = ("image/", "audio/", "video/")
_SNIFFED = ("", "application/octet-stream", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class RawBody:
    """A body that is a file, not JSON: its bytes and its declared media type (None when not declared)."""

    content: bytes
    content_type: str | None

    @property
    def family(self) -> str | None:
        """`image`, `audio`, `video`, or None when the type does not say."""
        if self.content_type and self.content_type.startswith(_MEDIA_PREFIXES):
            return self.content_type.split("/", 1)[0]
        return None


def media_type(header: str | None) -> str:
    """The bare media type of a Content-Type header, lower case (`image/png; q=1` -> `image/png`)."""
    return (header or "").split(";", 1)[0].strip().lower()


def _json(raw: bytes, kind: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        if kind not in ("application/json", "text/plain") and not kind.endswith("+json"):
            raise InvalidInput(
                f"Content-Type {kind} is not accepted: send JSON (application/json), or an image or audio "
                "file with its media type (image/..., audio/...)"
            ) from None
        if kind == "text/plain" and not _looks_like_json(raw):
            raise InvalidInput(
                "the request body is not JSON (Content-Type text/plain): send JSON, or an image or audio file "
                "with its media type (image/..., audio/...)"
            ) from None
        raise InvalidInput(f"the request body is not valid JSON: {err}") from None


def _looks_like_json(raw: bytes) -> bool:
    head = raw.lstrip()[:1]
    return head in (b"{", b"[", b'"')


def decode_body(raw: bytes, content_type: str | None) -> Any:
    """Parsed JSON, or a RawBody for a media file (400 for an empty body or JSON that does not parse)."""
    kind = media_type(content_type)
    if not raw.strip():
        raise InvalidInput("the request body is empty: send JSON with inputs, or the file's bytes")
    if kind.startswith(_MEDIA_PREFIXES):
        return RawBody(raw, kind)
    if kind in _SNIFFED:
        # curl --data-binary @file sends application/x-www-form-urlencoded; a JSON body may come with no type.
        if _looks_like_json(raw):
            try:
                return json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                if kind == "application/x-www-form-urlencoded":
                    raise InvalidInput("the request body is not valid JSON") from None
        return RawBody(raw, None if kind != "application/octet-stream" else kind)
    # application/json, text/plain (curl -d), anything else: JSON as before.
    return _json(raw, kind)
