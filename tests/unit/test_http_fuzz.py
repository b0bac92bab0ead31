"""Whatever a client sends, the answer is never a 500: generated bodies (any JSON value where a field is expected,
the known parameters with any value, raw bytes) on every model route, the OpenAI routes and the legacy ones, over
the real default models in process (their limits cut down, so that what is generated runs quickly).

A 5xx other than 503 (a model loading, overloaded) is a bug: the test prints the request that got it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fixtures.fuzz import FUZZ, assert_answered, header_text, inprocess_settings, plausible, scalars, values
from hypothesis import given
from hypothesis import strategies as st

from models.catalog import load_catalog
from serving.http import create_app
from serving.ingress import IngressCore
from serving.inprocess import InProcessBackend
from serving.routes.generation import _PARAMS, _TGI_UNSUPPORTED

FLUX, LLM = "local/tiny-flux", "HuggingFaceTB/SmolLM2-135M-Instruct"
EMB, CLS = "sentence-transformers/all-MiniLM-L6-v2", "local/tiny-sentiment"
schemas = st.recursive(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array"])},
        optional={
            "enum": st.lists(scalars, max_size=3),
            "minLength": plausible,
            "pattern": st.text(max_size=6),
        },
    )
    | values,
    lambda inner: (
        st.fixed_dictionaries(
            {
                "type": st.just("object"),
                "properties": st.dictionaries(st.text(max_size=6), inner, max_size=3),
            },
            optional={
                "required": st.lists(st.text(max_size=6), max_size=2),
                "additionalProperties": st.booleans(),
            },
        )
        | st.fixed_dictionaries({"type": st.just("array"), "items": inner}, optional={"maxItems": plausible})
        | st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)})
    ),
    max_leaves=6,
)
CHAT_VALUES = {
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["json_object", "json_schema", "text", "regex", "grammar"]) | values},
        optional={
            "json_schema": st.fixed_dictionaries({"name": st.text(max_size=6), "schema": schemas}) | values,
            "value": schemas | values,
            "schema": schemas,
        },
    )
    | values,
    "tools": st.lists(
        st.fixed_dictionaries(
            {
                "type": st.just("function") | values,
                "function": st.fixed_dictionaries(
                    {"name": st.text(max_size=8) | values},
                    optional={"parameters": schemas, "description": values},
                )
                | values,
            },
        )
        | values,
        max_size=2,
    )
    | values,
    "tool_choice": st.sampled_from(["auto", "none", "required"])
    | st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": values})}
    )
    | values,
    "stop": st.lists(st.text(max_size=4), max_size=3) | plausible,
    "logit_bias": st.dictionaries(st.text(max_size=4), plausible, max_size=3) | values,
}

# Names the routes know, so that values reach the code that reads them (unknown ones are ignored).
PARAMETERS = {
    FLUX: [
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "negative_prompt",
        "scheduler",
    ],
    LLM: [*_PARAMS, *_TGI_UNSUPPORTED],  # what the generation route reads, and what it refuses
    EMB: ["normalize", "truncate", "prompt_name", "truncation_direction", "dimensions"],
    CLS: ["top_k", "function_to_apply", "truncation"],
}
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
               "stream", "stream_options", "tools", "tool_choice", "response_format", "logprobs", "top_logprobs",
               "frequency_penalty", "presence_penalty", "n", "logit_bias", "user"]  # fmt: skip
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "echo",
                     "logprobs", "n", "suffix", "frequency_penalty", "presence_penalty"]  # fmt: skip


def parameters(model: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(PARAMETERS[model]), plausible, max_size=4)


text_parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]) | values, "text": st.text(max_size=12)}
    ),
    max_size=2,
)
messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "other"]) | values},
            optional={
                "content": st.text(max_size=30) | text_parts | values,
                "name": values,
                "tool_calls": values,
                "tool_call_id": values,
            },
        )
        | values,
        min_size=1,
        max_size=3,
    )
    | values
)


@pytest.fixture(scope="module")
def client(model_store, tmp_path_factory):
    """The four default models with limits that keep generated requests short."""
    catalog = load_catalog()
    cut = {
        FLUX: {"max_pixels": 64 * 64, "max_steps": 2},
        LLM: {"max_new_tokens": 3, "max_input_chars": 2000},
        EMB: {"max_batch_inputs": 4, "max_input_chars": 2000},
        CLS: {"max_batch_inputs": 4, "max_input_chars": 2000},
    }
    specs = []
    for spec in catalog.models:
        data = spec.model_dump(mode="json", exclude_none=True)
        data["limits"] = {**data.get("limits", {}), **cut[spec.id]}
        specs.append(data)
    loaded = inprocess_settings(model_store, tmp_path_factory.mktemp("fuzz"), specs)
    models, _ = loaded.validated()
    core = IngressCore(loaded, InProcessBackend(models, loaded.load_options(), torch_threads=1))
    with TestClient(create_app(core), raise_server_exceptions=False) as c:
        yield c
    core.metering.close()


def check(client: TestClient, path: str, body: Any = None, raw: bytes | None = None, **headers: str) -> None:
    content = raw if raw is not None else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json", **headers})
    assert_answered(r, f"POST {path} {content[:500]!r}")


@pytest.mark.parametrize("model", [FLUX, LLM, EMB, CLS])
@FUZZ
@given(data=st.data())
def test_a_models_own_route_answers_any_body_without_a_500(client, model, data):
    body = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "inputs": values | st.text(max_size=40),
                "parameters": parameters(model) | values,
                "options": values,
                "stream": values,
            },
        )
        | values,
        label="body",
    )
    if model == EMB and isinstance(body, dict):  # feature-extraction's parameters sit at the root
        body.update(data.draw(parameters(EMB), label="root parameters"))
    check(client, f"/models/{model}", body)


@pytest.mark.parametrize(
    "path",
    [
        f"/models/{EMB}/pipeline/feature-extraction",
        f"/models/{EMB}/pipeline/sentence-similarity",
        f"/pipeline/feature-extraction/{EMB}",
        f"/models/{CLS}/pipeline/text-classification",
        f"/models/{CLS}/pipeline/no-such-task",
    ],
)
@FUZZ
@given(
    inputs=st.text(max_size=20)
    | st.lists(st.text(max_size=10), max_size=3)
    | st.fixed_dictionaries({}, optional={"source_sentence": st.text(max_size=10) | values,
                                          "sentences": st.lists(st.text(max_size=10), max_size=3) | values})
    | values,
    extra=st.dictionaries(st.sampled_from(["source_sentence", "sentences", "parameters", "normalize", "truncate",
                                           "prompt_name", "dimensions"]), plausible, max_size=3),
)  # fmt: skip
def test_the_pipeline_routes_answer_any_body_without_a_500(client, path, inputs, extra):
    check(client, path, {"inputs": inputs, **extra})


def some_fields(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Up to three of `fields`, each with a value a client would send or anything (so that most bodies have at
    most one bad field, and get past parsing)."""
    field = st.sampled_from(fields).flatmap(lambda f: st.tuples(st.just(f), CHAT_VALUES.get(f, plausible)))
    return st.lists(field, max_size=3).map(dict)


