"""benchmarks/idle_penalty.py runs end to end on a real tiny model (figures are the benchmark's, never asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "idle_penalty.py"
_spec = importlib.util.spec_from_file_location("idle_penalty", _PATH)
idle_penalty = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(idle_penalty)


def test_it_times_the_model_back_to_back_and_after_each_pause(model_store) -> None:
    result = idle_penalty.measure("local/tiny-sentiment", [0.01, 0.02], 2, 3, str(model_store))
    assert result["model"] == "local/tiny-sentiment" and result["back_to_back_p50_ms"] > 0
    assert list(result["after_pause_s"]) == ["0.01", "0.02"]
    for figures in result["after_pause_s"].values():
        assert figures["p50_ms"] > 0
        ratio = figures["p50_ms"] / result["back_to_back_p50_ms"]  # of the rounded figures: within rounding
        assert abs(figures["over_back_to_back"] - ratio) <= 0.01 * max(1.0, ratio)
