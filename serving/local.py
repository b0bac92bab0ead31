"""Run the service on this machine: a local Ray instance, Serve on host:port, the app from build_app().

Used by `hfi serve` and by the test suite's shared service fixture.
"""

from __future__ import annotations

import math
import os
from typing import Any

from serving.config import Settings

REPLICA_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
}

# Ray Serve settings of the local stack, read by Ray's processes when they start (so set before ray.init; one
# already set in the environment wins):
# - the throughput mode (Ray's switch for requests per second: ingress replicas take HTTP from the proxy
#   directly, gRPC between deployments, user code on the replica's own loop);
# - in that mode an ingress replica stays up 30 s after it is told to stop so that a load balancer can take it
#   out of rotation first; on one machine there is none, and a stop (Ctrl-C, a redeploy) would wait 35 s.
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def apply_serve_env() -> None:
    """Put SERVE_ENV (and no usage stats, no auth on loopback) in this process's environment for Ray to inherit."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)


def logical_cpus(settings: Settings) -> int:
    """Enough Ray logical CPUs for every replica, even where the machine has fewer cores (replicas mostly idle)."""
    catalog, profiles = settings.validated()
    need = settings.ingress_num_cpus * settings.ingress_replicas
    for spec in catalog.models:
        replicas = spec.replicas if spec.replicas is not None else max(1, spec.autoscaling.min_replicas)
        need += replicas * profiles.get(spec.hardware_profile).cpus
    return max(os.cpu_count() or 1, math.ceil(need) + 1)


def start(args: dict[str, Any] | None = None, *, ray_temp_dir: str | None = None) -> str:
    """Start Ray and Serve locally and deploy the application; return the base URL once it is ready."""
    apply_serve_env()
    import ray
    from ray import serve

    from serving.app import build_app

    settings = Settings.load(args or {})
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
    serve.run(build_app(settings.replica_args()), name="hfi", route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
