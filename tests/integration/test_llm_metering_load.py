"""Metering by step under load, through the whole ingress: the real SmolLM2 on the batching engine behind serving's
IngressCore and routes (in process, no Ray), served by uvicorn on 127.0.0.1, driven by the real OpenAI SDK and
`huggingface_hub.InferenceClient` from many threads at once, charges written to a real SQLite ledger.

The replica's busy time is the engine's (`busy_ns`: its steps end to end). The compute billed to every request
of the run adds up to it exactly (each step's time is split across the sequences in it): a client that leaves
mid-stream is charged every step the engine ran for it until it dropped the sequence, the steps after the last
chunk it read included. A request whose own processing fails fails alone, uncharged (a 5xx), and the others in
its batch are charged their shares exactly."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest
from fixtures.llm_checks import poison_logits
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


def _charges(database_url: str, wanted: int, timeout_s: float = 60.0) -> list:
    """The LLM's charges in the ledger, once there are `wanted` of them (a left stream is settled once the engine
    has dropped it, a step or two after its client left)."""
    from metering.ledger import Ledger

    deadline = time.monotonic() + timeout_s
    while True:
        ledger = Ledger(database_url)
        try:
            charges = [c for c in ledger.charges() if c.usage.model_id == LLM]
        finally:
            ledger.close()
        if len(charges) >= wanted or time.monotonic() > deadline:
            return charges
        time.sleep(0.2)


@contextmanager
def _engine_held(engine, tokenizer) -> Iterator[None]:
    """The engine held inside a step of a request of its own until the block ends: the requests that come
    meanwhile wait together, then join in one group prefill and decode together."""
    from models.tasks.llm_engine import EngineRequest, FinishEvent
    from models.tasks.llm_sampling import SamplingParams

    held, release = threading.Event(), threading.Event()

    def hold(choice):
        held.set()
        release.wait(timeout=60)
        return None, None

    ids = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    holder = EngineRequest(f"holder-{uuid.uuid4().hex[:6]}", ids, SamplingParams(max_new_tokens=2), hold)
    engine.submit(holder)
    assert held.wait(timeout=60)
    try:
        yield
    finally:
        release.set()
    while not isinstance(holder.events.get(timeout=60), FinishEvent):
        pass


def _shares(steps) -> dict[str, int]:
    share_of: dict[str, int] = {}
    for step in steps:
        for rid, share in zip(step.request_ids, step.shares_ns, strict=True):
            share_of[rid] = share_of.get(rid, 0) + share
    return share_of


def test_billed_seconds_add_up_to_the_engine_busy_seconds(service):
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
    charges = _charges(database_url, 16)
    assert len(charges) == 16  # every request, the one that left included
    busy_ns = engine.busy_ns - busy_before
    billed_ns = sum(c.usage.compute_ns for c in charges)
    # Each step's time, split across the requests in it, is exactly the engine's busy time ...
    steps = list(engine.steps)[steps_before:]
    assert sum(s.step_ns for s in steps) == busy_ns
    share_of = _shares(steps)
    assert sum(share_of.values()) == busy_ns
    # ... and each request is billed its shares exactly: the one that left too, every step the engine ran for it
    # until it dropped the sequence (the steps after the last chunk it read included), so nothing ran free.
    gone = [c for c in charges if c.usage.status == "client_disconnected"]
    assert len(gone) == 1 and gone[0].usage.compute_ns > 0
    for c in charges:
        assert c.usage.compute_ns == share_of[c.usage.client_request_id or c.usage.request_id], c
    assert billed_ns == busy_ns
    left_steps = [
        s for s in steps if (gone[0].usage.client_request_id or gone[0].usage.request_id) in s.request_ids
    ]
    assert len(left_steps) < 60  # it was stopped long before its max_tokens
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


def test_a_request_that_fails_on_its_own_fails_alone_uncharged_and_the_batch_goes_on(service, monkeypatch):
    """One request's constrained decoding breaks mid-way while it shares the batch with streams: it gets a 500 and
    no charge (5xx are not charged), the streams finish, each charged exactly its shares of the steps."""
    url, core, database_url = service
    engine = core.backend.executors[LLM].runner.engine
    tag = f"isolation-{uuid.uuid4().hex[:8]}-"
    poison_logits(
        monkeypatch, tag + "poison", at_call=4
    )  # its constrained decoding breaks at its fourth token
    before = len(_charges(database_url, 0))
    steps_before = len(engine.steps)

    def poisoned() -> int:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        try:
            client.chat.completions.create(
                model=LLM,
                messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=30,
                extra_headers={"x-request-id": tag + "poison"},
            )
        except openai.InternalServerError as err:
            return err.status_code
        return 200

    def streamed(i: int) -> dict:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model=LLM,
            messages=[{"role": "user", "content": f"Say something about the number {i}."}],
            max_tokens=12,
            stream=True,
            extra_headers={"x-request-id": f"{tag}{i}"},
        )
        finish = None
        for chunk in stream:
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
        return {"finish": finish}

    with cf.ThreadPoolExecutor(6) as pool:
        with _engine_held(engine, core.backend.executors[LLM].runner.tokenizer):  # they start together
            bad = pool.submit(poisoned)
            good = [pool.submit(streamed, i) for i in range(5)]
            deadline = time.monotonic() + 60
            while engine.occupancy()[1] < 6:  # all six wait in the engine
                assert time.monotonic() < deadline, engine.occupancy()
                time.sleep(0.01)
        assert bad.result() == 500
        assert all(f.result()["finish"] in ("stop", "length") for f in good)
    assert core.metering.flush(timeout_s=30)
    charges = [
        c for c in _charges(database_url, before + 5) if (c.usage.client_request_id or "").startswith(tag)
    ]
    assert sorted(c.usage.client_request_id for c in charges) == sorted(f"{tag}{i}" for i in range(5))
    assert all(c.usage.status == "ok" for c in charges)
    steps = list(engine.steps)[steps_before:]
    share_of = _shares(steps)
    for c in charges:
        assert c.usage.compute_ns == share_of[c.usage.client_request_id], c
    assert share_of[tag + "poison"] > 0  # it ran, and failed: its shares are its own, not the others'
    failing = [s for s in steps if tag + "poison" in s.request_ids][-1]  # the step it failed in
    others = set(failing.request_ids) - {tag + "poison"}
    assert others and others <= {f"{tag}{i}" for i in range(5)}  # streams were in it, and finished
