"""What metering costs, and what dynamic batching buys, through the full local stack (Ray Serve proxy, ingress,
model replica) in one run on this machine.

    python benchmarks/metering_overhead.py [--model-store DIR] [--duration 12] [--out FILE]

Two questions, each answered by arms that differ in one setting only, on the same Ray instance, one after the
other (never at the same time: on a small machine they would steal each other's cores):

1. metering overhead: throughput and p50/p99 latency of a trivial model (local/tiny-sentiment, text
   classification) at 8 concurrent clients, with `metering.enabled` true (price, fsync'd spool append, background
   drain to the SQLite ledger) and false (price only: the response headers still work). The arms run ABBA
   (on, off, off, on) so that a drift of the machine's load over the run falls equally on both.
2. batching speed-up: feature-extraction throughput of all-MiniLM-L6-v2 at 16 concurrent clients with the
   catalog's dynamic batching and with `batching: null` for that model (each request its own forward pass).

Comparing the service against an in-process IngressCore instead would measure Ray Serve's proxy and handles as
well as metering; toggling only metering on the same stack isolates what the issue asks about.

The load generator is a minimal asyncio HTTP/1.1 keep-alive client (pre-encoded requests, no HTTP library), so the
client takes as little as possible of the cores the service needs. Only loopback traffic; every arm is bounded in
time. Refuses to start while another Ray instance runs on this machine (its load would skew the numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SENTIMENT = "local/tiny-sentiment"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CLS_PATH = "/models/local/tiny-sentiment"
EMB_PATH = "/models/sentence-transformers/all-MiniLM-L6-v2"
CLS_BODY = {"inputs": "I really enjoyed this movie, it was great"}
EMB_BODY = {"inputs": "The quick brown fox jumps over the lazy dog near the river bank"}


# --- load generation ---------------------------------------------------------------------------------------------


@dataclass
class ArmResult:
    """One measured arm: what was sent, what came back, how fast."""

    name: str
    deployment: str
    path: str
    clients: int
    duration_s: float
    requests_ok: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    warmup_ok: int = 0
    error_samples: list[str] = field(default_factory=list)


def encode_post(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + payload


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, server keeps the connection) of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = await reader.read()
        return status, body, False
    return status, body, headers.get("connection", "").lower() != "close"


async def run_load(
    host: str, port: int, path: str, body: dict[str, Any], clients: int, duration_s: float
) -> tuple[list[int], int, list[str], float]:
    """`clients` closed-loop clients for `duration_s`: latencies (ns) of 200s, error count, samples, wall s."""
    request = encode_post(host, port, path, body)
    latencies: list[int] = []
    errors: list[str] = []
    started = time.perf_counter()
    stop_at = started + duration_s

    async def client() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.perf_counter() < stop_at:
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                reader, writer = conn
                t0 = time.perf_counter_ns()
                writer.write(request)
                status, data, keep = await asyncio.wait_for(read_response(reader), 60)
                elapsed = time.perf_counter_ns() - t0
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors.append(f"{status}: {data[:200]!r}")
                if not keep:
                    writer.close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.05)
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, len(errors), errors[:5], time.perf_counter() - started


def quantile_ms(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    index = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[index] / 1e6


def measure(
    name: str,
    deployment: str,
    url: str,
    path: str,
    body: dict,
    clients: int,
    duration_s: float,
    warmup_s: float,
) -> ArmResult:
    host, port = url.removeprefix("http://").split(":")
    warm, _, _, _ = asyncio.run(run_load(host, int(port), path, body, clients, warmup_s))
    lat, n_err, samples, wall = asyncio.run(run_load(host, int(port), path, body, clients, duration_s))
    lat.sort()
    result = ArmResult(
        name=name,
        deployment=deployment,
        path=path,
        clients=clients,
        duration_s=round(wall, 3),
        requests_ok=len(lat),
        errors=n_err,
        throughput_rps=round(len(lat) / wall, 2),
        p50_ms=round(quantile_ms(lat, 0.50), 2),
        p99_ms=round(quantile_ms(lat, 0.99), 2),
        mean_ms=round(statistics.fmean(lat) / 1e6, 2) if lat else float("nan"),
        warmup_ok=len(warm),
        error_samples=samples,
    )
    print(
        f"  {name:<22} {result.throughput_rps:8.1f} req/s  p50 {result.p50_ms:7.1f} ms  "
        f"p99 {result.p99_ms:7.1f} ms  ok {result.requests_ok:6d}  errors {result.errors}",
        flush=True,
    )
    return result


# --- the service -------------------------------------------------------------------------------------------------


def catalog_entries(*, minilm_batched: bool) -> list[dict[str, Any]]:
    """The default catalog's entries of the two benchmarked models; MiniLM's batching on or off."""
    import yaml

    from models.catalog import default_catalog_path

    entries = yaml.safe_load(default_catalog_path().read_text())["models"]
    chosen = [dict(e) for e in entries if e["id"] in (SENTIMENT, MINILM)]
    for entry in chosen:
        if entry["id"] == MINILM and not minilm_batched:
            entry["batching"] = None
    return chosen


def settings_args(
    work: Path, name: str, port: int, model_store: str, *, metering: bool, batched: bool
) -> dict:
    return {
        "port": port,
        "model_store": model_store,
        "offline": True,
        "models": catalog_entries(minilm_batched=batched),
        "metering": {
            "enabled": metering,
            "database_url": f"sqlite:///{work / name / 'ledger.db'}",
            "spool_dir": str(work / name / "spool"),
        },
    }


def other_ray_running() -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if proc.info["name"] in ("raylet", "gcs_server") or "/raylet " in cmd or "gcs_server " in cmd:
            found.append(proc.pid)
    return found


def wait_ready(url: str, timeout_s: float = 300) -> None:
    """Until both models answer a real request (replicas loaded)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    for path, body in ((CLS_PATH, CLS_BODY), (EMB_PATH, EMB_BODY)):
        while True:
            try:
                r = httpx.post(url + path, json=body, timeout=60)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}{path} not ready after {timeout_s} s")
            time.sleep(0.5)


