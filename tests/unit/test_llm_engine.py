"""The continuous batching engine on a tiny random Llama built in code: scheduling, per-request settings, and
metering by step (each step's time split exactly across the sequences in it)."""

from __future__ import annotations

import random
import threading

import pytest

from core.timing import split_batch_ns
from models.tasks.llm_engine import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_ERROR,
    FINISH_LENGTH,
    BatchingEngine,
    EngineConfig,
    EngineRequest,
    FinishEvent,
    TokenEvent,
)
from models.tasks.llm_sampling import SamplingParams, sampling_params

torch = pytest.importorskip("torch")
VOCAB = 96


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def engine(model):
    engines: list[BatchingEngine] = []

    def make(**options) -> BatchingEngine:
        e = BatchingEngine(model, "cpu", EngineConfig(**options))
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()


def prompts(n: int, seed: int = 1, lo: int = 3, hi: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def drain(req: EngineRequest) -> tuple[list[TokenEvent], FinishEvent]:
    tokens = []
    while True:
        event = req.events.get(timeout=60)
        if isinstance(event, FinishEvent):
            return tokens, event
        tokens.append(event)


def solo_generate(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


# Metering by step


@pytest.mark.parametrize(
    ("total", "weights"),
    [(10, [1, 1, 1]), (7, [3, 1]), (1_000_003, [17, 1, 1, 1, 250]), (0, [2, 5]), (5, [0, 0])],
)
def test_split_is_exact_largest_remainder(total, weights):
    shares = split_batch_ns(total, weights)
    assert sum(shares) == total
    ws = [max(1, w) for w in weights]
    for share, w in zip(shares, ws, strict=True):
        exact = total * w / sum(ws)
        assert exact - 1 < share < exact + 1  # each share is its exact part, rounded down or up


def test_step_shares_add_up_to_each_step_and_requests_to_busy_time(engine):
    eng = engine(max_batch_size=4, prefill_chunk_tokens=24)
    reqs = [EngineRequest(str(i), p, greedy(3 + i)) for i, p in enumerate(prompts(7, lo=3, hi=40))]
    for r in reqs:
        eng.submit(r)
    finals = {r.request_id: drain(r) for r in reqs}
    by_request: dict[str, int] = {r.request_id: 0 for r in reqs}
    for step in eng.steps:
        assert sum(step.shares_ns) == step.step_ns
        assert step.shares_ns == split_batch_ns(step.step_ns, step.tokens)  # by tokens processed
        if step.kind == "decode":
            assert step.tokens == [1] * len(step.request_ids)
        for rid, share in zip(step.request_ids, step.shares_ns, strict=True):
            by_request[rid] += share
    for r in reqs:
        tokens, finish = finals[r.request_id]
        assert finish.compute_ns == r.compute_ns == by_request[r.request_id] > 0
        assert tokens[-1].compute_ns == finish.compute_ns  # the last token carries the whole compute
        assert [t.compute_ns for t in tokens] == sorted(t.compute_ns for t in tokens)
    assert sum(r.compute_ns for r in reqs) == eng.busy_ns  # exactly: the steps tile the busy time
    prefill_tokens = {
        rid: sum(
            t
            for s in eng.steps
            if s.kind == "prefill"
            for sid, t in zip(s.request_ids, s.tokens, strict=True)
            if sid == rid
        )
        for rid in by_request
    }
    assert prefill_tokens == {r.request_id: len(r.prompt_ids) for r in reqs}


# Scheduling


def test_greedy_in_a_batch_matches_generate_alone(engine, model):
    eng = engine(max_batch_size=8, prefill_chunk_tokens=40)
    ps = prompts(12, seed=3)
    reqs = [EngineRequest(str(i), p, greedy(6 + i % 5)) for i, p in enumerate(ps)]
    for r in reqs:
        eng.submit(r)
    outs = [[t.choice.token_id for t in drain(r)[0]] for r in reqs]
    assert max(len(s.request_ids) for s in eng.steps if s.kind == "decode") > 1  # they did share steps
    assert any(s.kind == "prefill" and len(s.request_ids) > 1 for s in eng.steps)  # padded group prefill
    for p, r, out in zip(ps, reqs, outs, strict=True):
        assert out == solo_generate(model, p, r.params.max_new_tokens)


def test_requests_join_and_leave_between_steps(engine):
    eng = engine(max_batch_size=4, prefill_max_wait_steps=0)  # a newcomer is prefilled at the next step
    a = EngineRequest("a", prompts(1, seed=4)[0], greedy(12))
    eng.submit(a)
    for _ in range(3):
        assert isinstance(a.events.get(timeout=60), TokenEvent)
    b = EngineRequest("b", prompts(1, seed=5)[0], greedy(3))
    eng.submit(b)
    drain(a), drain(b)
    kinds = [(s.kind, tuple(s.request_ids)) for s in eng.steps]
    b_prefill = kinds.index(("prefill", ("b",)))
    assert ("decode", ("a",)) in kinds[:b_prefill]  # a decoded alone before b arrived
    together = [k for k in kinds if k == ("decode", ("a", "b"))]
    assert len(together) == 2  # b's prefill gave its first token, two decodes its other two
    assert kinds[-1] == ("decode", ("a",))  # b left, a went on
    assert len(a.generated) == 12 and len(b.generated) == 3


def test_newcomers_are_prefilled_together_within_a_bounded_wait(engine):
    eng = engine(max_batch_size=8, prefill_group_min=3, prefill_max_wait_steps=4)
    first = EngineRequest("first", prompts(1, seed=12)[0], greedy(30))
    eng.submit(first)
    assert isinstance(first.events.get(timeout=60), TokenEvent)  # decoding alone now
    late = [EngineRequest(f"late{i}", p, greedy(2)) for i, p in enumerate(prompts(3, seed=13))]
    for r in late:
        eng.submit(r)
    for r in late:
        drain(r)
    drain(first)
    steps = list(eng.steps)
    prefills = [s for s in steps if s.kind == "prefill"]
    assert prefills[0].request_ids == ["first"]
    # the three late ones were prefilled in at most two steps, not one per step...
    late_prefills = [s for s in prefills if s.request_ids != ["first"]]
    assert 1 <= len(late_prefills) <= 2 and sum(len(s.request_ids) for s in late_prefills) == 3
    # ...and none waited more than prefill_max_wait_steps decode steps for its prefill
    for s in late_prefills:
        at = steps.index(s)
        decodes_before = [x for x in steps[:at] if x.kind == "decode"]
        assert len(decodes_before) <= 4 + len(late_prefills) + 1


def test_engine_options_are_checked():
    from models.errors import InvalidInput

    assert EngineConfig.from_options({"max_batch_size": 4, "prefill_max_wait_steps": 0}).max_batch_size == 4
    with pytest.raises(InvalidInput, match="max_batch_size"):
        EngineConfig.from_options({"max_batch_size": 0})
    with pytest.raises(InvalidInput, match="unknown setting"):
        EngineConfig.from_options({"max_batch": 4})


def test_batch_size_is_capped(engine):
    eng = engine(max_batch_size=2)
    reqs = [EngineRequest(str(i), p, greedy(4)) for i, p in enumerate(prompts(5))]
    for r in reqs:
        eng.submit(r)
    for r in reqs:
        assert drain(r)[1].reason == FINISH_LENGTH
    assert max(len(s.request_ids) for s in eng.steps) <= 2


def test_long_prompt_is_prefilled_in_chunks(engine, model):
    eng = engine(prefill_chunk_tokens=5)
    prompt = prompts(1, seed=6, lo=12, hi=13)[0]
    req = EngineRequest("long", prompt, greedy(4))
    eng.submit(req)
    tokens, _ = drain(req)
    assert [s.tokens for s in eng.steps if s.kind == "prefill"] == [[5], [5], [2]]
    assert [t.choice.token_id for t in tokens] == solo_generate(model, prompt, 4)


def test_cancelled_request_stops_at_the_next_step_and_others_go_on(engine):
    eng = engine()
    box: list[EngineRequest] = []
    stopper = EngineRequest(
        "gone", prompts(1, seed=7)[0], greedy(50), should_stop=lambda: len(box[0].generated) >= 2
    )
    box.append(stopper)
    other = EngineRequest("other", prompts(1, seed=8)[0], greedy(6))
    eng.submit(stopper)
    eng.submit(other)
    tokens, finish = drain(stopper)
    assert finish.reason == FINISH_CANCELLED and len(tokens) == 2
    assert finish.compute_ns == stopper.compute_ns > 0  # what ran is what a disconnect is charged
    assert drain(other)[1].reason == FINISH_LENGTH and len(other.generated) == 6
    # cancel() from another thread, before the request ever ran: it never takes a step
    waiting = EngineRequest("never", prompts(1)[0], greedy(5))
    waiting.cancel()
    eng.submit(waiting)
    tokens, finish = drain(waiting)
    assert finish.reason == FINISH_CANCELLED and tokens == [] and finish.compute_ns == 0


def test_stop_token_and_callback_end_a_sequence(engine, model):
    eng = engine()
    prompt = prompts(1, seed=9)[0]
    first_two = solo_generate(model, prompt, 2)
    eos = EngineRequest("eos", prompt, greedy(10, stop_token_ids=frozenset({first_two[1]})))
    eng.submit(eos)
    tokens, finish = drain(eos)
    assert finish.reason == FINISH_EOS and [t.choice.token_id for t in tokens] == first_two

    calls = []

    def on_token(choice):
        calls.append(threading.current_thread().name)
        return f"payload-{len(calls)}", ("stop_sequence" if len(calls) == 3 else None)

    cb = EngineRequest("cb", prompt, greedy(10), on_token=on_token)
    eng.submit(cb)
    tokens, finish = drain(cb)
    assert finish.reason == "stop_sequence" and [t.payload for t in tokens] == [
        "payload-1",
        "payload-2",
        "payload-3",
    ]
    assert set(calls) == {"llm-engine"}  # inside the step, on the engine thread


def test_per_request_sampling_in_one_batch(engine, model):
    eng = engine(max_batch_size=8)
    prompt = prompts(1, seed=10)[0]

    def sampled(rid: str, seed: int, **kw) -> EngineRequest:
        params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.5, seed=seed, **kw)
        return EngineRequest(rid, prompt, params)

    reqs = [
        sampled("s1", 1),
        sampled("s1-again", 1),
        sampled("s2", 2),
        EngineRequest("greedy", prompt, greedy(8)),
        sampled("topk1", 3, top_k=1),  # top-k 1 is greedy whatever the seed
        EngineRequest("logprobs", prompt, greedy(8, top_logprobs=3)),
    ]
    for r in reqs:
        eng.submit(r)
    out = {r.request_id: drain(r)[0] for r in reqs}
    ids = {k: [t.choice.token_id for t in v] for k, v in out.items()}
    assert ids["s1"] == ids["s1-again"] != ids["s2"]  # the seed is the request's own, batch or not
    assert ids["greedy"] == ids["topk1"] == ids["logprobs"] == solo_generate(model, prompt, 8)
    for t in out["logprobs"]:
        top = t.choice.top_logprobs
        assert (
            len(top) == 3 and top[0][0] == t.choice.token_id and top[0][1] == pytest.approx(t.choice.logprob)
        )
        assert top[0][1] >= top[1][1] >= top[2][1]
    # alone, the same seed gives the same tokens as in the batch
    again = sampled("s1-alone", 1)
    eng.submit(again)
    assert [t.choice.token_id for t in drain(again)[0]] == ids["s1"]


def test_penalties_and_logits_hooks_apply_per_row(engine, model):
    eng = engine()
    prompt = prompts(1, seed=11)[0]
    banned = solo_generate(model, prompt, 1)[0]

    def ban(history, row):
        row = row.clone()
        row[banned] = float("-inf")
        return row

    hooked = EngineRequest("hooked", prompt, greedy(6, logits_hooks=[ban]))
    penal = EngineRequest("penal", prompt, greedy(12, presence_penalty=100.0))
    plain = EngineRequest("plain", prompt, greedy(6))
    for r in (hooked, penal, plain):
        eng.submit(r)
    hooked_ids = [t.choice.token_id for t in drain(hooked)[0]]
    penal_ids = [t.choice.token_id for t in drain(penal)[0]]
    plain_ids = [t.choice.token_id for t in drain(plain)[0]]
    assert banned not in hooked_ids and plain_ids[0] == banned
    assert len(set(penal_ids)) == len(penal_ids)  # a huge presence penalty never repeats a token
    assert plain_ids == solo_generate(model, prompt, 6)  # its neighbours' settings did not touch it


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine):
    eng = engine()

    def boom(history, row):
        raise RuntimeError("hook failed")

    bad = EngineRequest("bad", prompts(1)[0], greedy(4, logits_hooks=[boom]))
    eng.submit(bad)
    tokens, finish = drain(bad)
    assert finish.reason == FINISH_ERROR and isinstance(finish.error, RuntimeError) and tokens == []
    good = EngineRequest("good", prompts(1, seed=2)[0], greedy(3))
    eng.submit(good)
    assert drain(good)[1].reason == FINISH_LENGTH


