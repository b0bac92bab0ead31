"""The runner against a real HTTP server on 127.0.0.1 (the wire-contract stand-in): closed and open loop,
streaming metrics, errors, warm-up, and the billing headers."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from bench.report import summarize
from bench.runner import LoadSpec, arrival_schedule, run_point
from bench.workloads import WorkloadParams, builtin_workload

CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def run(url: str, task: str, model: str, load: LoadSpec, params: WorkloadParams | None = None, **kw):
    return asyncio.run(run_point(url, builtin_workload(task, model, params), load, **kw))


def test_closed_loop_sends_exactly_n_requests_at_most_c_at_once(bench_standin) -> None:
    state = bench_standin.reset(compute_s=0.005)
    point = run(
        bench_standin.url,
        "text-classification",
        "local/tiny-sentiment",
        LoadSpec(concurrency=3, requests=24, warmup_requests=2),
    )
    assert [r.index for r in point.results] == list(range(24))
    assert all(r.ok for r in point.results), [r.error for r in point.results if not r.ok]
    assert state.requests_seen == 24 + 2  # the warm-up reached the server but is not in the results
    assert 1 <= state.max_in_flight_seen <= 3
    for r in point.results:
        assert r.scheduled_s <= r.sent_s <= r.end_s
        assert r.inference_id and r.request_id == r.client_request_id  # x-request-id echoes ours
    s = summarize(point)
    assert s["requests"] == s["ok"] == 24 and s["failed"] == 0
    assert s["throughput_rps"] > 0 and s["latency_seconds"]["count"] == 24
    assert s["ttft_seconds"] is None  # not a stream


def test_closed_loop_duration_bound(bench_standin) -> None:
    bench_standin.reset(compute_s=0.002)
    point = run(
        bench_standin.url,
        "feature-extraction",
        "sentence-transformers/all-MiniLM-L6-v2",
        LoadSpec(concurrency=2, duration_s=0.3),
    )
    assert point.results
    # Nothing is launched after the deadline: each request is scheduled (decided) before it; building and
    # sending it may take a moment more on a loaded machine.
    assert all(r.scheduled_s < 0.3 for r in point.results)


def test_headers_give_compute_and_exact_cost(bench_standin) -> None:
    state = bench_standin.reset()
    point = run(
        bench_standin.url,
        "text-to-image",
        "local/tiny-flux",
        LoadSpec(concurrency=2, requests=6),
        WorkloadParams(width=16, height=16, num_inference_steps=2),
    )
    by_id = {c["request_id"]: c for c in state.charges}
    assert len(by_id) == 6
    for r in point.results:
        charge = by_id[r.inference_id]
        assert r.cost_source == "header"
        assert r.cost_usd == Decimal(charge["cost_nanousd"]) / 10**9
        assert r.compute_seconds == Decimal(charge["compute_ms"]) / 1000
        assert r.compute_type == "cpu-basic"
        assert r.response_bytes > 0
    cost = summarize(point)["cost"]
    total_nanousd = sum(c["cost_nanousd"] for c in state.charges)
    assert Decimal(cost["total_usd"]) == Decimal(total_nanousd) / 10**9
    assert (
        Decimal(cost["billed_compute_seconds"]) == Decimal(sum(c["compute_ms"] for c in state.charges)) / 1000
    )
    assert cost["compute_types"] == {"cpu-basic": 6}
    assert cost["cost_source"] == "header" and cost["requests_priced"] == 6


def test_open_loop_launches_on_schedule_and_measures_from_it(bench_standin) -> None:
    bench_standin.reset(compute_s=0.002)
    load = LoadSpec(mode="open", rate_rps=80.0, requests=30, seed=5)
    point = run(bench_standin.url, "text-classification", "local/tiny-sentiment", load)
    expected = arrival_schedule(80.0, 5, requests=30, duration_s=None)
    assert [r.scheduled_s for r in point.results] == expected
    assert all(r.ok for r in point.results)
    # launched at (never before) its arrival, and latency counts from the arrival, not from the send
    assert all(r.sent_s >= r.scheduled_s - 0.002 for r in point.results)
    assert all(r.latency_s == r.end_s - r.scheduled_s for r in point.results)
    assert summarize(point)["offered_rate_rps"] == 80.0


def test_open_loop_does_not_wait_for_answers(bench_standin) -> None:
    # each answer takes 0.2 s; 10 arrivals at 200/s come within ~0.05 s: the server must hold several at once
    state = bench_standin.reset(compute_s=0.2)
    load = LoadSpec(mode="open", rate_rps=200.0, requests=10, seed=1)
    point = run(bench_standin.url, "feature-extraction", "sentence-transformers/all-MiniLM-L6-v2", load)
    assert all(r.ok for r in point.results)
    assert state.max_in_flight_seen > 1  # a closed loop of 1 could never exceed 1


def test_chat_stream_ttft_and_inter_token_latency(bench_standin) -> None:
    bench_standin.reset(compute_s=0.003)
    point = run(
        bench_standin.url,
        "chat",
        CHAT_MODEL,
        LoadSpec(concurrency=2, requests=4),
        WorkloadParams(max_tokens=6),
    )
    for r in point.results:
        assert r.ok, r.error
        assert r.tokens == 6  # the usage chunk's count
        assert len(r.token_times_s) == 6 and len(r.inter_token_s) == 5
        assert r.scheduled_s < r.first_token_s <= r.token_times_s[-1] <= r.end_s
        assert 0 < r.ttft_s < r.latency_s
        assert r.cost_usd is None  # a stream's headers cannot carry its cost
    s = summarize(point)
    assert s["ttft_seconds"]["count"] == 4
    assert s["inter_token_latency_seconds"]["count"] == 4 * 5
    assert s["tokens"] == 24 and s["tokens_per_second"] > 0


def test_tgi_stream_and_model_chat_route(bench_standin) -> None:
    bench_standin.reset(compute_s=0.002)
    gen = run(
        bench_standin.url, "text-generation", CHAT_MODEL, LoadSpec(requests=3), WorkloadParams(max_tokens=4)
    )
    assert all(r.ok and r.tokens == 4 and len(r.token_times_s) == 4 for r in gen.results)
    chat = run(
        bench_standin.url,
        "chat",
        CHAT_MODEL,
        LoadSpec(requests=2),
        WorkloadParams(max_tokens=3, chat_route="model"),
    )
    assert all(r.ok and r.tokens == 3 for r in chat.results)
    plain = run(
        bench_standin.url,
        "chat",
        CHAT_MODEL,
        LoadSpec(requests=2),
        WorkloadParams(max_tokens=3, stream=False),
    )
    assert all(r.ok and r.tokens == 3 and r.first_token_s is None and r.cost_usd for r in plain.results)


def test_errors_are_counted_by_status(bench_standin) -> None:
    bench_standin.reset(fail_every=4)
    point = run(bench_standin.url, "text-classification", "local/tiny-sentiment", LoadSpec(requests=12))
    s = summarize(point)
    assert s["failed"] == 3 and s["ok"] == 9
    assert s["errors_by_status"] == {"503": 3}
    assert all(r.error == "Model is overloaded" for r in point.results if not r.ok)
    assert s["latency_seconds"]["count"] == 9  # latency is over successes only


def test_unknown_model_and_connection_refused(bench_standin) -> None:
    bench_standin.reset()
    point = run(bench_standin.url, "text-classification", "no/such-model", LoadSpec(requests=2))
    assert summarize(point)["errors_by_status"] == {"404": 2}
    # a closed port on loopback: connection errors, not an exception
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    point = run(f"http://127.0.0.1:{port}", "text-classification", "m/x", LoadSpec(requests=2, timeout_s=5))
    assert summarize(point)["errors_by_status"] == {"connection": 2}


def test_token_is_sent_as_bearer(bench_standin) -> None:
    bench_standin.reset(auth_tokens={"s3cret"})
    task, model = "text-classification", "local/tiny-sentiment"
    refused = run(bench_standin.url, task, model, LoadSpec(requests=2))
    assert summarize(refused)["errors_by_status"] == {"401": 2}
    allowed = run(bench_standin.url, task, model, LoadSpec(requests=2), token="s3cret")
    assert summarize(allowed)["ok"] == 2
