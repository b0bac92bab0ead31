"""The pure parts of benchmarks/peers.py: wrk's script and answer, the phases' Ray settings, the round order,
and the statistics glue (paired ratios against LitServe, p50 differences, the batching ceiling)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"
_spec = importlib.util.spec_from_file_location("peers", _PATH)
peers = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("peers", peers)  # its dataclasses look their module up
_spec.loader.exec_module(peers)
mo = peers.mo

# What wrk 4.1 printed here with peers.wrk_script's `done` (16 connections against LitServe, 3 s).
WRK_STDOUT = """Running 3s test @ http://127.0.0.1:8711/models/sentence-transformers/all-MiniLM-L6-v2
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   125.22ms   41.44ms 243.60ms   63.92%
  388 requests in 3.05s, 3.04MB read
Requests/sec:    127.27
WRK_RESULT {"requests": 388, "duration_us": 3048523, "status_errors": 0, "connect_errors": 0, "read_errors": 0, \
"write_errors": 0, "timeouts": 0, "p50_us": 118622, "p90_us": 185306, "p99_us": 237810, "mean_us": 125219.4, \
"max_us": 243596}
"""


def test_wrk_script_posts_the_body_and_headers_and_prints_one_result_line() -> None:
    script = peers.wrk_script({"inputs": "a b"}, {"Authorization": "Bearer hfi_x"})
    assert 'wrk.method = "POST"' in script
    body = re.search(r"wrk\.body = \[(=+)\[(.*)\]\1\]", script)
    assert body is not None and json.loads(body.group(2)) == {"inputs": "a b"}
    assert 'wrk.headers["Content-Type"] = "application/json"' in script
    assert 'wrk.headers["Authorization"] = "Bearer hfi_x"' in script
    assert "done = function(summary, latency, requests)" in script
    assert "io.write(string.format('WRK_RESULT {" in script


def test_wrk_script_picks_a_long_bracket_level_the_body_does_not_close() -> None:
    body = {"inputs": "]=] and ]==]"}
    script = peers.wrk_script(body, {})
    got = re.search(r"wrk\.body = \[(=+)\[(.*)\]\1\]\n", script)
    assert got is not None and got.group(1) == "==="
    assert json.loads(got.group(2)) == body


def test_parse_wrk_reads_the_result_line_and_refuses_output_without_one() -> None:
    got = peers.parse_wrk(WRK_STDOUT)
    assert got["requests"] == 388 and got["p50_us"] == 118622 and got["duration_us"] == 3048523
    with pytest.raises(ValueError, match="WRK_RESULT"):
        peers.parse_wrk("Running 3s test @ http://127.0.0.1:1/\nunable to connect")


def test_wrk_arm_counts_only_answers_under_400_as_done() -> None:
    wrk = {**peers.parse_wrk(WRK_STDOUT), "status_errors": 8, "read_errors": 2, "timeouts": 1}
    arm = peers.wrk_arm("hfi-tokens emb c16", 3, "hfi-tokens", "/models/x", 16, wrk)
    assert arm.requests_ok == 380
    assert arm.errors == 8 + 2 + 1
    assert arm.throughput_rps == pytest.approx(380 / 3.048523, abs=0.01)
    assert (arm.p50_ms, arm.p99_ms, arm.mean_ms) == (118.62, 237.81, 125.22)
    assert (arm.round, arm.app, arm.clients) == (3, "hfi-tokens", 16)


def test_phase_env_sets_each_phase_mode_and_never_passes_the_shell_s_on() -> None:
    base = {"PATH": "/bin", "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    serve_env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    ha = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}

    default = peers.phase_env(base, "serve-default", serve_env, ha)
    assert not any(k in default for k in peers.RAY_MODE_KEYS)
    assert default["PATH"] == "/bin" and default["RAY_AUTH_MODE"] == "disabled"

    throughput = peers.phase_env(base, "serve-throughput", serve_env, ha)
    assert throughput["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in throughput

    hfi = peers.phase_env(base, "hfi", serve_env, ha)
    assert hfi["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and hfi["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in peers.phase_env(base, "hfi", serve_env, None)
    with pytest.raises(ValueError, match="unknown phase"):
        peers.phase_env(base, "serve-fast", serve_env, ha)


def test_haproxy_ports_move_every_fixed_port() -> None:
    got = peers.haproxy_ports([41001, 41002, 41003])
    assert got == {
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "41001",
        "RAY_SERVE_HAPROXY_STATS_PORT": "41002",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "41003",
    }


def test_round_order_reverses_every_other_round() -> None:
    arms = ["a", "b", "c"]
    assert peers.round_order(arms, 0) == ["a", "b", "c"]
    assert peers.round_order(arms, 1) == ["c", "b", "a"]
    assert peers.round_order(arms, 4) == ["a", "b", "c"]
    assert arms == ["a", "b", "c"]  # the list itself is left alone


def test_arms_of_one_comparison_run_next_to_each_other() -> None:
    listed = [peers.Arm(stack, "emb", c) for stack in ("litserve", "serve", "hfi-tokens") for c in (1, 16)]
    listed += [peers.Arm("hfi-tokens", "cls", 1), peers.Arm("inprocess", "cls", 1)]
    got = [a.name for a in peers.by_comparison(listed)]
    assert got == [
        "litserve emb c16",
        "serve emb c16",
        "hfi-tokens emb c16",
        "litserve emb c1",
        "serve emb c1",
        "hfi-tokens emb c1",
        "hfi-tokens cls c1",
        "inprocess cls c1",
    ]


def test_difference_ci95_is_students_t_on_the_paired_differences() -> None:
    low, high = peers.difference_ci95([1.0, 2.0, 3.0])
    half = mo.t95(2) * 1.0 / math.sqrt(3)
    assert (low, high) == pytest.approx((2 - half, 2 + half))
    assert peers.difference_ci95([5.0]) == (5.0, 5.0)


def arm(stack: str, workload: str, clients: int, rnd: int, rps: float, p50: float = 10.0) -> object:
    return mo.ArmResult(
        name=peers.arm_name(stack, workload, clients),
        round=rnd,
        app=stack,
        path="/",
        clients=clients,
        duration_s=3.0,
        requests_ok=int(rps * 3),
        errors=0,
        throughput_rps=rps,
        p50_ms=p50,
        p99_ms=2 * p50,
        mean_ms=p50,
        cpu_ms_per_request={"machine": 10.0},
    )


def hfi_phase() -> list[object]:
    out = []
    for rnd, (lit, tokens, open_, unbatched) in enumerate([(200, 100, 120, 40), (100, 55, 60, 20)]):
        out += [
            arm("litserve", "emb", 16, rnd, lit),
            arm("hfi-tokens", "emb", 16, rnd, tokens),
            arm("hfi-open", "emb", 16, rnd, open_),
            arm("hfi-open-unbatched", "emb", 16, rnd, unbatched),
            arm("hfi-tokens", "cls", 1, rnd, 40, p50=20.0 + rnd),
            arm("hfi-open", "cls", 1, rnd, 45, p50=18.0),
            arm("inprocess", "cls", 1, rnd, 600, p50=1.5),
            arm(peers.PACED, "cls", 1, rnd, 150, p50=3.0),
        ]
    return out


def test_analyze_pairs_each_stack_with_litserve_by_round_within_its_phase() -> None:
    phases = {
        "hfi": hfi_phase(),
        "serve-default": [arm("litserve", "emb", 16, r, 100) for r in (0, 1)]
        + [arm("serve-default", "emb", 16, r, rps) for r, rps in ((0, 50), (1, 80))],
    }
    got = peers.analyze(phases)
    tokens = got["hfi-tokens emb c16 / litserve [hfi]"]
    assert tokens["throughput_ratio_per_round"] == [0.5, 0.55]
    low, high = tokens["throughput_ratio_ci95"]
    assert low < 0.5 < 0.55 < high
    assert got["serve-default emb c16 / litserve [serve-default]"]["throughput_ratio_per_round"] == [0.5, 0.8]
    assert got["hfi-tokens emb c16 / hfi-open emb c16 [hfi]"]["throughput_ratio_per_round"] == [0.833, 0.917]
    assert got["hfi-open emb c16 / hfi-open-unbatched emb c16 [hfi]"]["throughput_ratio_per_round"] == [
        3.0,
        3.0,
    ]
    # tiny-sentiment and the in-process baseline are never set against LitServe's embeddings
    assert not any(label.startswith(("inprocess", "hfi-tokens cls c1 / litserve")) for label in got)
    assert not any(label.startswith(peers.PACED) for label in got)
    # a stack missing from a run leaves its comparisons out instead of failing
    assert "hfi-tokens emb c1 / litserve [hfi]" not in got


def test_targets_report_the_issue_s_figures_with_their_intervals() -> None:
    phases = {"hfi": hfi_phase()}
    comparisons = peers.analyze(phases)
    goals = peers.targets(phases, comparisons, {"ceiling": 3.2})
    assert goals["emb_16_clients_tokens_over_litserve"]["ratio"] == pytest.approx(155 / 300, abs=1e-3)
    tiny = goals["tiny_sentiment_p50_http_minus_inprocess_ms"]["tokens"]
    assert tiny["difference_ms_per_round"] == [18.5, 19.5]
    assert tiny["difference_ms"] == 19.0 and tiny["inprocess_p50_ms"] == 1.5
    low, high = tiny["difference_ms_ci95"]
    assert low < 18.5 and high > 19.5
    paced = goals["tiny_sentiment_p50_http_minus_inprocess_paced_ms"]["open"]  # against the paced calls
    assert paced["difference_ms_per_round"] == [15.0, 15.0] and paced["inprocess_p50_ms"] == 3.0
    batching = goals["batching_speedup_vs_model_ceiling"]
    assert batching["ratio"] == 3.0 and batching["model_ceiling"] == 3.2
    assert batching["fraction_of_ceiling"] == pytest.approx(3.0 / 3.2, abs=1e-3)
    assert goals["emb_1_client_tokens_over_open"] is None  # not run


def test_parse_args_wants_two_rounds_and_known_phases() -> None:
    args = peers.parse_args(["--phases", "hfi,serve-default", "--rounds", "4"])
    assert args.phases == ["hfi", "serve-default"] and args.rounds == 4
    for bad in (["--rounds", "1"], ["--phases", "hfi,litserve"]):
        with pytest.raises(SystemExit):
            peers.parse_args(bad)
