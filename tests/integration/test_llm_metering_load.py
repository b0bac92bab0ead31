"""Metering by step under load, through the whole ingress: the real SmolLM2 on the batching engine behind serving's
IngressCore and routes (in process, no Ray), served by uvicorn on 127.0.0.1, driven by the real OpenAI SDK and
`huggingface_hub.InferenceClient` from many threads at once, charges written to a real SQLite ledger.

The replica's busy time is the engine's (`busy_ns`: its steps end to end). The compute billed to every request
of the run adds up to it exactly for requests that finish (each step's time is split across
the sequences in it), less the few steps a client that leaves mid-stream no longer sees (it is charged what it
was streamed: the compute up to its last chunk)."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest
from fixtures.net import serve_in_thread
from huggingface_hub import InferenceClient
from openai import OpenAI

LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def service(model_store, tmp_path_factory):
    from serving.config import Settings
    from serving.http import create_app
    from serving.ingress import IngressCore
    from serving.inprocess import InProcessBackend

    work = tmp_path_factory.mktemp("llm-load")
    spec = {
        "id": LLM,
        "task": "text-generation",
        "source": {"path": "smollm2-135m-instruct", "prepare": "smollm2-135m-instruct"},
        "hardware_profile": "cpu-basic",
        "dtype": "float32",
        "max_ongoing_requests": 32,
        "options": {"engine": {"kind": "batching", "max_batch_size": 16}},
        "limits": {"max_new_tokens": 64},
    }
    database_url = f"sqlite:///{work / 'ledger.db'}"
    settings = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "models": [spec],
            "metering": {"database_url": database_url, "spool_dir": str(work / "spool")},
        },
        env={},
    )
    catalog, _ = settings.validated()
    core = IngressCore(settings, InProcessBackend(catalog, settings.load_options(), torch_threads=1))
    try:
        with serve_in_thread(create_app(core)) as url:
            yield url, core, database_url
    finally:
        core.metering.close()


def _chat_stream(url: str, i: int) -> dict:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=LLM,
        messages=[{"role": "user", "content": f"Say something about the number {i}."}],
        max_tokens=6 + i % 5,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return {"text": text, "usage": usage, "finish": finish}


def _tgi_stream(url: str, i: int) -> dict:
    client = InferenceClient(base_url=f"{url}/models/{LLM}", api_key="unused")
    events = list(
        client.text_generation(f"Once upon a time, number {i}", max_new_tokens=5, stream=True, details=True)
    )
    return {
        "text": events[-1].generated_text,
        "tokens": events[-1].details.generated_tokens,
        "events": len(events),
    }


def _leave_early(url: str, left: threading.Event) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=60, stream=True
    )
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()  # the client goes away mid-stream
    left.set()


def test_billed_seconds_add_up_to_the_engine_busy_seconds(service):
    from metering.ledger import Ledger

    url, core, database_url = service
    engine = core.backend.executors[LLM].runner.engine
    busy_before, steps_before = engine.busy_ns, len(engine.steps)
    left = threading.Event()
    with cf.ThreadPoolExecutor(16) as pool:
        early = pool.submit(_leave_early, url, left)
        chats = [pool.submit(_chat_stream, url, i) for i in range(12)]
        tgis = [pool.submit(_tgi_stream, url, i) for i in range(3)]
        chats = [f.result() for f in chats]
        tgis = [f.result() for f in tgis]
        early.result()
    assert left.is_set()
    assert all(c["text"] and c["finish"] in ("stop", "length") for c in chats)
    assert all(t["tokens"] == t["events"] and t["text"] for t in tgis)  # one TGI event per token
    assert max(s.request_ids.__len__() for s in engine.steps) > 1  # they shared steps
    assert core.metering.flush(timeout_s=30)
    busy_ns = engine.busy_ns - busy_before

    ledger = Ledger(database_url)
    try:
        charges = [c for c in ledger.charges() if c.usage.model_id == LLM]
    finally:
        ledger.close()
    assert len(charges) == 16  # every request, the one that left included
    billed_ns = sum(c.usage.compute_ns for c in charges)
    assert billed_ns <= busy_ns
    # Each step's time, split across the requests in it, is exactly the engine's busy time ...
    steps = list(engine.steps)[steps_before:]
    assert sum(s.step_ns for s in steps) == busy_ns
    share_of: dict[str, int] = {}
    for step in steps:
        for rid, share in zip(step.request_ids, step.shares_ns, strict=True):
            share_of[rid] = share_of.get(rid, 0) + share
    assert sum(share_of.values()) == busy_ns
    # ... each request that finished is billed its shares exactly, and the one that left what it was streamed:
    # at most its shares (the steps between its last chunk and the engine seeing it leave are not billed; how
    # many depends on the machine's load).
    gone = [c for c in charges if c.usage.status == "client_disconnected"]
    assert len(gone) == 1 and gone[0].usage.compute_ns > 0
    for c in charges:
        shares = share_of[c.usage.client_request_id or c.usage.request_id]
        if c.usage.status == "ok":
            assert c.usage.compute_ns == shares, c
        else:
            assert c.usage.compute_ns <= shares, c
    finished = [c for c in charges if c.usage.status == "ok"]
    reported = sorted(
        [(c["usage"].prompt_tokens, c["usage"].completion_tokens) for c in chats]
        + [(None, t["tokens"]) for t in tgis],
        key=str,
    )
    recorded = sorted(
        [
            (
                c.usage.extra["prompt_tokens"] if c.usage.task != "text-generation" else None,
                c.usage.extra["generated_tokens"],
            )
            for c in finished
        ],
        key=str,
    )
    assert recorded == reported  # the charge records the prompt and generated tokens the client was told
    assert all(c.usage.extra["engine_steps"] >= c.usage.extra["generated_tokens"] for c in finished)
