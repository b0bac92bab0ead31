"""Cold start, warm-up and stop of `hfi serve`, measured from outside as a user sees them.

    .venv/bin/python benchmarks/cold_start.py [--catalog default] [--rounds 20] [--json out.json]

It starts `hfi serve` (as `make serve` does, after `hfi prepare`) on a free port, in its own process group, and
measures:
- the time to the ready line (every model that does not load on demand can answer), and to the end of the first
  inference sent after it;
- warm-up: each model's first request after the ready line against the p50 of the `--rounds` that follow (the
  target is first <= 2x p50: the replica's warm-up request took the first-call costs; `--baseline` runs once
  without warm-up first, to compare), and against one request after an idle pause of IDLE_PAUSE_S (what any
  request pays after a pause, caches gone cold, which no warm-up can take); each also inside the service
  (`x-total-time`);
- the stop: SIGINT to the process group (what Ctrl-C does in a terminal), the time until `hfi serve` exits and until
  every process it started (Ray's daemons and workers, HAProxy) is gone, and whether Serve's "Controller failed to
  shut down" warning was printed;
- charges: the spool files left behind (none, or left for the next start to adopt) and the requests in the ledger.

Figures vary with the machine's load: compare runs made on the same machine, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

BODIES: dict[str, Any] = {
    "text-to-image": {"inputs": "a cat"},
    "text-generation": {"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
    "feature-extraction": {"inputs": "hello"},
    "text-classification": {"inputs": "good"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


IDLE_PAUSE_S = 5.0  # the pause before the after-idle reference requests


def timed_post(url: str, body: Any, timeout: float = 60) -> tuple[float, float]:
    """Seconds one request took from here, and inside the service (its `x-total-time`, from the request's
    arrival at the replica to its answer); raises on anything but a 2xx."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()
        inside = float(response.headers.get("x-total-time") or "nan")
    return time.perf_counter() - started, inside


def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (by parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _label(pid: int) -> str:
    """A process's name for the CPU account: a Serve replica by its application, a Ray actor by its class, else the
    program (and module) it runs."""
    try:
        args = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return name_of([a.decode(errors="replace") for a in args if a])


def name_of(words: list[str]) -> str:
    """`_label` of a command line."""
    if not words:
        return "?"
    if words[0].startswith("ray::ServeReplica:"):
        return "replica " + words[0].removeprefix("ray::ServeReplica:").split(":")[0]
    if words[0].startswith("ray::"):
        return words[0]
    if "-m" in words[:-1]:
        return words[words.index("-m") + 1]
    if "-c" in words[:-1]:
        return "python -c (the spool's sync child)" if "fdatasync" in " ".join(words) else "python -c"
    program = Path(words[0]).name
    script = next((Path(w).name for w in words[1:] if w.endswith(".py") or "/bin/" in w), "")
    return f"{program} {script}".strip()


def cpu_account(root: int) -> dict[str, Any]:
    """CPU seconds (user + system) spent so far by `root` and every process under it, those already gone included
    (what their parents collected), by process name: the work a start is made of. Over the machine's cores, the
    least wall time that work can take, however it is scheduled."""
    by_name: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in descendants(root) | {root}:
        try:
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, and cutime, cstime: the children it has waited for (gone, so not counted below it)
        seconds = sum(int(fields[i]) for i in (11, 12, 13, 14)) / tick
        name = _label(pid)
        by_name[name] = by_name.get(name, 0.0) + seconds
    # the least wall time from the total as reported, so that the two agree
    total = round(sum(by_name.values()), 1)
    cores = os.cpu_count() or 1
    return {
        "total_cpu_s": total,
        "cores": cores,
        "least_wall_s": round(total / cores, 1),
        "by_process": {k: round(v, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]) if v >= 0.1},
    }


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


def run(catalog: str | None, rounds: int, timeout_s: float, warmup: bool = True) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hfi-cold-"))
    try:
        return run_in(work, catalog, rounds, timeout_s, warmup)
    finally:  # the run's settings, ledger and spool
        shutil.rmtree(work, ignore_errors=True)


