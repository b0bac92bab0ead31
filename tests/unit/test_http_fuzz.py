"""Whatever a client sends, the answer is never a 500: generated bodies (any JSON value where a field is expected,
the known parameters with any value, raw bytes) on every model route, the OpenAI routes and the legacy ones, over
the real default models in process (their limits cut down, so that what is generated runs quickly).

A 5xx other than 503 (a model loading, overloaded) is a bug: the test prints the request that got it."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.catalog import load_catalog
from serving.config import Settings
from serving.http import create_app
from serving.ingress import IngressCore
from serving.inprocess import InProcessBackend

FLUX, LLM = "local/tiny-flux", "HuggingFaceTB/SmolLM2-135M-Instruct"
EMB, CLS = "sentence-transformers/all-MiniLM-L6-v2", "local/tiny-sentiment"
EXAMPLES = int(os.environ.get("HFI_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # the same examples every run in `make test`, so that a failure is reproducible, never a flake; a longer hunt
    # (HFI_FUZZ_EXAMPLES=2000) draws new ones
    derandomize="HFI_FUZZ_EXAMPLES" not in os.environ,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        [0, 1, -1, 2, 64, 0.5, "", " ", "a", "0", "64", "true", "null", "\x00", "🐱", "a" * 3000]
    )
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
# Values a client would send, near the edges (most bodies then get past parsing, and run), or anything at all.
plausible = (
    st.integers(min_value=0, max_value=4)
    | st.floats(min_value=0, max_value=1)
    | st.integers(min_value=-2, max_value=80)
    | st.floats(min_value=-1, max_value=3)
    | st.booleans()
    | st.text(max_size=12)
    | st.lists(st.text(max_size=8), max_size=3)
    | values
)
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
    LLM: [
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "do_sample",
        "seed",
        "stop",
        "return_full_text",
        "details",
        "decoder_input_details",
        "truncate",
        "typical_p",
        "watermark",
        "frequency_penalty",
        "stop_sequences",
        "best_of",
    ],
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
    work = tmp_path_factory.mktemp("fuzz")
    loaded = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "models": specs,
            "metering": {"database_url": f"sqlite:///{work / 'ledger.db'}", "spool_dir": str(work / "spool")},
        },
        env={},
    )
    models, _ = loaded.validated()
    core = IngressCore(loaded, InProcessBackend(models, loaded.load_options(), torch_threads=1))
    with TestClient(create_app(core), raise_server_exceptions=False) as c:
        yield c
    core.metering.close()


def check(client: TestClient, path: str, body: Any = None, raw: bytes | None = None, **headers: str) -> None:
    content = raw if raw is not None else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json", **headers})
    assert r.status_code < 500 or r.status_code == 503, (
        f"{r.status_code} for POST {path} {content[:500]!r}: {r.text[:500]}"
    )
    if r.status_code >= 400:
        error = r.json()  # errors are JSON with one string
        assert isinstance(error.get("error"), str) and error["error"], r.text


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


header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.strip)


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
    body = {"inputs": "a cat"} if "chat" not in path else {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}  # fmt: skip
    check(client, path, body, **headers)


# Tokens mode: the billing and admin API, with an operator's token, a user's, or anything in Authorization.

ADMIN_CALLS = [
    ("POST", "/admin/users", {"name": "text", "tier": "text", "admin": "bool"}),
    ("PUT", "/admin/users/{name}/tier", {"tier": "text"}),
    ("POST", "/admin/users/{name}/tokens", {"label": "text"}),
    ("DELETE", "/admin/tokens/{name}", None),
    ("POST", "/admin/orgs", {"name": "text", "seats": "int", "enterprise": "bool", "plan": "text",
                             "spending_limit_nanousd": "int"}),
    ("PUT", "/admin/orgs/{name}/plan", {"plan": "text", "seats": "int"}),
    ("PUT", "/admin/orgs/{name}/members/{user}", {"admin": "bool"}),
    ("DELETE", "/admin/orgs/{name}/members/{user}", None),
    ("PUT", "/admin/accounts/{name}/spending-limit", {"spending_limit_nanousd": "int"}),
    ("PUT", "/admin/orgs/{name}/disabled-models/{user}", None),
    ("DELETE", "/admin/orgs/{name}/disabled-models/{user}", None),
]  # fmt: skip
KINDS = {
    "text": st.sampled_from(["una", "acme", "pro", "free", "team", "enterprise", ""]) | st.text(max_size=20),
    "int": st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]) | st.integers(),
    "bool": st.booleans(),
}
names = st.sampled_from(["una", "acme", "root", "nobody"]) | st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="/?#%"), min_size=1, max_size=12
)  # fmt: skip


@pytest.fixture(scope="module")
def tokens(model_store, tmp_path_factory):
    """The tiny classifier in tokens mode over HTTP: (base URL, the operator's token, a user's token)."""
    from fixtures.inprocess import tokens_mode_sentiment

    with tokens_mode_sentiment(model_store, tmp_path_factory.mktemp("fuzz-tokens")) as (base, core):
        accounts = core.billing.accounts
        accounts.create_user("root", "pro", is_admin=True)
        accounts.create_user("una", "pro")
        accounts.create_org("acme", seats=2)
        accounts.add_member("acme", "una", admin=True)
        yield base, accounts.issue_token("root").token, accounts.issue_token("una").token


def answered(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500 or r.status_code == 503, f"{r.status_code} for {what}: {r.text[:500]}"
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert isinstance(r.json().get("error"), str), r.text


@FUZZ
@given(
    call=st.sampled_from(ADMIN_CALLS),
    name=names,
    user=names,
    data=st.data(),
    who=st.sampled_from(["root", "una", "none", "junk"]),
)
def test_the_admin_api_answers_any_call_without_a_500(tokens, call, name, user, data, who):
    base, root, una = tokens
    method, template, fields = call
    path = template.format(name=quote(name, safe=""), user=quote(user, safe=""))
    body = None
    if fields is not None:
        body = data.draw(
            st.fixed_dictionaries({}, optional={f: KINDS[k] | values for f, k in fields.items()}) | values,
            label="body",
        )
    auth = {"root": f"Bearer {root}", "una": f"Bearer {una}", "none": None, "junk": data.draw(header_text)}[
        who
    ]
    headers = {"authorization": auth} if auth is not None else {}
    r = httpx.request(method, base + path, json=body, headers=headers, timeout=60)
    answered(r, f"{method} {path} {body!r} as {who}")


@FUZZ
@given(
    path=st.sampled_from(["/billing/usage", "/billing/account", "/billing/chart.svg", "/billing/me", "/admin/status",
                          "/admin/accounts", "/usage"]),
    query=st.dictionaries(st.sampled_from(["account", "month", "format", "limit", "cursor", "name", "since"]),
                          st.sampled_from(["2026-12", "2026-13", "0000-01", "9999-12", "una", "acme", "csv", "-1",
                                           "10001", "abc"]) | st.text(max_size=20), max_size=3),
    who=st.sampled_from(["root", "una", "none"]),
)  # fmt: skip
def test_the_billing_pages_answer_any_query_without_a_500(tokens, path, query, who):
    base, root, una = tokens
    headers = {"authorization": f"Bearer {root if who == 'root' else una}"} if who != "none" else {}
    r = httpx.get(base + path, params=query, headers=headers, timeout=60)
    answered(r, f"GET {path} {query!r} as {who}")


@FUZZ
@given(
    auth=header_text | st.just("Bearer") | header_text.map(lambda t: f"Bearer {t}".strip()),
    bill_to=st.none() | st.sampled_from(["acme", "una", "nobody"]) | header_text,
    real_token=st.booleans(),
)
def test_inference_with_any_credentials_gets_a_clear_answer(tokens, auth, bill_to, real_token):
    base, _, una = tokens
    headers = {"authorization": f"Bearer {una}" if real_token else auth}
    if bill_to is not None:
        headers["x-hf-bill-to"] = bill_to
    r = httpx.post(f"{base}/models/{CLS}", json={"inputs": "fine"}, headers=headers, timeout=60)
    answered(r, f"POST /models/{CLS} with {headers!r}")
