"""Workloads (request bodies per the wire contract, JSONL files) and the report's arithmetic."""

from __future__ import annotations

import io
from decimal import Decimal

import numpy as np
import pytest

from bench.client import RequestResult, parse_decimal
from bench.report import apply_price, cost_summary, distribution, money, percentile
from bench.runner import LoadSpec
from bench.session import LiveProgress
from bench.workloads import (
    READ_IMAGE,
    READ_JSON,
    READ_SSE_CHAT,
    READ_SSE_TGI,
    TASKS,
    WorkloadError,
    WorkloadParams,
    builtin_workload,
    load_jsonl,
    normalize_task,
)


def test_builtin_bodies_follow_the_wire_contract() -> None:
    p = WorkloadParams(max_tokens=7, width=64, height=32, num_inference_steps=4, seed=3)
    img = builtin_workload("text-to-image", "local/tiny-flux", p).request(0)
    assert img.path == "/models/local/tiny-flux" and img.read == READ_IMAGE
    assert img.headers == {"Accept": "image/png"}
    assert img.body["parameters"] == {"width": 64, "height": 32, "num_inference_steps": 4, "seed": 3}
    assert isinstance(img.body["inputs"], str)

    chat = builtin_workload("chat", "org/m", p).request(1)
    assert chat.path == "/v1/chat/completions" and chat.read == READ_SSE_CHAT and chat.streaming
    assert chat.body["model"] == "org/m" and chat.body["stream"] is True and chat.body["max_tokens"] == 7
    assert chat.body["messages"][0]["role"] == "user"
    assert chat.body["stream_options"] == {"include_usage": True}
    routed = builtin_workload("chat", "org/m", WorkloadParams(chat_route="model")).request(0)
    assert routed.path == "/models/org/m/v1/chat/completions"

    gen = builtin_workload("text-generation", "org/m", p).request(0)
    assert gen.read == READ_SSE_TGI and gen.body["stream"] is True
    assert gen.body["parameters"]["max_new_tokens"] == 7
    plain = builtin_workload("text-generation", "org/m", WorkloadParams(stream=False)).request(0)
    assert plain.read == READ_JSON and plain.body["stream"] is False

    emb = builtin_workload("embeddings", "org/e").request(0)
    assert emb.read == READ_JSON and set(emb.body) == {"inputs"}  # feature-extraction: no parameters key
    sim = builtin_workload("sentence-similarity", "org/e").request(0)
    assert set(sim.body["inputs"]) == {"source_sentence", "sentences"} and sim.body["parameters"] == {}
    cls = builtin_workload("text-classification", "org/c").request(0)
    assert isinstance(cls.body["inputs"], str)


def test_items_are_used_round_robin() -> None:
    w = builtin_workload("text-classification", "org/c")
    n = len(w.items)
    assert w.request(0).body == w.request(n).body != w.request(1).body


def test_jsonl_items_and_errors(tmp_path) -> None:
    f = tmp_path / "w.jsonl"
    f.write_text(
        '# prompts\n{"prompt": "a cat", "width": 128, "height": 128, "seed": 9}\n\n"a dog"\n'
        '{"body": {"inputs": "raw", "parameters": {"guidance_scale": 1.0}}}\n'
    )
    w = load_jsonl(f, "text-to-image", "local/tiny-flux", WorkloadParams(width=64, height=64))
    assert len(w.items) == 3 and w.source == str(f)
    first = w.request(0).body
    assert first["parameters"]["width"] == 128 and first["parameters"]["seed"] == 9
    assert w.request(1).body["inputs"] == "a dog" and w.request(1).body["parameters"]["width"] == 64
    assert w.request(2).body == {"inputs": "raw", "parameters": {"guidance_scale": 1.0}}

    f.write_text('{"prompt": "ok"}\n{not json}\n')
    with pytest.raises(WorkloadError, match=r"w.jsonl:2: not JSON"):
        load_jsonl(f, "chat", "m")
    f.write_text('{"source_sentence": "a"}\n')
    with pytest.raises(WorkloadError, match="needs `sentences`"):
        load_jsonl(f, "sentence-similarity", "m")
    f.write_text('{"wrong": 1}\n')
    with pytest.raises(WorkloadError, match="item 1: a chat item needs one of messages, prompt"):
        load_jsonl(f, "chat", "m")
    f.write_text("")
    with pytest.raises(WorkloadError, match="no items"):
        load_jsonl(f, "chat", "m")


def test_task_names() -> None:
    assert normalize_task("Conversational") == "chat"
    assert all(normalize_task(t) == t for t in TASKS)
    with pytest.raises(WorkloadError) as err:
        normalize_task("painting")
    assert err.value.status_code == 400


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        xs = list(rng.exponential(0.1, n))
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    d = distribution([3.0, 1.0, 2.0])
    assert d == {
        "p50": 2.0,
        "p90": 2.8,
        "p99": pytest.approx(2.98),
        "max": 3.0,
        "min": 1.0,
        "mean": 2.0,
        "count": 3,
    }
    assert distribution([]) is None


def _ok(i: int, compute: str | None, cost: str | None = None) -> RequestResult:
    r = RequestResult(i, 0.0, 0.0, 0.1, 200, compute_seconds=None if compute is None else Decimal(compute))
    if cost is not None:
        r.cost_usd, r.cost_source = Decimal(cost), "header"
    return r


def test_price_fallback_and_cost_summary_are_exact() -> None:
    results = [_ok(0, "0.1"), _ok(1, "0.2"), _ok(2, "0.333", cost="0.5"), _ok(3, None)]
    apply_price(results, Decimal("0.00125"))  # nvidia-h100: 4.50 USD / h
    assert results[0].cost_usd == Decimal("0.000125") and results[0].cost_source == "price"
    assert results[1].cost_usd == Decimal("0.00025")
    assert results[2].cost_usd == Decimal("0.5") and results[2].cost_source == "header"  # the header wins
    assert results[3].cost_usd is None  # no compute, no price
    c = cost_summary(results, wall_s=0.5, replicas=2)
    assert c["billed_compute_seconds"] == "0.633"
    assert c["total_usd"] == "0.500375" and c["requests_priced"] == 3
    assert c["per_request_usd"] == "0.166791667"  # rounded half-up to the nano-dollar
    assert c["per_1000_requests_usd"] == "166.791667"
    assert c["cost_source"] == "header+price"
    assert c["utilisation"] == pytest.approx(0.633)  # 0.633 s / (0.5 s x 2 replicas)
    assert c["requests_with_compute"] == 3


def test_money_and_header_parsing() -> None:
    assert money(Decimal("0.000000050")) == "0.00000005"
    assert money(Decimal("1E+2")) == "100" and money(Decimal("0.000")) == "0" and money(None) is None
    assert parse_decimal(" 0.593 ") == Decimal("0.593")
    assert parse_decimal("NaN") is None and parse_decimal("abc") is None and parse_decimal(None) is None


def test_progress_bar_shows_throughput_and_errors() -> None:
    out = io.StringIO()
    with LiveProgress(True, stream=out) as bar:
        bar.start_level(LoadSpec(concurrency=2, requests=3))
        bar.update(RequestResult(0, 0, 0, 0.1, 200))
        bar.update(RequestResult(1, 0, 0, 0.1, 503, error="busy"))
    text = out.getvalue()
    assert "c=2" in text and "req/s" in text and "errors 1" in text and "2/3" in text
    silent = io.StringIO()
    with LiveProgress(False, stream=silent) as bar:
        bar.start_level(LoadSpec(requests=1))
        bar.update(RequestResult(0, 0, 0, 0.1, 200))
    assert silent.getvalue() == ""