def test_sampling_params_from_request_parameters():
    eos = {2}
    assert not sampling_params({}, 5, eos).do_sample
    assert not sampling_params({"temperature": 0}, 5, eos).do_sample
    p = sampling_params({"temperature": 0.7, "seed": 9, "top_p": 0.9, "top_k": 5}, 5, eos)
    assert (p.do_sample, p.temperature, p.seed, p.top_p, p.top_k) == (True, 0.7, 9, 0.9, 5)
    assert sampling_params({"top_p": 0.5}, 5, eos).do_sample
    assert sampling_params({"do_sample": True}, 5, eos).seed is not None  # drawn, and reported back
    p = sampling_params({"frequency_penalty": 0.5, "presence_penalty": -1, "repetition_penalty": 1.2}, 5, eos)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert p.stop_token_ids == frozenset(eos) and p.max_new_tokens == 5


# One request's failure is its own


def _assert_steps_tile_busy_time(eng: BatchingEngine, reqs: list[EngineRequest]) -> None:
    """Every step's time, failed ones included, is split across its requests, and adds up to the busy time."""
    by_request = {r.request_id: 0 for r in reqs}
    for step in eng.steps:
        assert sum(step.shares_ns) == step.step_ns
        for rid, share in zip(step.request_ids, step.shares_ns, strict=True):
            by_request[rid] += share
    assert sum(s.step_ns for s in eng.steps) == eng.busy_ns
    assert by_request == {r.request_id: r.compute_ns for r in reqs}
    assert sum(by_request.values()) == eng.busy_ns


