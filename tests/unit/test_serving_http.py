"""The HTTP layer (routes, bodies, headers, errors) over the real default models in process, without Ray."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from serving.http import create_app, split_model_path
from serving.ingress import IngressCore

FLUX = "/models/local/tiny-flux"
LLM = "/models/HuggingFaceTB/SmolLM2-135M-Instruct"
EMB = "/models/sentence-transformers/all-MiniLM-L6-v2"
CLS = "/models/local/tiny-sentiment"


@pytest.fixture(scope="module")
def client(default_settings, inprocess_backend):
    core = IngressCore(default_settings, inprocess_backend)
    with TestClient(create_app(core), raise_server_exceptions=False) as c:
        yield c
    core.metering.close()


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("local/tiny-flux", ("local/tiny-flux", None)),
        ("org/name/pipeline/feature-extraction", ("org/name", "feature-extraction")),
        ("org/name/v1/chat/completions", ("org/name", "chat-completion")),
        ("org/name/v1/completions", ("org/name", "completion")),
        ("gpt2", ("gpt2", None)),
    ],
)
def test_split_model_path(path, expected):
    assert split_model_path(path) == expected


def test_text_to_image_png_with_headers(client):
    r = client.post(
        FLUX, json={"inputs": "a cat", "parameters": {"seed": 3}}, headers={"accept": "image/png"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.headers["x-compute-type"] == "cpu-basic"
    assert float(r.headers["x-compute-time"]) >= 0 and len(r.headers["x-compute-time"].split(".")[1]) == 3
    assert r.headers["x-compute-characters"] == "5"
    assert len(r.headers["x-sha"]) == 40 and r.headers["inference-id"] and r.headers["x-request-id"]
    assert "x-compute-time" in r.headers["access-control-expose-headers"]  # set on every response, as hosted
    r2 = client.post(FLUX, json={"inputs": "a cat", "parameters": {"seed": 3}}, headers={"accept": "*/*"})
    assert r2.headers["content-type"] == "image/jpeg"


def test_client_request_id_is_reused(client):
    r = client.post(CLS, json={"inputs": "hi"}, headers={"x-request-id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1" and r.headers["inference-id"] != "my-id-1"


def test_a_proxy_made_request_id_is_not_the_clients_and_the_trace_id_is_reused(client):
    """Behind HAProxy every request has an x-request-id: hfi-haproxy marks the ones it made up, so the caller's
    X-Amzn-Trace-Id is the id (as the wire contract says) and a made-up id is never recorded as the client's."""
    marked = {"x-request-id": "made-up-by-the-proxy", "x-hfi-generated-request-id": "1"}
    r = client.post(CLS, json={"inputs": "hi"}, headers={**marked, "x-amzn-trace-id": "Root=1-abc-def"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "Root=1-abc-def"
    r = client.post(CLS, json={"inputs": "hi"}, headers=marked)
    assert r.headers["x-request-id"] == r.headers["inference-id"]  # no client id: our own
    r = client.post(
        CLS, json={"inputs": "hi"}, headers={"x-request-id": "mine", "x-amzn-trace-id": "Root=1-x"}
    )
    assert r.headers["x-request-id"] == "mine"


@pytest.mark.parametrize("header", ["x-request-id", "x-amzn-trace-id"])
def test_an_over_long_client_request_id_is_a_400_naming_the_header(client, header):
    """The id is stored with the charge (256 characters at most): a longer one is refused before any compute."""
    r = client.post(CLS, json={"inputs": "hi"}, headers={header: "x" * 257})
    assert r.status_code == 400, r.text
    assert header in r.json()["error"] and "256" in r.json()["error"]
    assert (
        "inference-id" not in r.headers
    )  # refused before a request id was made: nothing ran, nothing charged
    ok = client.post(CLS, json={"inputs": "hi"}, headers={header: "y" * 256})
    assert ok.status_code == 200, ok.text


def test_cors_exposes_the_compute_headers(client):
    r = client.post(CLS, json={"inputs": "hi"}, headers={"origin": "http://example.test"})
    exposed = r.headers["access-control-expose-headers"]
    assert "x-compute-time" in exposed and "x-compute-type" in exposed


def test_hf_inference_prefix_and_legacy_pipeline_route(client):
    a = client.post("/hf-inference" + CLS, json={"inputs": "hi"})
    b = client.post("/pipeline/text-classification/local/tiny-sentiment", json={"inputs": "hi"})
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()


def test_feature_extraction_and_similarity_on_one_url(client):
    r = client.post(EMB, json={"inputs": "hello", "normalize": True})
    assert r.status_code == 200 and len(r.json()) == 384
    r = client.post(EMB, json={"inputs": ["a", "b"]})
    assert len(r.json()) == 2
    r = client.post(
        EMB, json={"inputs": {"source_sentence": "a cat", "sentences": ["a cat", "a car"]}, "parameters": {}}
    )
    assert r.status_code == 200 and r.json()[0] == pytest.approx(1.0, abs=1e-4)
    r = client.post(EMB + "/pipeline/sentence-similarity", json={"source_sentence": "x", "sentences": ["x"]})
    assert r.status_code == 200 and len(r.json()) == 1


def test_text_classification_nested(client):
    r = client.post(CLS, json={"inputs": "I love it", "parameters": {"top_k": 1}})
    body = r.json()
    assert isinstance(body, list) and isinstance(body[0], list) and len(body[0]) == 1


def test_text_generation_details(client):
    r = client.post(
        LLM,
        json={
            "inputs": "The capital of France is",
            "parameters": {"max_new_tokens": 5, "details": True, "return_full_text": True},
        },
    )
    out = r.json()[0]
    assert out["generated_text"].startswith("The capital of France is")
    assert out["details"]["generated_tokens"] == len(out["details"]["tokens"]) <= 5
    assert r.headers["x-generated-tokens"] == str(out["details"]["generated_tokens"])


def test_text_generation_stream_tgi_events(client):
    r = client.post(
        LLM, json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6}, "stream": True}
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(e) for e in sse_events(r.text)]
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 6
    assert "".join(e["token"]["text"] for e in events) == last["generated_text"]


