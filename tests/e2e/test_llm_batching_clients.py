"""Continuous batching over real Ray Serve, driven by the unmodified clients: concurrent streaming chats (OpenAI SDK
through the router's /v1, huggingface_hub.InferenceClient on the model's own routes, TGI streams) each get their
own tokens while sharing the replica's engine steps, and each charge records its share and its tokens."""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import time

import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = [
    "Name a fruit.",
    "What is 3+4?",
    "Say hi.",
    "Name an ocean.",
    "What color is snow?",
    "Count to 3.",
]


@pytest.fixture(scope="module")
def service(hfi_service):
    return hfi_service


def _openai_stream(url: str, question: str) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="hf_test_token")
    stream = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0, stream=True
    )
    return "".join((c.choices[0].delta.content or "") for c in stream if c.choices)


def _hub_stream(url: str, question: str) -> str:
    client = InferenceClient(base_url=f"{url}/models/{LLM}", api_key="hf_test_token")
    chunks = client.chat_completion(
        messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0, stream=True
    )
    return "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)


def _tgi_stream(url: str, prompt: str) -> tuple[str, int]:
    client = InferenceClient(base_url=f"{url}/models/{LLM}", api_key="hf_test_token")
    events = list(client.text_generation(prompt, max_new_tokens=6, stream=True, details=True))
    return events[-1].generated_text, len(events)


def _charges_since(database_url: str, since: dt.datetime, n: int) -> list:
    from metering.ledger import Ledger

    ledger = Ledger(database_url)
    try:
        deadline = time.monotonic() + 60
        while True:
            charges = [c for c in ledger.charges(since=since) if c.usage.model_id == LLM]
            if len(charges) >= n or time.monotonic() > deadline:
                return charges
            time.sleep(0.5)
    finally:
        ledger.close()


def test_concurrent_streaming_chats_share_the_engine_and_each_gets_its_own_tokens(service):
    url = service.url
    alone = {q: _openai_stream(url, q) for q in QUESTIONS[:2]}  # one at a time: the reference
    since = dt.datetime.now(dt.timezone.utc)
    with cf.ThreadPoolExecutor(len(QUESTIONS) * 2 + 2) as pool:
        via_router = {q: pool.submit(_openai_stream, url, q) for q in QUESTIONS}
        via_model = {q: pool.submit(_hub_stream, url, q) for q in QUESTIONS}
        tgi = [pool.submit(_tgi_stream, url, p) for p in ("The sky is", "Paris is")]
        via_router = {q: f.result() for q, f in via_router.items()}
        via_model = {q: f.result() for q, f in via_model.items()}
        tgi = [f.result() for f in tgi]
    for q in QUESTIONS:
        assert via_router[q] and via_router[q] == via_model[q]  # greedy: the same answer on both routes
    for q, text in alone.items():
        assert via_router[q] == text  # and the same as alone, although it ran in a batch
    assert all(text and 1 <= events <= 6 for text, events in tgi)

    charges = _charges_since(service.database_url, since, len(QUESTIONS) * 2 + 2)
    assert len(charges) == len(QUESTIONS) * 2 + 2
    assert max(c.usage.batch_size for c in charges) > 1  # requests shared engine steps
    for c in charges:
        assert c.usage.status == "ok" and c.usage.compute_ns > 0
        assert 1 <= c.usage.extra["generated_tokens"] <= 8 and c.usage.extra["prompt_tokens"] > 0
        assert c.usage.extra["engine_steps"] >= c.usage.extra["generated_tokens"]


def test_a_client_that_leaves_mid_stream_is_cancelled_and_charged_what_it_got(service):
    url = service.url
    since = dt.datetime.now(dt.timezone.utc)
    client = OpenAI(base_url=f"{url}/v1", api_key="hf_test_token")
    stream = client.chat.completions.create(
        model=LLM,
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=200,
        stream=True,
    )
    for n, _ in enumerate(stream):
        if n == 2:
            break
    stream.close()
    # The engine is free again for the next request well before 200 tokens' time.
    out = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert out.choices[0].message.content is not None
    charges = _charges_since(service.database_url, since, 2)
    gone = [c for c in charges if c.usage.status == "client_disconnected"]
    assert len(gone) == 1 and gone[0].usage.compute_ns > 0