def ledger_count(database_url: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("metering_charges"):
                return 0
            return int(conn.execute(sa.text("SELECT count(*) FROM metering_charges")).scalar_one())
    finally:
        engine.dispose()


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ray
    import torch

    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
    }


# --- the run -----------------------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def mean_of(arms: list[ArmResult], attr: str) -> float:
    return statistics.fmean(getattr(a, attr) for a in arms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-store", default=os.environ.get("HFI_MODEL_STORE", "~/.cache/hfi/models"))
    p.add_argument("--duration", type=float, default=12.0, help="seconds measured per arm")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load before each arm")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the overhead arms")
    p.add_argument("--batch-clients", type=int, default=16, help="concurrent clients of the batching arms")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metering_overhead.json"))
    p.add_argument("--allow-other-ray", action="store_true", help="run even if another Ray is running here")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    others = other_ray_running()
    if others and not args.allow_other_ray:
        print(f"another Ray instance is running on this machine (pids {others}): wait for it to finish")
        return 2

    import socket

    from models.loading import resolve_source
    from serving import local
    from serving.config import Settings

    port = args.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    model_store = str(Path(args.model_store).expanduser())
    work = Path(tempfile.mkdtemp(prefix="hfi-bench-metering-"))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")

    configs = {
        "metering-on": settings_args(work, "on", port, model_store, metering=True, batched=True),
        "metering-off": settings_args(work, "off", port, model_store, metering=False, batched=True),
        "unbatched": settings_args(work, "unbatched", port, model_store, metering=True, batched=False),
    }
    settings = Settings.load(configs["metering-on"], env={})
    catalog, _ = settings.validated()
    for spec in catalog.models:  # build the model directories before any replica looks for them
        resolve_source(spec, settings.load_options())

    info = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": machine(),
        "load_average_start": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    print(f"machine: {info['machine']['cpu_model']}, {info['machine']['cores']} cores; "
          f"load average {info['load_average_start']}", flush=True)  # fmt: skip

    arms: list[ArmResult] = []
    charges_check: list[dict[str, Any]] = []
    cls = (CLS_PATH, CLS_BODY, args.clients)
    emb = (EMB_PATH, EMB_BODY, args.batch_clients)
    # ABBA for metering (on, off, off, on); batched embeddings measured in both metering-on deployments.
    plan = [
        ("metering-on", [("cls metering on", *cls), ("emb batched", *emb)]),
        ("metering-off", [("cls metering off", *cls), ("cls metering off", *cls)]),
        ("metering-on", [("cls metering on", *cls), ("emb batched", *emb)]),
        ("unbatched", [("emb unbatched", *emb), ("emb unbatched", *emb)]),
    ]
    started = False
    try:
        for deployment, measurements in plan:
            if started:
                from ray import serve

                serve.shutdown()
            t0 = time.monotonic()
            url = local.start(configs[deployment], ray_temp_dir=ray_tmp)
            started = True
            wait_ready(url)
            print(f"[{deployment}] ready in {time.monotonic() - t0:.1f} s", flush=True)
            before = ledger_count(configs[deployment]["metering"]["database_url"])
            sent_ok = 2  # wait_ready's requests
            for name, path, body, clients in measurements:
                arm = measure(name, deployment, url, path, body, clients, args.duration, args.warmup)
                arms.append(arm)
                sent_ok += arm.requests_ok + arm.warmup_ok
            if configs[deployment]["metering"]["enabled"]:
                # Outside the measured windows: every 200 must have its charge in the ledger.
                db = configs[deployment]["metering"]["database_url"]
                deadline = time.monotonic() + 60
                while (count := ledger_count(db) - before) < sent_ok and time.monotonic() < deadline:
                    time.sleep(0.5)
                charges_check.append({"deployment": deployment, "ok_responses": sent_ok, "charges": count})
                print(f"  ledger: {count} charges for {sent_ok} successful responses", flush=True)
    finally:
        if started:
            local.stop()

    on = [a for a in arms if a.name == "cls metering on"]
    off = [a for a in arms if a.name == "cls metering off"]
    batched = [a for a in arms if a.name == "emb batched"]
    unbatched = [a for a in arms if a.name == "emb unbatched"]
    summary = {
        "metering_throughput_ratio_on_over_off": ratio(mean_of(on, "throughput_rps"), mean_of(off, "throughput_rps")),
        "metering_throughput_cost_percent": round(
            100 * (1 - mean_of(on, "throughput_rps") / mean_of(off, "throughput_rps")), 2
        ),
        "metering_p50_ratio_on_over_off": ratio(mean_of(on, "p50_ms"), mean_of(off, "p50_ms")),
        "metering_p99_ratio_on_over_off": ratio(mean_of(on, "p99_ms"), mean_of(off, "p99_ms")),
        "batching_speedup_batched_over_unbatched": ratio(
            mean_of(batched, "throughput_rps"), mean_of(unbatched, "throughput_rps")
        ),
        "batching_p50_ratio_batched_over_unbatched": ratio(mean_of(batched, "p50_ms"), mean_of(unbatched, "p50_ms")),
        "targets": {"metering_cost_percent_below": 5, "batching_speedup_at_least": 3},
        "charges_equal_ok_responses": all(c["charges"] == c["ok_responses"] for c in charges_check),
    }  # fmt: skip
    summary["metering_target_met"] = summary["metering_throughput_cost_percent"] < 5
    summary["batching_target_met"] = summary["batching_speedup_batched_over_unbatched"] >= 3
    info["load_average_end"] = os.getloadavg()
    doc = {**info, "arms": [asdict(a) for a in arms], "ledger_checks": charges_check, "summary": summary}

    print()
    print(
        f"{'arm':<22} {'deployment':<13} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    for a in arms:
        print(
            f"{a.name:<22} {a.deployment:<13} {a.clients:>7} {a.throughput_rps:>8.1f} {a.p50_ms:>8.1f} "
            f"{a.p99_ms:>8.1f} {a.errors:>6}"
        )
    print()
    for key, value in summary.items():
        print(f"{key}: {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