def _hold_engine(eng: BatchingEngine) -> tuple[EngineRequest, threading.Event]:
    """A request whose first token holds the engine inside its step until released: what is submitted meanwhile
    waits together, and joins in one group prefill."""
    held, release = threading.Event(), threading.Event()

    def on_token(choice):
        held.set()
        release.wait(timeout=60)
        return None, None

    holder = EngineRequest("holder", prompts(1, seed=30)[0], greedy(3), on_token=on_token)
    eng.submit(holder)
    assert held.wait(timeout=60)
    return holder, release


def test_a_hook_or_callback_that_fails_for_one_request_fails_only_it(engine, model):
    eng = engine(max_batch_size=8)
    good = prompts(3, seed=20)
    calls = {"hook": 0}

    def hook_fails_third_time(history, row):
        calls["hook"] += 1
        if calls["hook"] == 3:
            raise RuntimeError("grammar failed for this request")
        return row

    def callback_fails_second_time(choice, seen=[]):  # noqa: B006 (its own count)
        seen.append(choice)
        if len(seen) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad token text")
        return None, None

    bad_hook = EngineRequest(
        "bad-hook", prompts(1, seed=21)[0], greedy(8, logits_hooks=[hook_fails_third_time])
    )
    bad_cb = EngineRequest("bad-cb", prompts(1, seed=22)[0], greedy(8), on_token=callback_fails_second_time)
    goods = [EngineRequest(f"good-{i}", p, greedy(8)) for i, p in enumerate(good)]
    holder, release = _hold_engine(eng)  # so that they all join in one group and decode together
    reqs = [bad_hook, bad_cb, *goods]
    for r in reqs:
        eng.submit(r)
    release.set()
    results = {r.request_id: drain(r) for r in reqs}
    tokens, finish = results["bad-hook"]
    assert finish.reason == FINISH_ERROR and isinstance(finish.error, RuntimeError) and len(tokens) == 2
    tokens, finish = results["bad-cb"]
    assert finish.reason == FINISH_ERROR and isinstance(finish.error, UnicodeDecodeError) and len(tokens) == 1
    for r, prompt in zip(goods, good, strict=True):
        tokens, finish = results[r.request_id]
        assert finish.reason == FINISH_LENGTH
        assert [t.choice.token_id for t in tokens] == solo_generate(model, prompt, 8)
    # they shared steps with the requests that failed, and those paid their shares up to their failure
    failing = [s for s in eng.steps if "bad-hook" in s.request_ids][-1]  # the step it failed in
    assert {"bad-hook", "good-0", "good-1", "good-2"} <= set(failing.request_ids)
    assert all(r.compute_ns > 0 for r in reqs)
    assert drain(holder)[1].reason == FINISH_LENGTH
    _assert_steps_tile_busy_time(eng, [holder, *reqs])


