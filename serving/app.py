"""The composition root: `applications(args)` lays the service out as Serve applications, from settings.

One application per catalog model (`serving.app:build_model_app`, args: the settings plus `model`), routed at
`/models/{id}`; one per catalog pool that has models (`serving.app:build_pool_app`, args: the settings plus
`pool`), whose shared replicas load the pool's models on first use, the first at `/models`; and the router
(`serving.app:build_ingress_app`) at `/`. `hfi serve`, the Serve config that
`hfi serve-config` prints (for `serve deploy`) and KubeRay's `serveConfigV2` in the Helm chart all build the same
applications. `args` are validated as serving.config.Settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hardware_profiles import HardwareProfile
from models.catalog import ModelCatalog, ModelSpec, PoolSpec
from serving.config import Settings


def deployment_options(
    spec: ModelSpec, profile: HardwareProfile, ray_actor_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Serve options of a model's deployment: placement from its profile (`ray_actor_options`, by default the
    profile's own), scale and limits from the catalog."""
    options: dict[str, Any] = {
        "name": spec.deployment_name,
        "ray_actor_options": ray_actor_options or profile.ray_actor_options(),
        "max_ongoing_requests": spec.max_ongoing_requests,
        # Loading real weights can take minutes; give the first health check room.
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }
    if spec.autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": spec.autoscaling.min_replicas,
            "max_replicas": spec.autoscaling.max_replicas,
            "target_ongoing_requests": spec.autoscaling.target_ongoing_requests,
        }
        if spec.scales_to_zero:
            options["autoscaling_config"].update(idle_scaling(spec.autoscaling.idle_timeout_s))
    else:
        options["num_replicas"] = spec.replicas
    return options


def idle_scaling(idle_timeout_s: float) -> dict[str, float]:
    """Serve's settings for "the last replica goes `idle_timeout_s` after the last request": its autoscaler
    averages the requests over a look-back window, then waits `downscale_to_zero_delay_s` before 1 -> 0."""
    look_back = min(30.0, idle_timeout_s / 2)
    return {
        "look_back_period_s": look_back,
        "downscale_to_zero_delay_s": idle_timeout_s - look_back,
        # Serve wants its (deprecated) metrics interval under the window: 10 s unless the window is shorter.
        "metrics_interval_s": min(10.0, look_back / 2),
    }


@dataclass(frozen=True)
class AppSpec:
    """One Serve application of the service: its name, route prefix, and the builder args of its import path."""

    name: str
    route_prefix: str | None  # None: no HTTP of its own (a model that scales to zero: see model_route_prefix)
    import_path: str
    args: dict[str, Any]

    def build(self) -> Any:
        """The bound application (what `import_path` makes of `args`)."""
        builders = {MODEL_IMPORT_PATH: build_model_app, POOL_IMPORT_PATH: build_pool_app}
        return builders.get(self.import_path, build_ingress_app)(self.args)


MODEL_IMPORT_PATH = "serving.app:build_model_app"
INGRESS_IMPORT_PATH = "serving.app:build_ingress_app"
POOL_IMPORT_PATH = "serving.app:build_pool_app"
INGRESS_APP = "hf-inference"


def model_route_prefix(spec: ModelSpec, settings: Settings) -> str | None:
    """Where a model application takes HTTP: its model's routes, `/models/{id}` and everything under it.

    None for a model that scales to zero: while it has no replica, something must answer for it (503 with
    `estimated_time`, or hold the request while it loads), so its routes go to the router (or the first pool,
    which takes `/models`), which reach it by handle (serving/replicas.py)."""
    if spec.scales_to_zero:
        return None
    return f"{settings.route_prefix.rstrip('/')}/models/{spec.id}"


def pool_route_prefix(catalog: ModelCatalog, pool: PoolSpec, settings: Settings) -> str:
    """The first pool takes `/models`: every `/models/...` that no model application claims (longest prefix wins).
    Another pool is reached through it or the router, by handle; its own prefix is a placeholder."""
    mount = settings.route_prefix.rstrip("/")
    first = next(p for p in catalog.pools if catalog.pooled(p.name))
    return f"{mount}/models" if pool.name == first.name else f"{mount}/pools/{pool.name}"