good_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant"]),
            "content": st.text(max_size=30) | text_parts,
        }
    ),
    min_size=1,
    max_size=3,
)


@pytest.mark.parametrize("path", ["/v1/chat/completions", f"/models/{LLM}/v1/chat/completions"])
@FUZZ
@given(messages=good_messages | messages, fields=some_fields([f for f in CHAT_FIELDS if f != "messages"]))
def test_chat_answers_any_body_without_a_500(client, path, messages, fields):
    body = {"messages": messages, **fields}
    if path.startswith("/v1/") and (not isinstance(body.get("model"), str) or len(body) % 2):
        body["model"] = LLM  # else the model's name, fuzzed too
    for cap in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(cap), int):
            body[cap] = min(body[cap], 3)
    check(client, path, body)


@pytest.mark.parametrize("path", ["/v1/completions", f"/models/{LLM}/v1/completions"])
@FUZZ
@given(
    prompt=st.text(max_size=30) | values, fields=some_fields([f for f in COMPLETION_FIELDS if f != "prompt"])
)
def test_completions_answer_any_body_without_a_500(client, path, prompt, fields):
    body = {"prompt": prompt, **fields}
    if path.startswith("/v1/") and (not isinstance(body.get("model"), str) or len(body) % 2):
        body["model"] = LLM  # else the model's name, fuzzed too
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 3)
    check(client, path, body)


@pytest.mark.parametrize(
    "path",
    [
        f"/models/{CLS}",
        f"/models/{FLUX}",
        "/v1/chat/completions",
        "/v1/completions",
        f"/pipeline/feature-extraction/{EMB}",
    ],
)
@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_any_bytes_get_a_clear_error_never_a_500(client, path, raw):
    check(client, path, raw=raw)


@pytest.mark.parametrize("path", [f"/models/{CLS}", f"/models/{FLUX}", "/v1/chat/completions"])
@FUZZ
@given(
    headers=st.dictionaries(
        st.sampled_from(["accept", "content-type", "x-wait-for-model", "x-use-cache", "x-request-id",
                         "x-amzn-trace-id", "x-hf-bill-to", "authorization", "user-agent", "accept-encoding"]),
        header_text | st.sampled_from(["true", "false", "1", "image/png", "*/*", "text/event-stream", "Bearer x"]),
        max_size=4,
    )
)  # fmt: skip
def test_any_header_values_get_an_answer_never_a_500(client, path, headers):
    body = {"inputs": "a cat"} if "chat" not in path else {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}  # fmt: skip
    check(client, path, body, **headers)