def test_chat_completion_and_stream(client):
    body = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
    }
    r = client.post("/v1/chat/completions", json=body)
    out = r.json()
    assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] <= 6
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    r = client.post(
        LLM + "/v1/chat/completions",
        json={**body, "model": "dummy", "stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text and chunks[-1]["usage"]["total_tokens"] > 0


def test_completions(client):
    r = client.post(
        "/v1/completions",
        json={
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct:hf-inference",
            "prompt": "1, 2, 3,",
            "max_tokens": 4,
            "echo": True,
        },
    )
    out = r.json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"].startswith("1, 2, 3,")


def test_v1_models_health_info(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "local/tiny-flux" in ids and len(ids) == 4
    assert client.get("/health").json()["status"] == "ok"
    info = client.get(FLUX + "/info").json()
    assert info["task"] == "text-to-image" and info["hardware_profile"] == "cpu-basic" and info["sha"]
    assert client.get(FLUX + "/health").status_code == 200
    hub = client.get("/api/models/local/tiny-flux").json()
    assert hub["pipeline_tag"] == "text-to-image"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "match"),
    [
        ("post", "/models/nope/nothing", {"json": {"inputs": "x"}}, 404, "Model nope/nothing does not exist"),
        ("get", "/models/nope/nothing/info", {}, 404, "does not exist"),
        ("post", FLUX, {"json": {"inputs": "a", "parameters": {"width": 65}}}, 400, "parameters.width"),
        (
            "post",
            FLUX,
            {"json": {"inputs": "a", "parameters": {"num_inference_steps": 51}}},
            400,
            "num_inference_steps",
        ),
        ("post", FLUX, {"json": {"parameters": {}}}, 400, "inputs is required"),
        ("post", FLUX, {"content": b"not json"}, 400, "not valid JSON"),
        ("post", FLUX, {"content": b""}, 400, "empty"),
        ("post", FLUX, {"json": ["a list"]}, 400, "JSON object"),
        ("post", FLUX, {"json": {"inputs": "a", "parameters": "x"}}, 400, "parameters"),
        ("post", CLS, {"json": {"inputs": ""}}, 400, "inputs"),
        ("post", CLS + "/pipeline/text-to-image", {"json": {"inputs": "x"}}, 400, "not served"),
        (
            "post",
            "/v1/chat/completions",
            {"json": {"messages": [{"role": "user", "content": "x"}]}},
            422,
            "model",
        ),
        (
            "post",
            "/v1/chat/completions",
            {"json": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
            422,
            "messages",
        ),
        (
            "post",
            "/v1/chat/completions",
            {
                "json": {
                    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": "x"}],
                    "temperature": "hot",
                }
            },
            422,
            "temperature",
        ),
        (
            "post",
            "/v1/chat/completions",
            {"json": {"model": "no/model", "messages": []}},
            404,
            "does not exist",
        ),
        (
            "post",
            LLM,
            {"json": {"inputs": "hi", "parameters": {"max_new_tokens": 10**6}}},
            400,
            "max_new_tokens",
        ),
    ],
)
def test_errors(client, method, path, kwargs, status, match):
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert match in r.json()["error"]


def test_body_too_large_is_413(client, default_settings):
    big = b'{"inputs": "' + b"x" * (default_settings.max_body_bytes + 10) + b'"}'
    r = client.post(CLS, content=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_unknown_parameters_and_root_keys_are_ignored(client):
    r = client.post(CLS, json={"inputs": "x", "parameters": {"wat": 1}, "options": {"wait_for_model": True}})
    assert r.status_code == 200


def test_response_json_is_compact_utf8_and_falls_back_for_what_orjson_refuses():
    import json

    from serving.routes.base import dumps, sse

    values = [0.1, -3.382777867955156e-05, 1e16, 2.5]
    assert json.loads(dumps(values)) == values  # every float keeps its value
    assert dumps({"label": "été", "n": None}) == '{"label":"été","n":null}'.encode()
    assert json.loads(dumps({1: "a"})) == {"1": "a"}  # a non-string key: through the json module
    assert json.loads(dumps([2**70])) == [2**70]  # past 64 bits: the same
    assert sse({"a": 1}) == b'data: {"a":1}\n\n' and sse("[DONE]") == b"data: [DONE]\n\n"


def test_a_model_application_has_the_model_routes_and_serves_them(default_settings, inprocess_backend):
    """A model's own application (model_routes_only) answers its model's routes and health, and has none of the
    router's: Serve's per-request route-name scan then walks a handful of routes, not every router's."""
    from ray.serve._private.thirdparty.get_asgi_route_name import get_asgi_route_name

    core = IngressCore(default_settings, inprocess_backend)
    app = create_app(core, model_routes_only=True)
    paths = {getattr(r, "path", None) for r in app.routes}
    assert {"/models/{path:path}", "/health"} <= paths
    assert not paths & {"/billing", "/v1/models", "/v1/chat/completions", "/admin/status", "/billing/usage"}
    assert all(
        getattr(r, "path", None) for r in app.routes
    )  # no included router (accounts, usage, billing...)
    # what Serve asks for each request of the application at /models/local/tiny-sentiment: nothing matches
    prefix = "/models/local/tiny-sentiment"
    scope = {"type": "http", "path": prefix, "root_path": prefix, "method": "POST", "headers": []}
    assert get_asgi_route_name(app, scope) is None
    with TestClient(app) as c:
        r = c.post(prefix, json={"inputs": "I love it"})
        assert r.status_code == 200 and r.json()[0][0]["label"]  # one list of labels per input
        assert c.get(prefix + "/health").json() == {"status": "ok", "model": "local/tiny-sentiment"}
        assert c.get("/v1/models").status_code == 404


def test_inference_posts_skip_the_router_and_answer_as_it_would(
    default_settings, inprocess_backend, monkeypatch
):
    """`POST /models/...` is answered by ModelPosts, inside the guard, without the router: the same answers as the
    router's route gives, errors included (each case also through an app without ModelPosts)."""
    from serving.http import ModelPosts

    core = IngressCore(default_settings, inprocess_backend)
    fast = create_app(core)
    routed = create_app(core)
    routed.user_middleware = [m for m in routed.user_middleware if m.cls is not ModelPosts]
    assert [m.cls for m in fast.user_middleware].index(ModelPosts) == len(
        fast.user_middleware
    ) - 1  # innermost

    reached: list[str] = []
    route = next(
        r for r in fast.routes if getattr(r, "path", None) == "/models/{path:path}" and "POST" in r.methods
    )
    real = route.app

    async def counting(scope, receive, send):
        reached.append(scope["path"])
        await real(scope, receive, send)

    monkeypatch.setattr(route, "app", counting)

    def boom(*a, **k):
        raise RuntimeError("a bug")

    cases = [
        (CLS, {"json": {"inputs": "I love it"}}),
        ("/models/org/unknown", {"json": {"inputs": "x"}}),  # 404
        (CLS, {"content": b"{not json", "headers": {"content-type": "application/json"}}),  # 400
        (CLS, {"json": {"inputs": 3}}),  # 422
        (CLS, {"json": {"inputs": "x", "parameters": {"top_k": "many"}}}),  # 422 from the adapter
        (CLS + "/pipeline/text-to-image", {"json": {"inputs": "x"}}),  # a task the model does not serve
        (CLS, {"content": b"x" * (default_settings.max_body_bytes + 1)}),  # 413 (the guard's)
    ]
    with (
        TestClient(fast, raise_server_exceptions=False) as a,
        TestClient(routed, raise_server_exceptions=False) as b,
    ):
        for path, kwargs in cases:
            ra, rb = a.post(path, **kwargs), b.post(path, **kwargs)
            assert ra.status_code == rb.status_code, (path, ra.text, rb.text)
            if ra.status_code != 200:
                assert ra.json() == rb.json(), path
            drop = {
                "inference-id",
                "x-request-id",
                "date",
                "x-compute-time",
                "x-inference-time",
                "x-total-time",
                "x-queue-time",
                "x-hfi-cost-usd",
                "content-length",
            }
            assert {k for k in ra.headers if k not in drop} == {k for k in rb.headers if k not in drop}, path
        monkeypatch.setattr(core, "_handle", boom)  # anything else: a 500 with nothing leaked, on both paths
        ra, rb = a.post(CLS, json={"inputs": "x"}), b.post(CLS, json={"inputs": "x"})
        assert (ra.status_code, ra.json()) == (rb.status_code, rb.json()) == (500, {"error": "unknown error"})
        assert ("x-request-id" in ra.headers) == ("x-request-id" in rb.headers)
    assert reached == [], "an inference POST went through the router"
    core.metering.close()


def test_admissions_estimate_follows_the_price_in_force(default_settings, inprocess_backend, tmp_path):
    """Admission reserves `billing.estimate_compute_s` at the profile's price when the request starts: kept per
    profile, and made again when a new price point comes into force."""
    import datetime as dt

    from serving.config import Settings

    data = default_settings.model_dump(mode="json")
    data["profiles"] = [
        {
            "name": "priced",
            "prices": [
                {"effective_from": "2026-01-01", "usd_per_second": "0.0001"},
                {"effective_from": "2026-06-01", "usd_per_second": "0.0003"},
            ],
        }
    ]
    data["billing"] = {**data.get("billing", {}), "estimate_compute_s": 2.5}
    data["metering"] = {**data["metering"], "spool_dir": str(tmp_path / "spool")}
    core = IngressCore(Settings.load(data, env={}), inprocess_backend)
    may, july = (
        dt.datetime(2026, 5, 31, 23, 59, tzinfo=dt.timezone.utc),
        dt.datetime(2026, 7, 1, tzinfo=dt.timezone.utc),
    )
    assert core._estimate("priced", may) == 250_000 == core._estimate("priced", may)  # 2.5 s x $0.0001
    assert core._estimate("priced", july) == 750_000
    assert core._estimate("priced", may) == 250_000
    core.close()
