"""The text and tabular tasks with the unmodified Python client (huggingface_hub.InferenceClient) and raw HTTP,
through the all-tasks catalog's pool on real Ray Serve (tests/fixtures/tasks_service.py)."""

from __future__ import annotations

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import BadRequestError

WINE = {
    "fixed_acidity": ["7.4", "7.8", "10.3"],
    "volatile_acidity": ["0.7", "0.88", "0.32"],
    "citric_acid": ["0", "0", "0.45"],
    "residual_sugar": ["1.9", "2.6", "6.4"],
    "alcohol": ["9.4", "9.8", "12.8"],
}
FISH = {
    "Species": ["Bream", "Pike"],
    "Length1": ["23.2", "30"],
    "Length2": ["25.4", "32.4"],
    "Height": ["11.52", "8.1"],
    "Width": ["4.02", "5.3"],
}
# A pooled model's first request waits for its load (and the replica's first imports): more than httpx's 5 s.
TIMEOUT = 120


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=TIMEOUT, **kwargs)


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=TIMEOUT)


TABLE = {"Repository": ["Transformers", "Datasets", "Tokenizers"], "Stars": ["36542", "4512", "3934"]}


@pytest.fixture(scope="module")
def url(hfi_tasks_service) -> str:
    return hfi_tasks_service.url


def client(url: str, model: str) -> InferenceClient:
    return InferenceClient(base_url=f"{url}/models/{model}", api_key="hf_test_token")


def test_question_answering(url):
    out = client(url, "local/tiny-qa").question_answering(
        question="What is the capital of France?", context="Paris is the capital of France."
    )
    assert isinstance(out.answer, str) and out.answer
    assert isinstance(out.score, float) and 0 <= out.score <= 1
    assert isinstance(out.start, int) and isinstance(out.end, int) and 0 <= out.start < out.end <= 31
    assert out.answer == "Paris is the capital of France."[out.start : out.end]
    top = client(url, "local/tiny-qa").question_answering(
        question="where?", context="the cat sat on the mat", top_k=3
    )
    assert isinstance(top, list) and len(top) == 3 and top[0].score >= top[1].score >= top[2].score


def test_fill_mask(url):
    out = client(url, "local/tiny-fill-mask").fill_mask("The cat sat on the [MASK].", top_k=3)
    assert len(out) == 3
    for e in out:
        assert isinstance(e.token, int) and isinstance(e.token_str, str) and isinstance(e.score, float)
        assert isinstance(e.sequence, str)
    with pytest.raises(BadRequestError, match=r"inputs must contain the mask token \[MASK\]"):
        client(url, "local/tiny-fill-mask").fill_mask("no mask here")


def test_token_classification(url):
    c = client(url, "local/tiny-ner")
    out = c.token_classification("My name is Sarah and I live in London")
    assert out and all(
        isinstance(e.entity_group, str) and e.entity_group in {"PER", "ORG", "LOC", "MISC"} for e in out
    )
    assert all(isinstance(e.start, int) and e.end > e.start and isinstance(e.score, float) for e in out)
    tokens = c.token_classification("paris and london", aggregation_strategy="none")
    assert all(e.entity and e.entity_group == e.entity for e in tokens)
    with pytest.raises(BadRequestError, match=r"parameters\.aggregation_strategy"):
        c.token_classification("x", aggregation_strategy="loudest")


def test_zero_shot_classification(url):
    c = client(url, "local/tiny-nli")
    out = c.zero_shot_classification(
        "I love this movie", candidate_labels=["positive", "negative", "neutral"]
    )
    assert sorted(e.label for e in out) == ["negative", "neutral", "positive"]
    assert sum(e.score for e in out) == pytest.approx(1.0, abs=1e-4)
    assert out[0].score >= out[1].score >= out[2].score
    multi = c.zero_shot_classification("I love it", candidate_labels=["a", "b"], multi_label=True)
    assert len(multi) == 2 and all(0 <= e.score <= 1 for e in multi)
    with pytest.raises(BadRequestError, match=r"parameters\.candidate_labels"):
        c.zero_shot_classification("x", candidate_labels=[])


