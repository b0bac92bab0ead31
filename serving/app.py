"""The composition root: `build_app(args)` makes the Serve application from settings.

It is the Serve config's `import_path` target (`serving.app:build_app`), so `serve run`, `serve deploy`, KubeRay's
`serveConfigV2` and `hfi serve` all build the same application. `args` are validated as serving.config.Settings.
"""

from __future__ import annotations

from typing import Any

from hardware_profiles import HardwareProfile
from models.catalog import ModelSpec
from serving.config import Settings


def deployment_options(spec: ModelSpec, profile: HardwareProfile) -> dict[str, Any]:
    """Serve options of a model's deployment: placement from its profile, scale and limits from the catalog."""
    options: dict[str, Any] = {
        "name": spec.deployment_name,
        "ray_actor_options": profile.ray_actor_options(),
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
    else:
        options["num_replicas"] = spec.replicas
    return options


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Build the Serve application: one deployment per catalog model, and the ingress in front."""
    from serving.deployment import Ingress, ModelDeployment

    settings = Settings.load(args or {})
    catalog, profiles = settings.validated()
    plain = settings.replica_args()  # secrets stay in each replica's environment
    models = {}
    for spec in catalog.models:
        profile = profiles.get(spec.hardware_profile)
        models[spec.id] = ModelDeployment.options(**deployment_options(spec, profile)).bind(
            spec.model_dump(mode="json"), profile.model_dump(mode="json"), plain
        )
    return Ingress.options(
        name="ingress",
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
    ).bind(models, plain)