def app_name(
    spec: ModelSpec | PoolSpec | None, settings: Settings, catalog: ModelCatalog | None = None
) -> str:
    """A Serve application's name: the model's deployment name (None: the router; a pooled model: its pool's),
    after the mount point's."""
    if isinstance(spec, ModelSpec) and spec.pool is not None and catalog is not None:
        spec = catalog.pool(spec.pool)
    base = INGRESS_APP if spec is None else spec.deployment_name
    mount = settings.route_prefix.strip("/").replace("/", "-")
    return f"{mount}-{base}" if mount else base


def applications(args: dict[str, Any] | None = None) -> list[AppSpec]:
    """The service as Serve applications: one per catalog model with no pool (named like its deployment, routed
    at `/models/{id}`), one per pool with models, then the router at `/`. The Serve config, `hfi serve` and the Helm chart all use this."""
    settings = Settings.load(args or {})
    catalog, _ = settings.validated()
    plain = settings.replica_args()  # secrets stay in each replica's environment
    apps = [
        AppSpec(
            app_name(spec, settings),
            model_route_prefix(spec, settings),
            MODEL_IMPORT_PATH,
            {**plain, "model": spec.id},
        )
        for spec in catalog.models
        if spec.pool is None
    ]
    apps += [
        AppSpec(
            app_name(pool, settings),
            pool_route_prefix(catalog, pool, settings),
            POOL_IMPORT_PATH,
            {**plain, "pool": pool.name},
        )
        for pool in catalog.pools
        if catalog.pooled(pool.name)
    ]
    apps.append(AppSpec(app_name(None, settings), settings.route_prefix, INGRESS_IMPORT_PATH, plain))
    return apps


def _split_model(args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    rest = dict(args)
    model_id = rest.pop("model", None)
    if not isinstance(model_id, str):
        raise ValueError("a model application's args name its model: {'model': '<id>', ...settings}")
    return model_id, rest


def build_model_app(args: dict[str, Any]) -> Any:
    """One model's application: its deployment, which serves the model's HTTP routes and the router's calls."""
    from serving.deployment import ModelDeployment

    model_id, rest = _split_model(args)
    settings = Settings.load(rest)
    catalog, profiles = settings.validated()
    spec = catalog.get(model_id)
    if spec is None:
        raise ValueError(f"model {model_id!r} is not in the catalog")
    profile = profiles.get(spec.hardware_profile)
    placement = settings.actor_options(profiles, spec.hardware_profile)
    return ModelDeployment.options(**deployment_options(spec, profile, placement)).bind(
        spec.model_dump(mode="json"), profile.model_dump(mode="json"), settings.replica_args()
    )


def build_pool_app(args: dict[str, Any]) -> Any:
    """A pool's application: one deployment whose replicas load the pool's models on first use (serving/pool.py)."""
    from serving.pool_deployment import PoolDeployment

    rest = dict(args)
    name = rest.pop("pool", None)
    settings = Settings.load(rest)
    catalog, profiles = settings.validated()
    if not isinstance(name, str) or name not in {p.name for p in catalog.pools}:
        raise ValueError(f"a pool application's args name a pool of the catalog: got {name!r}")
    pool = catalog.pool(name)
    profile = profiles.get(pool.hardware_profile)
    return PoolDeployment.options(
        name=pool.deployment_name,
        num_replicas=pool.replicas,
        ray_actor_options=settings.actor_options(profiles, pool.hardware_profile),
        max_ongoing_requests=pool.max_ongoing_requests,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
    ).bind(name, profile.model_dump(mode="json"), _app_names(catalog, settings), settings.replica_args())


def _app_names(catalog: ModelCatalog, settings: Settings) -> dict[str, str]:
    """Model id -> the name of the application that serves it (its own, or its pool's)."""
    return {spec.id: app_name(spec, settings, catalog) for spec in catalog.models}


def build_ingress_app(args: dict[str, Any] | None = None) -> Any:
    """The router application: routes that name the model in the body, listings, accounts, billing."""
    from serving.deployment import Ingress

    settings = Settings.load(args or {})
    catalog, profiles = settings.validated()
    return Ingress.options(
        name="ingress",
        num_replicas=settings.ingress_replicas,
        ray_actor_options=settings.actor_options(profiles, None),
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
    ).bind(_app_names(catalog, settings), settings.replica_args())
