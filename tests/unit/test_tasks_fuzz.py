"""Every other task of models/catalog/all-tasks.yaml (question answering to speech), fuzzed from a valid request:
each example starts from the task's own warm-up body (one that runs), then replaces a field with any value,
drops one, adds a parameter, or swaps its image or audio for broken media (random bytes, a truncated file, a
header that claims 100,000 x 100,000 pixels), as JSON or as the raw body. Whatever comes out, the answer is never
a 500. The real tiny models in process, their limits cut down so that what is generated runs quickly."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from fixtures.fuzz import FUZZ, assert_answered, inprocess_settings, plausible
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from models.catalog import load_catalog
from serving.http import create_app
from serving.ingress import IngressCore
from serving.inprocess import InProcessBackend
from serving.warmup import warmup_body

DEFAULTS = {m.id for m in load_catalog().models}  # fuzzed in test_http_fuzz.py
MODELS = [m for m in load_catalog("all-tasks").models if m.id not in DEFAULTS]
TABULAR = {
    "local/tiny-wine-quality": {"inputs": {"data": {"fixed_acidity": ["7.4"], "volatile_acidity": ["0.7"],
                                                    "citric_acid": ["0"], "residual_sugar": ["1.9"],
                                                    "alcohol": ["9.4"]}}},
    "local/tiny-fish-weight": {"inputs": {"data": {"Species": ["Bream"], "Length1": ["23.2"], "Length2": ["25.4"],
                                                   "Height": ["11.52"], "Width": ["4.02"]}}},
}  # fmt: skip
PARAMETERS = ["top_k", "threshold", "candidate_labels", "multi_label", "max_new_tokens", "num_inference_steps",
              "guidance_scale", "strength", "target_size", "handle_impossible_answer", "max_answer_len",
              "aggregation_strategy", "ignore_labels", "src_lang", "tgt_lang", "truncation", "hypothesis_template",
              "return_timestamps", "function_to_apply", "mask_threshold", "overlap_mask_area_threshold",
              "subtask", "targets", "padding", "sequential", "seed", "word_boxes", "doc_stride", "lang"]  # fmt: skip


def _png(width: int = 32, height: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype("uint8")).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def _wav(seconds: float = 0.5) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32"), 16000, format="WAV")
    return buffer.getvalue()


def _huge_png() -> bytes:
    """A PNG whose header claims 100,000 x 100,000 pixels (a decompression bomb), with one row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


PNG, WAV = _png(), _wav()
broken_media = st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", PNG[: len(PNG) // 2], WAV[:60], WAV[: len(WAV) // 3],
                                _huge_png(), b"RIFF\x00\x00\x00\x00WAVEfmt ", b"GIF89a", b"%PDF-1.4"]) | st.binary(
    max_size=300)  # fmt: skip


@pytest.fixture(scope="module")
def fuzzed(model_store, tmp_path_factory):
    """(TestClient, each model's valid body) for the tasks' tiny models."""
    specs = []
    for spec in MODELS:
        data = spec.model_dump(mode="json", exclude_none=True)
        data.pop("pool", None)
        limits = {"max_new_tokens": 3, "max_pixels": 64 * 64, "max_steps": 2, "max_audio_seconds": 2.0,
                  "max_input_pixels": 256 * 256, "max_input_chars": 2000, "max_table_cells": 200}  # fmt: skip
        data["limits"] = {**data.get("limits", {}), **limits}
        specs.append(data)
    loaded = inprocess_settings(model_store, tmp_path_factory.mktemp("tasks-fuzz"), specs)
    catalog, _ = loaded.validated()
    backend = InProcessBackend(catalog, loaded.load_options(), torch_threads=1)
    bodies = {
        m.id: TABULAR.get(m.id) or warmup_body(m.task, backend.executors[m.id].runner) for m in catalog.models
    }
    core = IngressCore(loaded, backend)
    with TestClient(create_app(core), raise_server_exceptions=False) as client:
        yield client, bodies
    core.metering.close()


def _paths(node: Any, at: tuple = ()) -> list[tuple]:
    """Every place in a JSON value: keys and indexes from the root."""
    found = [at]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*at, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*at, index))
    return found


def _set(node: Any, at: tuple, value: Any, drop: bool = False) -> Any:
    if not at:
        return value
    parent = node
    for key in at[:-1]:
        parent = parent[key]
    if drop:
        del parent[at[-1]]
    else:
        parent[at[-1]] = value
    return node


def _is_media(value: Any) -> bool:
    return isinstance(value, str) and len(value) > 100 and value[:4] in ("iVBO", "UklG")  # base64 PNG, WAV


@pytest.mark.parametrize("model", [m.id for m in MODELS])
@FUZZ
@given(data=st.data())
def test_any_change_to_a_valid_request_gets_an_answer_never_a_500(fuzzed, model, data):
    client, bodies = fuzzed
    body = json.loads(json.dumps(bodies[model]))
    places = _paths(body)
    media = [p for p in places if _is_media(_get(body, p))]
    how = data.draw(st.sampled_from(["replace", "drop", "parameter", "media", "raw"]), label="how")
    raw: bytes | None = None
    if how == "replace":
        body = _set(body, data.draw(st.sampled_from(places), label="at"), data.draw(plausible, label="value"))
    elif how == "drop" and len(places) > 1:
        body = _set(body, data.draw(st.sampled_from(places[1:]), label="at"), None, drop=True)
    elif how == "parameter":
        if not isinstance(body.get("parameters"), dict):
            body["parameters"] = {}
        body["parameters"][data.draw(st.sampled_from(PARAMETERS), label="name")] = data.draw(
            plausible, label="v"
        )
    elif how == "media" and media:
        broken = base64.b64encode(data.draw(broken_media, label="media")).decode()
        body = _set(body, data.draw(st.sampled_from(media), label="at"), broken)
    elif how == "raw":
        raw = data.draw(broken_media, label="raw body")
    content = raw if raw is not None else json.dumps(body).encode()
    kind = data.draw(
        st.sampled_from(["application/json", "image/png", "audio/wav", "application/octet-stream"])
    )
    r = client.post(f"/models/{model}", content=content, headers={"content-type": kind})
    assert_answered(r, f"{model} {content[:300]!r}")


def _get(node: Any, at: tuple) -> Any:
    for key in at:
        node = node[key]
    return node


def test_the_seeds_are_valid_requests(fuzzed):
    """Each model's starting body runs (else the fuzz would only ever test refusals)."""
    client, bodies = fuzzed
    for model, body in bodies.items():
        assert body is not None, model
        r = client.post(f"/models/{model}", json=body)
        assert r.status_code == 200, f"{model}: {r.text[:300]}"
