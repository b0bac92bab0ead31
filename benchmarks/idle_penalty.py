"""What a pause costs the next request: one model run in process, back to back and after idle pauses.

    .venv/bin/python benchmarks/idle_penalty.py [--model local/tiny-sentiment] [--pauses 0.05 0.3 1 3]
        [--repeats 6] [--busy] [--json out.json]

It loads one model of the default catalog in this process as a replica does (its executor, torch threads 1, its
warm-up), times `--warmup-runs` runs back to back (the p50 that benchmarks/cold_start.py compares a first request
with), then, for each pause, `--repeats` runs each after sleeping that long. `--busy` keeps one other process
spinning meanwhile, so the machine is never idle: a penalty that stays then is the caches the pause let go cold
(other processes' work), not the processor's idle states. On the 2-core test VM, `local/tiny-sentiment` (1.2 ms
back to back): 2.4-2.8x after 50 ms, 4.4-4.6x after 0.3 s, 5.9-7.5x after 1 s, 11-12x after 3 s, busy or not.

A replica's first request after its ready line comes after such a pause; on a small model the pause, not the
replica's warm-up, sets how slow it is (benchmarks/cold_start.py reports `first_over_after_idle`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(
    model_id: str, pauses: list[float], repeats: int, warm_runs: int, store: str | None = None
) -> dict[str, Any]:
    from benchmarks.cold_start import BODIES  # the same request as cold_start's first-request figures
    from models.executor import ModelExecutor
    from serving.config import Settings
    from serving.routes.registry import ADAPTERS
    from serving.warmup import internal_context, warm_up

    settings = Settings.load({"model_store": store} if store else {}, env={})
    spec = settings.catalog().get(model_id)
    if spec is None:
        raise SystemExit(f"{model_id} is not in the default catalog")
    executor = ModelExecutor(spec, settings.load_options(), torch_threads=1)
    warm_up(executor, calibrate_steps=False)
    request = ADAPTERS[spec.task].parse(BODIES[spec.task], spec, internal_context(spec.id, "bench")).request

    def run_ms() -> float:
        started = time.perf_counter()
        executor.run(request)
        return (time.perf_counter() - started) * 1000

    back_to_back = statistics.median(run_ms() for _ in range(warm_runs))
    after: dict[str, Any] = {}
    for pause in pauses:
        runs = []
        for _ in range(repeats):
            time.sleep(pause)
            runs.append(run_ms())
        p50 = statistics.median(runs)
        after[str(pause)] = {"p50_ms": round(p50, 2), "over_back_to_back": round(p50 / back_to_back, 2)}
    return {"model": model_id, "back_to_back_p50_ms": round(back_to_back, 2), "after_pause_s": after}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="local/tiny-sentiment")
    parser.add_argument("--pauses", type=float, nargs="+", default=[0.05, 0.3, 1.0, 3.0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--warmup-runs", type=int, default=50, help="runs back to back, after the warm-up")
    parser.add_argument("--busy", action="store_true", help="one other process spins meanwhile")
    parser.add_argument("--store", help="the model store (default: the settings' own)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        result = measure(args.model, args.pauses, args.repeats, args.warmup_runs, args.store)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    result["busy_neighbour"] = args.busy
    print(
        f"{result['model']}: back to back p50 {result['back_to_back_p50_ms']} ms (busy neighbour: {args.busy})"
    )
    for pause, figures in result["after_pause_s"].items():
        print(
            f"  after {pause:>5} s idle: p50 {figures['p50_ms']:7.2f} ms  {figures['over_back_to_back']:5.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