def test_a_prompt_that_breaks_a_group_prefill_fails_alone_and_the_group_goes_on(engine, model):
    eng = engine(max_batch_size=8, prefill_group_min=2)
    holder, release = _hold_engine(eng)
    good = prompts(2, seed=23)
    # an id past the embedding table: bad input that got past validation
    bad = EngineRequest("bad-prompt", [5, 7, VOCAB + 3, 9], greedy(4))
    goods = [EngineRequest(f"good-{i}", p, greedy(6)) for i, p in enumerate(good)]
    for r in (goods[0], bad, goods[1]):
        eng.submit(r)
    release.set()
    tokens, finish = drain(bad)
    assert finish.reason == FINISH_ERROR and isinstance(finish.error, IndexError) and tokens == []
    for r, prompt in zip(goods, good, strict=True):
        tokens, finish = drain(r)
        assert finish.reason == FINISH_LENGTH
        assert [t.choice.token_id for t in tokens] == solo_generate(model, prompt, 6)
    assert drain(holder)[1].reason == FINISH_LENGTH
    failed = [s for s in eng.steps if s.kind == "failed"]
    assert [s.request_ids for s in failed] == [["bad-prompt"]]  # the group's failed attempt and its own retry
    assert bad.compute_ns == failed[0].step_ns > 0
    solo_prefills = [s.request_ids for s in eng.steps if s.kind == "prefill"]
    assert ["good-0"] in solo_prefills and ["good-1"] in solo_prefills  # retried alone, in order
    _assert_steps_tile_busy_time(eng, [holder, bad, *goods])