def run_in(work: Path, catalog: str | None, rounds: int, timeout_s: float, warmup: bool) -> dict[str, Any]:
    port = free_port()
    config = work / "settings.yaml"
    config.write_text(
        f"warmup: {str(warmup).lower()}\n"
        f"metering:\n  database_url: sqlite:///{work / 'ledger.db'}\n  spool_dir: {work / 'spool'}\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    catalog_args = ["--catalog", catalog] if catalog else []
    subprocess.run([str(BIN / "hfi"), "prepare", *catalog_args], check=True, env=env, capture_output=True)

    cmd = [str(BIN / "hfi"), "serve", "--port", str(port), "--config", str(config), *catalog_args]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.rstrip()))

    threading.Thread(target=read, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    models = json.loads(
        subprocess.run(
            [str(BIN / "python"), "-c", _LIST_MODELS, *(catalog_args[1:] or [""])],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    )
    deadline = started + timeout_s
    ready = None
    while ready is None and time.perf_counter() < deadline and proc.poll() is None:
        ready = next((t for t, line in lines if line.startswith("Ready:")), None)
        time.sleep(0.05)
    if ready is None:
        proc.kill()
        raise SystemExit("hfi serve printed no ready line:\n" + "\n".join(line for _, line in lines[-30:]))
    cpu = cpu_account(proc.pid)  # what the start took, before any request
    # Each model's first request once the service says it is ready, then `rounds` more: the first against their
    # p50 (the replica's warm-up request took the first-call costs), and the first inference's end from the start.
    warm: dict[str, Any] = {}
    first_answer = None
    for model_id, task in models.items():
        if task not in BODIES:
            continue
        first_s, first_inside = timed_post(f"{base}/models/{model_id}", BODIES[task])
        if first_answer is None:
            first_answer = time.perf_counter() - started
        times = [timed_post(f"{base}/models/{model_id}", BODIES[task]) for _ in range(rounds)]
        p50 = statistics.median(t for t, _ in times)
        warm[model_id] = {
            "first_s": round(first_s, 4),
            "p50_s": round(p50, 4),
            "first_over_p50": round(first_s / p50, 2),
            # the same inside the service (x-total-time): what of the difference the replica's path took
            "first_inside_s": first_inside,
            "p50_inside_s": statistics.median(i for _, i in times),
        }
    # A reference for the first request: one request to each model after an idle pause (IDLE_PAUSE_S), as a
    # client that comes back later sends it. What a replica pays after any pause (its caches gone cold to the
    # other processes on the cores) is no first-call cost a warm-up can take.
    time.sleep(IDLE_PAUSE_S)
    for model_id, figures in warm.items():
        after_idle, after_idle_inside = timed_post(f"{base}/models/{model_id}", BODIES[models[model_id]])
        figures.update(
            after_idle_s=round(after_idle, 4),
            after_idle_inside_s=after_idle_inside,
            first_over_after_idle=round(figures["first_s"] / after_idle, 2),
        )
    result: dict[str, Any] = {
        "ready_line_s": round(ready, 2),
        "first_inference_answered_s": round(first_answer or 0, 2),
        "ready_lines": [line for _, line in lines if line.startswith("Ready:") or "is ready at" in line],
        "first_request_vs_p50": warm,
        "cpu_at_ready": cpu,
    }

    pids = descendants(proc.pid) | {proc.pid}
    time.sleep(1.0)
    stop_started = time.perf_counter()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
    proc.wait(timeout=120)
    exited = time.perf_counter() - stop_started
    while alive(pids) and time.perf_counter() - stop_started < 60:
        time.sleep(0.05)
    gone = time.perf_counter() - stop_started
    text = "\n".join(line for _, line in lines)
    spool = work / "spool"
    sent = sum(2 + rounds for _ in warm)  # the first, the rounds, the one after the idle pause
    result["charges"] = {"requests_answered": sent, "in_ledger": _ledger_rows(work / "ledger.db")}
    result["stop"] = {
        "exit_s": round(exited, 2),
        "all_processes_gone_s": round(gone, 2),
        "left": sorted(alive(pids)),
        "controller_warning": "failed to shut down" in text,
        "spool_files_left": sorted(
            p.name for p in spool.glob("*.jsonl") if p.is_file() and p.stat().st_size > 0
        )
        if spool.exists()
        else [],
    }
    return result


def _ledger_rows(path: Path) -> int | None:
    import sqlite3

    if not path.exists():
        return None
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM metering_charges").fetchone()[0])


_LIST_MODELS = """
import json, sys
from serving.config import Settings
args = {"catalog_file": sys.argv[1]} if len(sys.argv) > 1 and sys.argv[1] else {}
catalog, _ = Settings.load(args).validated()
print(json.dumps({m.id: m.task for m in catalog.models}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--catalog", default=None, help="a catalog name or file (default: the built-in one)")
    parser.add_argument("--rounds", type=int, default=20, help="requests per model for the steady p50")
    parser.add_argument(
        "--timeout", type=float, default=300, help="give up waiting for the models after this"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first a run without warm-up (settings warmup: false), to compare",
    )
    args = parser.parse_args()
    result: dict[str, Any] = {}
    if args.baseline:
        result["without_warmup"] = run(args.catalog, args.rounds, args.timeout, warmup=False)
    result["with_warmup"] = run(args.catalog, args.rounds, args.timeout)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
