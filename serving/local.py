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
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Serve's throughput mode (ingress replicas take HTTP from the proxy directly, gRPC between deployments):
    # measured here about 25 % more requests per second through the whole stack. Set it to 0 to turn it off.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
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
