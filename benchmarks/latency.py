"""Per-request latency of each default model: in process (the executor alone) vs through HTTP on Ray Serve.

One run, one machine: the in-process figure is the baseline, the HTTP figure is reported as a ratio to it.
Also measures the cold start of `hfi serve` to the first answered request (models already prepared).

    python benchmarks/latency.py [--requests 20] [--json out.json]
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

import httpx

CASES = {
    "local/tiny-flux": (
        "text-to-image",
        {"inputs": "a cat", "parameters": {"seed": 1}},
        "a cat",
        {"seed": 1},
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": (
        "text-generation",
        {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}},
        "The capital of France is",
        {"max_new_tokens": 8},
    ),
    "sentence-transformers/all-MiniLM-L6-v2": (
        "feature-extraction",
        {"inputs": "hello world"},
        "hello world",
        {},
    ),
    "local/tiny-sentiment": ("text-classification", {"inputs": "I love it"}, "I love it", {}),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def in_process(store: str, n: int) -> dict[str, list[float]]:
    from models.types import TaskRequest
    from serving.config import Settings
    from serving.inprocess import InProcessBackend

    settings = Settings.load({"model_store": store, "offline": True}, env={})
    catalog, profiles = settings.validated()
    threads = profiles.get(
        "cpu-basic"
    ).torch_threads  # what the replicas run with, for a like-for-like baseline
    backend = InProcessBackend(catalog, settings.load_options(), torch_threads=threads)
    out: dict[str, list[float]] = {}
    for model, (task, _, inputs, params) in CASES.items():
        ex = backend.executors[model]
        ex.run(TaskRequest(task, inputs, params, accept="image/png"))  # warm-up
        times = []
        for _ in range(n):
            t = time.perf_counter()
            ex.run(TaskRequest(task, inputs, params, accept="image/png"))
            times.append(time.perf_counter() - t)
        out[model] = times
    return out


def over_http(url: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with httpx.Client(timeout=120) as client:
        for model, (_, body, _, _) in CASES.items():
            client.post(
                f"{url}/models/{model}", json=body, headers={"accept": "image/png"}
            ).raise_for_status()
            times = []
            for _ in range(n):
                t = time.perf_counter()
                client.post(
                    f"{url}/models/{model}", json=body, headers={"accept": "image/png"}
                ).raise_for_status()
                times.append(time.perf_counter() - t)
            out[model] = times
    return out


def cold_start(store: str, port: int, work: Path) -> tuple[float, subprocess.Popen]:
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "HFI_MODEL_STORE": store,
        "HF_HUB_OFFLINE": "1",
        "HFI_DATABASE_URL": f"sqlite:///{work / 'ledger.db'}",
        "HFI_SPOOL_DIR": str(work / "spool"),
    }
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--port", str(port)],
        env=env,
        stdout=open(work / "serve.log", "w"),  # noqa: SIM115 (the child owns it)
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = started + 600
    while time.perf_counter() < deadline:
        try:
            r = httpx.post(f"{url}/models/local/tiny-sentiment", json={"inputs": "hi"}, timeout=5)
            if r.status_code == 200:
                return time.perf_counter() - started, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"hfi serve exited: see {work / 'serve.log'}")
        time.sleep(0.5)
    raise TimeoutError("no answer within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--store", default=str(Path.home() / ".cache" / "hfi" / "models"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    prepare_started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "serving.cli", "prepare"],
        check=True,
        env={**os.environ, "HFI_MODEL_STORE": args.store},
        stdout=subprocess.DEVNULL,
    )
    prepare_s = time.perf_counter() - prepare_started
    work = Path(tempfile.mkdtemp(prefix="hfi-latency-"))
    try:
        seconds, proc = cold_start(args.store, args.port, work)
        try:
            http = over_http(f"http://127.0.0.1:{args.port}", args.requests)
        finally:
            proc.terminate()
            proc.wait(60)
    finally:  # the service's settings, ledger and spool
        shutil.rmtree(work, ignore_errors=True)
    local = in_process(args.store, args.requests)
    rows = []
    print(
        f"hfi prepare: {prepare_s:.1f} s (an empty store builds the four default models; a full one checks them)"
    )
    print(f"cold start of `hfi serve` to the first answered request: {seconds:.1f} s (models prepared)")
    print(f"{'model':42} {'in-process p50':>15} {'HTTP p50':>10} {'ratio':>6} {'HTTP p99':>10}")
    for model in CASES:
        a, b = statistics.median(local[model]), statistics.median(http[model])
        rows.append(
            {
                "model": model,
                "in_process_p50_s": a,
                "http_p50_s": b,
                "ratio": b / a,
                "http_p99_s": percentile(http[model], 0.99),
                "in_process_p99_s": percentile(local[model], 0.99),
            }
        )
        print(
            f"{model:42} {a * 1000:13.1f}ms {b * 1000:8.1f}ms {b / a:6.2f} {percentile(http[model], 0.99) * 1000:8.1f}ms"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"prepare_s": prepare_s, "cold_start_s": seconds, "requests": args.requests, "rows": rows},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