def test_zero_shot_answers_old_python_clients_their_shape(url):
    body = {"inputs": "I love it", "parameters": {"candidate_labels": ["a", "b"]}}
    old = post(
        f"{url}/models/local/tiny-nli",
        json=body,
        headers={"user-agent": "huggingface_hub/0.28.1; python/3.11"},
    ).json()
    assert old["sequence"] == "I love it" and sorted(old["labels"]) == ["a", "b"] and len(old["scores"]) == 2
    new = post(
        f"{url}/models/local/tiny-nli",
        json=body,
        headers={"user-agent": "huggingface_hub/1.2.0; python/3.11"},
    ).json()
    assert isinstance(new, list) and {e["label"] for e in new} == {"a", "b"}


def test_summarization_and_translation(url):
    s = client(url, "local/tiny-summarizer").summarization(
        "the cat sat on the mat " * 10, generate_parameters={"max_new_tokens": 6}
    )
    assert isinstance(s.summary_text, str) and s.summary_text
    t = client(url, "local/tiny-translator").translation(
        "le chat est sur le tapis", src_lang="fr", tgt_lang="en"
    )
    assert isinstance(t.translation_text, str) and t.translation_text
    with pytest.raises(BadRequestError, match=r"generate_parameters\.max_new_tokens must be <= 64"):
        client(url, "local/tiny-summarizer").summarization(
            "x", generate_parameters={"max_new_tokens": 10_000}
        )
    with pytest.raises(BadRequestError, match=r"generate_parameters\.bogus"):
        client(url, "local/tiny-summarizer").summarization("x", generate_parameters={"bogus": 1})


def test_table_question_answering(url):
    out = client(url, "local/tiny-tapas").table_question_answering(
        TABLE, "How many stars does Datasets have?"
    )
    assert isinstance(out.answer, str)
    assert out.aggregator in ("NONE", "SUM", "AVERAGE", "COUNT")
    assert all(isinstance(c, str) for c in out.cells)
    assert all(len(xy) == 2 and all(isinstance(v, int) for v in xy) for xy in out.coordinates)
    with pytest.raises(BadRequestError, match=r"inputs\.table\.Stars has 2 values"):
        client(url, "local/tiny-tapas").table_question_answering(
            {"Repository": ["a", "b", "c"], "Stars": ["1", "2"]}, "how many?"
        )


def test_tabular_classification_python_client(url):
    out = client(url, "local/tiny-wine-quality").tabular_classification(WINE)
    assert len(out) == 3 and all(isinstance(v, int) and v in (5, 6, 7) for v in out)
    with pytest.raises(BadRequestError, match=r"inputs\.data is missing the column\(s\) alcohol"):
        client(url, "local/tiny-wine-quality").tabular_classification(
            {k: v for k, v in WINE.items() if k != "alcohol"}
        )


