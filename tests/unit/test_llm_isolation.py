"""The batching engine on the real default LLM (SmolLM2-135M-Instruct, CPU, float32) when one request goes wrong
or goes away: a request whose own processing fails fails alone, a stream left mid-way reports every step the
engine ran for it until it dropped the sequence, and `hfi status` sees the engine's running and waiting
sequences."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from fixtures.llm_checks import generate_alone, poison_logits

from models.errors import GenerationError
from models.tasks.llm_engine import FINISH_LENGTH, EngineRequest, FinishEvent
from models.tasks.llm_sampling import SamplingParams
from models.types import Interrupted, RunResult, StreamChunk, TaskRequest

LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Count to five.", "Name a color.", "Who wrote Hamlet?"]
TIE_LOGIT_MARGIN = 1e-3  # as tests/unit/test_llm_batching.py: a top-2 gap this small may flip in a batch


@pytest.fixture(scope="module")
def llm(executors):
    ex = executors[LLM]
    assert ex.runner.concurrent, "the default LLM runs on the batching engine"
    return ex


def chat(question: str, max_tokens: int = 8, request_id: str | None = None, **params) -> TaskRequest:
    return TaskRequest(
        "chat-completion",
        [{"role": "user", "content": question}],
        {"max_tokens": max_tokens, **params},
        request_id or f"{question}-{uuid.uuid4().hex[:6]}",
    )


def shares_of(engine, request_id: str) -> int:
    """The engine's own account of one request: the sum of its shares of every step it took part in."""
    return sum(
        share
        for step in engine.steps
        for rid, share in zip(step.request_ids, step.shares_ns, strict=True)
        if rid == request_id
    )


@contextmanager
def engine_held(llm) -> Iterator[EngineRequest]:
    """The engine held inside a step of a request of its own until the block ends: the requests submitted
    meanwhile wait together, then join in one group prefill and decode together."""
    engine = llm.runner.engine
    ids = llm.runner.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    held, release = threading.Event(), threading.Event()

    def hold(choice):
        held.set()
        release.wait(timeout=60)
        return None, None

    holder = EngineRequest(f"holder-{uuid.uuid4().hex[:6]}", ids, SamplingParams(max_new_tokens=2), hold)
    engine.submit(holder)
    assert held.wait(timeout=60)
    try:
        yield holder
    finally:
        release.set()
    while not isinstance(holder.events.get(timeout=60), FinishEvent):
        pass


def wait_queued(engine, n: int, timeout_s: float = 60.0) -> None:
    """Until `n` requests wait in the engine (submitted from other threads), within a bound."""
    deadline = time.monotonic() + timeout_s
    while engine.occupancy()[1] < n:
        assert time.monotonic() < deadline, engine.occupancy()
        time.sleep(0.01)


# 1. A request whose own processing fails fails alone


def test_a_request_whose_logits_processor_fails_fails_alone_and_the_batch_goes_on(llm, monkeypatch):
    poison_id = f"poison-{uuid.uuid4().hex[:6]}"
    poison_logits(monkeypatch, poison_id, at_call=3)  # its constrained decoding breaks at its third token
    engine = llm.runner.engine
    busy_before = engine.busy_ns
    requests = [chat(q, max_tokens=8, temperature=0) for q in QUESTIONS]
    poison = chat("Tell me a long story.", max_tokens=30, request_id=poison_id)

    def run(req: TaskRequest) -> RunResult | Exception:
        try:
            return llm.run(req)
        except Exception as err:
            return err

    with cf.ThreadPoolExecutor(len(requests) + 1) as pool:
        with engine_held(llm) as holder:  # so that they all start together, the failing one among them
            futures = [pool.submit(run, r) for r in [*requests, poison]]
            wait_queued(engine, len(futures))
        *results, failed = [f.result() for f in futures]
    assert isinstance(failed, GenerationError) and failed.status_code == 500
    for req, result in zip(requests, results, strict=True):
        assert isinstance(result, RunResult), result
        got = [t["id"] for t in result.output["tokens"]]
        want, margins = generate_alone(llm.runner, req, 8)
        if got != want[: len(got)]:
            first = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
            assert margins[first] < TIE_LOGIT_MARGIN, (req.request_id, first, got, want)
    failing = [s for s in engine.steps if poison_id in s.request_ids][-1]  # the step it failed in
    others = set(failing.request_ids) - {poison_id}
    assert others and others <= {
        r.request_id for r in requests
    }  # it failed in a batch with them, and they went on
    # the others are billed exactly their shares; the failed request's shares are its own (not charged: a 5xx)
    billed = sum(r.timings.compute_ns for r in results)
    own = shares_of(engine, poison_id) + shares_of(engine, holder.request_id)
    assert billed + own == engine.busy_ns - busy_before
    assert shares_of(engine, poison_id) > 0