class _FailsOnToken(torch.nn.Module):
    """The real model, whose forward fails for any row fed `poison`: a fault in one sequence's decode step."""

    def __init__(self, model, poison: int) -> None:
        import inspect

        super().__init__()
        self.inner, self.config = model, model.config

        def forward(*args, **kwargs):
            if (kwargs["input_ids"] == poison).any():
                raise RuntimeError("device-side assert for this row")
            return model(*args, **kwargs)

        forward.__signature__ = inspect.signature(model.forward)  # the engine reads the cache argument's name
        self.forward = forward


def test_a_row_that_breaks_a_decode_step_fails_alone_and_the_batch_goes_on(model):
    good, bad_prompt, holder_prompt = prompts(3, seed=24), prompts(1, seed=25)[0], prompts(1, seed=30)[0]
    wanted = {i: solo_generate(model, p, 7) for i, p in enumerate(good)}
    seen = {t for ids in wanted.values() for t in ids} | {t for p in [*good, bad_prompt] for t in p}
    seen |= set(holder_prompt) | set(solo_generate(model, holder_prompt, 3))  # _hold_engine's request
    poison = next(t for t in range(1, VOCAB) if t not in seen)  # 0 pads the prompts of a group
    eng = BatchingEngine(_FailsOnToken(model, poison), "cpu", EngineConfig(max_batch_size=8))
    try:
        calls = [0]

        def force_poison_second(history, row):
            calls[0] += 1
            if calls[0] == 2:
                row = torch.full_like(row, float("-inf"))
                row[poison] = 0.0
            return row

        bad = EngineRequest("bad-row", bad_prompt, greedy(7, logits_hooks=[force_poison_second]))
        goods = [EngineRequest(f"good-{i}", p, greedy(7)) for i, p in enumerate(good)]
        holder, release = _hold_engine(eng)  # so that they all join in one group and decode together
        for r in (goods[0], bad, *goods[1:]):
            eng.submit(r)
        release.set()
        tokens, finish = drain(bad)
        assert finish.reason == FINISH_ERROR and "device-side assert" in str(finish.error)
        assert [t.choice.token_id for t in tokens][-1] == poison
        for i, r in enumerate(goods):
            tokens, finish = drain(r)
            assert finish.reason == FINISH_LENGTH
            # the cache was cut back to before the failed step: no trace of it in their tokens
            assert [t.choice.token_id for t in tokens] == wanted[i]
        failed = [s for s in eng.steps if s.kind == "failed"]
        assert [s.request_ids for s in failed] == [["bad-row"]]
        batch = [s for s in eng.steps if s.kind == "decode" and "bad-row" in s.request_ids]
        assert batch and all(len(s.request_ids) > 1 for s in batch)  # it was in a batch when it failed
        assert drain(holder)[1].reason == FINISH_LENGTH
        _assert_steps_tile_busy_time(eng, [holder, bad, *goods])
    finally:
        eng.close()