def test_tabular_regression_raw_http(url):
    """The Python client refuses tabular-regression for hf-inference: the JS body over plain HTTP."""
    r = post(f"{url}/models/local/tiny-fish-weight", json={"inputs": {"data": FISH}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out) == 2 and all(isinstance(v, float) for v in out)
    assert r.headers["x-compute-type"] == "cpu-basic" and float(r.headers["x-compute-time"]) >= 0
    # the Python client's body shape is accepted too
    assert post(f"{url}/models/local/tiny-fish-weight", json={"table": FISH, "parameters": {}}).json() == out


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        ("local/tiny-fish-weight", {"inputs": {"data": {}}}, "inputs.data must not be empty"),
        ("local/tiny-fish-weight", {"inputs": {"data": {**FISH, "Length1": ["x", "y"]}}}, "inputs.data"),
        ("local/tiny-wine-quality", {"inputs": {"data": {"alcohol": [[1]]}}}, r"inputs\.data\.alcohol\[0\]"),
        ("local/tiny-tapas", {"inputs": {"query": "q", "table": {}}}, "inputs.table must not be empty"),
        ("local/tiny-qa", {"inputs": {"question": "q"}}, "inputs.context"),
        ("local/tiny-qa", {"inputs": "just text"}, "inputs must be an object with question and context"),
        ("local/tiny-ner", {"inputs": ""}, "inputs must not be empty"),
        ("local/tiny-translator", {"inputs": "x", "parameters": {"src_lang": "fr"}}, "parameters.src_lang"),
        ("local/tiny-nli", {"inputs": "x", "parameters": {"candidate_labels": ["a"], "hypothesis_template": "no"}},
         "parameters.hypothesis_template"),
    ],
)  # fmt: skip
def test_bad_input_is_400_naming_the_field(url, model, body, field):
    r = post(f"{url}/models/{model}", json=body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    import re

    assert re.search(field, r.json()["error"]), r.json()


def test_table_cells_limit(url):
    big = {f"c{i}": ["1"] * 100 for i in range(21)}  # 2,100 cells; the catalog allows 2,000
    r = post(f"{url}/models/local/tiny-tapas", json={"inputs": {"query": "q", "table": big}})
    assert r.status_code == 400 and "2100 cells, more than this model's limit of 2000" in r.json()["error"]


def test_router_reaches_pooled_models_by_handle(url):
    """The router (/pipeline/{task}/{id}) calls the pool by handle, with the model's id."""
    r = post(f"{url}/pipeline/fill-mask/local/tiny-fill-mask", json={"inputs": "a [MASK] b"})
    assert r.status_code == 200, r.text
    assert isinstance(r.json(), list) and "token_str" in r.json()[0]
    assert r.headers["x-compute-type"] == "cpu-basic"


def test_each_request_is_charged_to_its_model(hfi_tasks_service, url):
    """Metering stays per model: each charge names the model and task that ran, on its hardware profile."""
    import json
    import time

    ids = {}
    for model, task, body in (
        ("local/tiny-wine-quality", "tabular-classification", {"inputs": {"data": WINE}}),
        ("local/tiny-ner", "token-classification", {"inputs": "paris"}),
    ):
        r = post(f"{url}/models/{model}", json=body)
        assert r.status_code == 200
        ids[r.headers["inference-id"]] = (model, task)
    events = hfi_tasks_service.args["metering"]["events_file"]
    seen: dict[str, dict] = {}
    for _ in range(600):  # the events are written behind the response
        with open(events) as f:
            for line in f:
                event = json.loads(line)
                if event["id"] in ids:
                    seen[event["id"]] = event["data"]
        if len(seen) == len(ids):
            break
        time.sleep(0.1)
    assert set(seen) == set(ids)
    for event_id, data in seen.items():
        assert (data["model_id"], data["task"]) == ids[event_id]
        assert data["hardware_profile"] == "cpu-basic" and data["compute_ms"] >= 0


def test_openapi_describes_the_task_routes(url):
    """/openapi.json documents each text and tabular route: its request body and its answer."""
    spec = get(f"{url}/openapi.json").json()
    for task in ("question-answering", "fill-mask", "token-classification", "zero-shot-classification",
                 "summarization", "translation", "table-question-answering", "tabular-classification",
                 "tabular-regression"):  # fmt: skip
        op = spec["paths"][f"/models/{{org}}/{{name}}/pipeline/{task}"]["post"]
        assert op["summary"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["type"] == "object"
        assert "schema" in op["responses"]["200"]["content"]["application/json"]
        assert "400" in op["responses"]


@pytest.fixture(scope="module")
def pool_status(hfi_tasks_service):
    """The pool replica's status, by Serve handle. This driver's handles need an event loop that outlives them:
    one on a daemon thread, left running."""
    import asyncio
    import threading

    from ray import serve

    app = next(name for name in hfi_tasks_service.app_names if name.endswith("pool-small-cpu"))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def status() -> dict:
        return await serve.get_deployment_handle("pool-small-cpu", app_name=app).pool_status.remote()

    return lambda: asyncio.run_coroutine_threadsafe(status(), loop).result(timeout=60)


def test_the_pool_loads_a_model_on_first_use_only(pool_status, url):
    """The pool replica loads a model on its first request and keeps it for the next ones, within its bounds."""
    body = {"inputs": {"question": "who?", "context": "sarah lives in london"}}
    for _ in range(2):
        before = pool_status()
        r = post(f"{url}/models/local/tiny-qa", json=body)
        assert r.status_code == 200, r.text
        after = pool_status()
        assert "local/tiny-qa" in after["loaded"]
        assert len(after["loaded"]) <= after["max_models"]
        assert after["memory_bytes"] <= after["max_memory_bytes"]
        count = before["load_counts"].get("local/tiny-qa", 0)
        # loaded by this request when it was not loaded, else used as it was
        was_loaded = "local/tiny-qa" in before["loaded"]
        assert after["load_counts"]["local/tiny-qa"] == count + (0 if was_loaded else 1)
    assert was_loaded  # the second request found it loaded