# 2. A stream left mid-way: every step the engine ran for it


async def _read(source, n: int) -> list[StreamChunk]:
    return [await source.__anext__() for _ in range(n)]


@pytest.mark.parametrize("leave", ["while-waiting", "between-chunks"])
def test_a_stream_left_midway_reports_every_step_the_engine_ran_for_it(llm, inprocess_backend, leave):
    from serving.streaming import leavable_stream

    engine = llm.runner.engine
    request = chat("Tell me a long story.", max_tokens=200)

    async def scenario() -> tuple[list[StreamChunk], Interrupted | None]:
        source = leavable_stream(inprocess_backend, LLM, request)
        chunks = await _read(source, 3)
        if leave == "while-waiting":  # the client leaves while the ingress waits for the next chunk
            reader = asyncio.ensure_future(source.__anext__())
            await asyncio.sleep(0)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
        return chunks, await source.stop()

    chunks, stopped = asyncio.run(scenario())
    assert all(isinstance(c, StreamChunk) for c in chunks)
    assert isinstance(stopped, Interrupted)
    own = shares_of(engine, request.request_id)
    assert stopped.compute_ns == own  # exactly the engine's own account of the request
    assert own > chunks[-1].elapsed_ns  # steps ran after the last chunk read, and they are in it
    steps = [s for s in engine.steps if request.request_id in s.request_ids]
    assert len(steps) < 200  # and it stopped long before its max_tokens


# 3. hfi status: an engine's running and waiting sequences


def test_status_counts_the_engines_running_and_waiting_sequences(llm, inprocess_backend):
    from serving.inprocess import LocalBackend
    from serving.runtime_status import _merge, process_snapshot

    engine = llm.runner.engine
    core = SimpleNamespace(backend=LocalBackend({LLM: llm}))
    ids = llm.runner.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    held, release = threading.Event(), threading.Event()

    def hold(choice):  # the engine stays inside this request's step until released
        held.set()
        release.wait(timeout=60)
        return None, None

    holder = EngineRequest(f"status-{uuid.uuid4().hex[:6]}", ids, SamplingParams(max_new_tokens=2), hold)
    others = [EngineRequest(f"status-w{i}", ids, SamplingParams(max_new_tokens=2)) for i in range(2)]
    engine.submit(holder)
    try:
        assert held.wait(timeout=60)
        for r in others:
            engine.submit(r)
        assert llm.occupancy() == (1, 2)
        assert llm.busy  # a sequence is generating
        snap = process_snapshot(None, [core])
        assert snap["queued"] == {LLM: 2}  # the two waiting, not the one computing
        ongoing = {"tags": {"application": "llm"}, "ongoing": 3, "window": {}, "queued": snap["queued"]}
        merged = _merge([{**ongoing, "spool": {}}], LLM, "llm", 60.0)
        assert (merged["in_flight"], merged["queue"]) == (3, 2)
    finally:
        release.set()
    for r in (holder, *others):
        while not isinstance(event := r.events.get(timeout=60), FinishEvent):
            pass
        assert event.reason == FINISH_LENGTH
    assert llm.occupancy() == (0, 0) and not llm.busy
    assert process_snapshot(None, [core])["queued"] == {LLM: 0}
