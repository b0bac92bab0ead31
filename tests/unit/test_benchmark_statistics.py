"""The statistics of benchmarks/metering_overhead.py: paired per-round ratios, their 95 % interval, CPU ratio."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "metering_overhead.py"
_spec = importlib.util.spec_from_file_location("metering_overhead", _PATH)
mo = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("metering_overhead", mo)  # its dataclasses look their module up
_spec.loader.exec_module(mo)


def arm(name: str, rnd: int, rps: float, machine_ms: float) -> object:
    return mo.ArmResult(
        name=name,
        round=rnd,
        app="a",
        path="/",
        clients=8,
        duration_s=3.0,
        requests_ok=int(rps * 3),
        errors=0,
        throughput_rps=rps,
        p50_ms=10.0,
        p99_ms=20.0,
        mean_ms=11.0,
        cpu_ms_per_request={"ingress": machine_ms / 2, "machine": machine_ms},
    )


def test_t95_matches_the_table_and_is_conservative_between_rows() -> None:
    assert mo.t95(1) == 12.706
    assert mo.t95(9) == 2.262
    assert mo.t95(21) == 2.064  # between 20 and 24: the larger quantile (the wider interval)
    assert mo.t95(500) == 1.96
    with pytest.raises(ValueError):
        mo.t95(0)


def test_the_interval_holds_the_mean_ratio_and_narrows_with_more_rounds() -> None:
    ratios = [0.95, 0.97, 0.93, 0.99, 0.96]
    low, high = mo.ratio_ci95(ratios)
    geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
    assert low < geo < high
    half = 2.776 * statistics.stdev(math.log(r) for r in ratios) / math.sqrt(5)
    assert (low, high) == pytest.approx((geo * math.exp(-half), geo * math.exp(half)))
    wide = mo.ratio_ci95(ratios)
    narrow = mo.ratio_ci95(ratios * 4)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert mo.ratio_ci95([0.9]) == pytest.approx((0.9, 0.9))
    inverse = mo.ratio_ci95([1 / r for r in ratios])  # b/a: the same interval, inverted
    assert inverse == pytest.approx((1 / high, 1 / low))


def test_compare_pairs_rounds_and_summarize_reports_the_cost_with_its_interval() -> None:
    arms = []
    for rnd, (on, off) in enumerate([(95.0, 100.0), (190.0, 200.0), (97.0, 100.0), (93.0, 100.0)]):
        arms += [arm("cls metering on", rnd, on, 10.4), arm("cls metering off", rnd, off, 10.0)]
    checks = [
        {"charges": 3, "expected": 3, "failed_requests": 0},
        {"charges": 5, "expected": 4, "failed_requests": 1},
    ]
    summary, comparisons = mo.summarize(arms, checks, "metering")
    c = summary["metering_on_over_off"]
    assert c["throughput_ratio_per_round"] == [0.95, 0.95, 0.97, 0.93]  # paired: a fast round stays a pair
    assert c["throughput_ratio"] == round((95 + 190 + 97 + 93) / (100 + 200 + 100 + 100), 3)
    low, high = summary["metering_throughput_cost_percent_ci95"]
    assert low < 100 * (1 - 0.95) < high
    assert summary["metering_machine_cpu_cost_percent"] == 4.0
    assert summary["ledger_one_charge_per_ok_response"] is True  # a request without a 200 may have run
    assert [label for label, _ in comparisons] == ["metering on / off"]
    for bad in (
        {"charges": 2, "expected": 3, "failed_requests": 5},
        {"charges": 5, "expected": 3, "failed_requests": 1},
    ):
        assert mo.summarize(arms, [bad], "metering")[0]["ledger_one_charge_per_ok_response"] is False


def test_the_memory_spool_arm_splits_metering_cost_into_the_disk_and_the_rest() -> None:
    arms = []
    for rnd, (on, memory, off) in enumerate(
        [(90.0, 98.0, 100.0), (180.0, 196.0, 200.0), (91.0, 97.0, 100.0)]
    ):
        arms += [
            arm("cls metering on", rnd, on, 10.6),
            arm("cls spool in memory", rnd, memory, 10.2),
            arm("cls metering off", rnd, off, 10.0),
        ]
    summary, comparisons = mo.summarize(arms, [], "metering")
    assert [label for label, _ in comparisons] == [
        "metering on / off",
        "spool in memory / off",
        "on / spool in memory",
    ]
    assert summary["metering_memory_spool_over"]["throughput_ratio_per_round"] == [0.98, 0.98, 0.97]
    assert summary["metering_disk_over"]["throughput_ratio_per_round"] == [0.918, 0.918, 0.938]
    assert summary["metering_memory_spool_cost_percent"] == round(100 * (1 - 391 / 400), 1)
    low, high = summary["metering_disk_cost_percent_ci95"]
    assert low < summary["metering_disk_cost_percent"] < high
    # a run without that arm (an older result file) reports the total only
    plain = [a for a in arms if a.name != "cls spool in memory"]
    assert "metering_disk_cost_percent" not in mo.summarize(plain, [], "metering")[0]


def test_llm_metering_cost_pairs_metered_and_unmetered_arms_of_the_same_engine_by_level():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "llm_batching.py"
    spec = importlib.util.spec_from_file_location("llm_batching", path)
    llm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(llm)

    def doc(*levels: tuple[int, float]) -> dict:
        return {
            "points": [
                {"level": level, "summary": {"tokens_per_second": tps, "ttft_seconds": {"p50": 0.5}}}
                for level, tps in levels
            ]
        }

    runs = [
        ("batching", doc((8, 30.0))),
        ("batching-unmetered", doc((8, 32.0))),
        ("generate", doc((8, 12.0))),  # no unmetered arm of its own: left out
        ("batching", doc((8, 28.0))),
        ("batching-unmetered", doc((8, 30.0))),
    ]
    assert llm.metering_cost(runs) == [(8, [30.0, 28.0], [32.0, 30.0])]


def test_the_disk_sync_floor_is_measured_in_the_spool_directory_and_bounds_the_cost(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    floor = mo.disk_sync_floor(tmp_path / "spool", rounds=20)
    assert floor["rounds"] == 20
    assert 0 < floor["p50_ms"] <= floor["p90_ms"]
    assert list((tmp_path / "spool").iterdir()) == []  # the probe's spool is gone
    plain = mo.disk_sync_floor(tmp_path / "spool", rounds=5, direct_io=False)
    assert plain["direct_io"] is False and plain["p50_ms"] > 0
    # 8 clients at 500 req/s: a 16 ms cycle; a 1 ms sync on top of it is 1/17 of the new cycle
    assert mo.sync_floor_percent(1.0, 500, 8) == round(100 / 17, 1)
    assert mo.sync_floor_percent(0.0, 500, 8) == 0.0


def test_diagnostic_settings_parse_as_yaml_values_for_both_metering_apps_or_the_memory_one() -> None:
    pair = ["--memspool-set", "spool_dir=/var/tmp/x", "--memspool-set", "spool_inline_sync_below_s=0"]
    args = mo.parse_args(["--metering-set", "spool_inline_sync_below_s=1", *pair])
    assert args.metering_set == {"spool_inline_sync_below_s": 1}
    assert args.memspool_set == {"spool_dir": "/var/tmp/x", "spool_inline_sync_below_s": 0}
    with pytest.raises(SystemExit):
        mo.parse_args(["--memspool-set", "no-equals-sign"])
