"""Continuous batching, measured as a user would: `hfi bench` streaming chats against the local stack.

    .venv/bin/python benchmarks/llm_batching.py --model-store ~/.cache/hfi/models      # about 6 minutes

Starts Ray and Serve on 127.0.0.1 with only SmolLM2-135M-Instruct (so no other replica shares the cores), once per
engine (`--engines batching,generate`: the batching engine, and transformers' generate() one request at a time as
the baseline), runs `hfi bench run --task chat --sweep 1,8,16` against each, and prints aggregate tok/s and TTFT
p50 per level with the ratios to 1 client, all from the same run. It also reads the engine's busy seconds and
the ledger's billed seconds for the batching arm (`--check-metering`). Nothing here asserts a time.

What metering costs the engine: `--engines batching,batching-unmetered,batching,batching-unmetered --sweep 8`
alternates the same engine with `metering.enabled` true and false (a fresh stack each arm) and prints the tok/s
ratio of the metered arms to the unmetered ones per level.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parent.parent


def spec(engine: str, max_batch_size: int) -> dict:
    return {
        "id": LLM,
        "task": "text-generation",
        "source": {"path": "smollm2-135m-instruct", "prepare": "smollm2-135m-instruct"},
        "hardware_profile": "cpu-basic",
        "dtype": "float32",
        "max_ongoing_requests": 64,
        "options": {"engine": {"kind": engine, "max_batch_size": max_batch_size}},
        "limits": {"max_new_tokens": 256},
    }


UNMETERED = "-unmetered"


def run_arm(args: argparse.Namespace, arm: str, work: Path, index: int) -> dict:
    engine, metered = arm.removesuffix(UNMETERED), not arm.endswith(UNMETERED)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.net import free_port

    from serving import local

    database_url = f"sqlite:///{work / f'ledger-{arm}.db'}"
    settings = {
        "port": free_port(),
        "model_store": str(Path(args.model_store).expanduser()),
        "offline": True,
        "model_wait_timeout_s": 600,
        "models": [spec(engine, args.max_batch_size)],
        "metering": {
            "enabled": metered,
            "database_url": database_url,
            "spool_dir": str(work / f"spool-{arm}"),
        },
    }
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    url = local.start(settings, ray_temp_dir=ray_tmp)
    try:
        out = work / f"bench-{index}-{arm}.json"
        cmd = [
            str(ROOT / ".venv" / "bin" / "hfi"),
            "bench",
            "run",
            url,
            "--model",
            LLM,
            "--task",
            "chat",
            "--sweep",
            args.sweep,
            "--duration",
            str(args.duration),
            "--max-tokens",
            str(args.max_tokens),
            "--warmup",
            "2",
            "--output",
            str(out),
            "--no-plot",
            "--quiet",
        ]
        if args.check_metering and arm == "batching":
            cmd += ["--ledger", database_url]
        print(f"[{arm}] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())
    finally:
        local.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)  # Ray's logs of the arm
        time.sleep(2)


def summary(doc: dict) -> list[tuple[int, float, float | None]]:
    rows = []
    for point in doc["points"]:
        s = point["summary"]
        ttft = s["ttft_seconds"].get("p50") if s["ttft_seconds"] else None
        rows.append((int(point["level"]), float(s["tokens_per_second"]), ttft))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-store", default="~/.cache/hfi/models")
    parser.add_argument("--engines", default="batching,generate")
    parser.add_argument("--sweep", default="1,8,16")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--check-metering", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="save the per-arm bench JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-bench-"))
    try:
        runs = [(arm, run_arm(args, arm, work, i)) for i, arm in enumerate(args.engines.split(","))]
    finally:  # the arms' ledgers, spools and bench results
        shutil.rmtree(work, ignore_errors=True)
    if args.output:
        args.output.write_text(json.dumps([{"arm": arm, "bench": doc} for arm, doc in runs], indent=1))
    print(f"\nSmolLM2-135M-Instruct, chat, {args.max_tokens} new tokens, streaming, closed loop (hfi bench)")
    print(f"{'engine':20} {'clients':>7} {'tok/s':>8} {'x 1 client':>10} {'TTFT p50':>9}")
    for arm, doc in runs:
        rows = summary(doc)
        base = rows[0][1] if rows and rows[0][0] == 1 else None
        for level, tps, ttft in rows:
            ratio = f"{tps / base:.2f}" if base else "-"
            ttft_s = f"{ttft:.2f} s" if ttft is not None else "-"
            print(f"{arm:20} {level:>7} {tps:>8.1f} {ratio:>10} {ttft_s:>9}")
    for arm, doc in runs:
        if doc.get("reconciliation"):
            print(f"{arm}: ledger reconciliation: {json.dumps(doc['reconciliation'])[:600]}")
    for level, on, off in metering_cost(runs):
        print(
            f"metering cost at {level} clients: {statistics.fmean(on):.1f} tok/s metered, "
            f"{statistics.fmean(off):.1f} unmetered: {100 * (1 - statistics.fmean(on) / statistics.fmean(off)):.1f} %"
            f" (arms: {', '.join(f'{x:.1f}' for x in on)} / {', '.join(f'{x:.1f}' for x in off)})"
        )


def metering_cost(runs: list[tuple[str, dict]]) -> list[tuple[int, list[float], list[float]]]:
    """Per level: the tok/s of every metered and every unmetered arm of the same engine."""
    by_level: dict[int, tuple[list[float], list[float]]] = {}
    engines = {arm.removesuffix(UNMETERED) for arm, _ in runs if arm.endswith(UNMETERED)}
    for arm, doc in runs:
        if arm.removesuffix(UNMETERED) not in engines:
            continue
        for level, tps, _ in summary(doc):
            by_level.setdefault(level, ([], []))[arm.endswith(UNMETERED)].append(tps)
    return [(level, on, off) for level, (on, off) in sorted(by_level.items()) if on and off]


if __name__ == "__main__":
    main()
