"""The chart against Ray and the project's own code: what it renders must build, schedule and scale.

- serveConfigV2 parses with Ray's own Serve config schema;
- the RayCluster config gives the Ray autoscaler (its own KubeRay config reader) a node type for every model's
  profile whose resources hold one replica, and the head room for the ingress;
- the rendered applications are the project's own layout (serving.app.applications: one per model at
  /models/{id}, one per pool with models, the router at /), and each builds with its import_path into its deployment, placed by its
  profile. Ray is not started and no model is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from hardware_profiles.schema import HardwareProfile
from models.catalog import parse_catalog
from serving.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "hf-inference"
VALUE_SETS = {
    "default": [],
    "ci-two-gpu-profiles": [CHART / "ci" / "two-gpu-profiles-values.yaml"],
    "ci-pool": [CHART / "ci" / "pool-values.yaml"],  # two models sharing a pool's replicas
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rayservice(request, helm) -> dict[str, Any]:
    result = helm.template(values=VALUE_SETS[request.param], namespace="inference")
    assert result.returncode == 0, result.stderr
    return result.one("RayService")


def _serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def _app_args(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The router application's args: the service's settings."""
    (app,) = [a for a in _serve_config(rayservice)["applications"] if a["route_prefix"] == "/"]
    return app["args"]


def _build(app: dict[str, Any]) -> Any:
    """An application of the Serve config built as Serve would: its import path called with its args."""
    from ray.serve._private.build_app import build_app as build_serve_app

    import serving.app

    module, _, attr = app["import_path"].partition(":")
    assert module == "serving.app"
    return build_serve_app(getattr(serving.app, attr)(app["args"]), name=app["name"])


def test_serve_config_parses_with_rays_schema(rayservice):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.parse_obj(_serve_config(rayservice))
    assert schema.http_options.host == "0.0.0.0"
    assert schema.http_options.port == 8000
    assert [a.route_prefix for a in schema.applications][-1] == "/"


def test_the_charts_applications_are_the_projects_own_layout(rayservice, cluster_env):
    """The chart lays out the same applications as serving.app.applications (what `hfi serve` runs)."""
    from serving.app import applications

    rendered = _serve_config(rayservice)["applications"]
    ours = applications(_app_args(rayservice))
    assert [(a["name"], a["route_prefix"], a["import_path"]) for a in rendered] == [
        (a.name, a.route_prefix, a.import_path) for a in ours
    ]
    for app, mine in zip(rendered, ours, strict=True):
        assert (app["args"].get("model"), app["args"].get("pool")) == (
            mine.args.get("model"),
            mine.args.get("pool"),
        )


def test_autoscaler_sees_a_node_type_for_every_models_profile(rayservice):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": rayservice["metadata"]["name"], "namespace": "inference"},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }
    config = _derive_autoscaling_config_from_ray_cr(ray_cluster)
    node_types = config["available_node_types"]
    args = _app_args(rayservice)
    profiles = {p["name"]: HardwareProfile.model_validate(p) for p in args["profiles"]}
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for spec in parse_catalog({"models": args["models"], "pools": args.get("pools", [])}).models:
        profile = profiles[spec.hardware_profile]
        node = node_types[spec.hardware_profile]
        options = profile.ray_actor_options()
        assert node["resources"]["CPU"] >= options["num_cpus"], spec.id
        assert node["max_workers"] == groups[spec.hardware_profile]["maxReplicas"]
        if profile.accelerator is not None:
            # The autoscaler can only scale this group up from zero if it knows the group has this GPU type.
            assert node["resources"]["GPU"] == math.ceil(profile.accelerator.count)
            assert node["resources"][f"accelerator_type:{profile.accelerator.type}"] == 1
            # No other group offers this GPU type, so a replica cannot land on the wrong hardware.
            others = [n for name, n in node_types.items() if name != spec.hardware_profile]
            assert all(f"accelerator_type:{profile.accelerator.type}" not in n["resources"] for n in others)
        else:
            assert not node["resources"].get("GPU")
    head = node_types["headgroup"]
    assert head["resources"]["CPU"] >= args["ingress_num_cpus"] * args["ingress_replicas"]
    assert not head["resources"].get("GPU")


@pytest.fixture
def cluster_env(monkeypatch, tmp_path):
    """The environment a Ray pod of the chart gives the builder, with local paths for the volumes."""
    for name in ("HFI_CONFIG", "HFI_CATALOG", "HFI_PROFILES_DIR", "HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HFI_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("HFI_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("HFI_MODEL_STORE", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_secret")
    return tmp_path


def test_rendered_args_build_with_the_projects_builder(rayservice, cluster_env):
    args = _app_args(rayservice)
    built = [_build(app) for app in _serve_config(rayservice)["applications"]]
    deployments = {d.name: d for b in built for d in b.deployments}
    catalog = parse_catalog({"models": args["models"], "pools": args.get("pools", [])})
    profiles = {p["name"]: HardwareProfile.model_validate(p) for p in args["profiles"]}
    gpu_types = Settings.load(args).profile_catalog().gpu_types()  # the packaged profiles' and the chart's
    pools = [catalog.pool(name) for name in sorted({s.pool for s in catalog.models if s.pool is not None})]
    assert set(deployments) == {"ingress"} | {
        spec.deployment_name for spec in catalog.models if spec.pool is None
    } | {pool.deployment_name for pool in pools}
    assert [len(b.deployments) for b in built] == [1] * len(built)  # each application is one deployment
    assert built[-1].ingress_deployment_name == "ingress"
    ingress = deployments["ingress"]
    assert ingress.ray_actor_options["num_cpus"] == args["ingress_num_cpus"]
    # The chart keeps the router and the CPU models off GPU nodes, strictly (a cluster has CPU nodes for them).
    off_gpus = {"ray.io/accelerator-type": f"!in({','.join(sorted(gpu_types))})"}
    assert gpu_types and args["cpu_replicas_on_gpu_nodes"] == "never"
    assert ingress.ray_actor_options["label_selector"] == off_gpus
    assert "fallback_strategy" not in ingress.ray_actor_options
    assert ingress.num_replicas == args["ingress_replicas"]
    for pool in pools:  # one deployment of shared replicas, placed by the pool's profile
        deployment = deployments[pool.deployment_name]
        expected = profiles[pool.hardware_profile].ray_actor_options()
        assert {k: deployment.ray_actor_options.get(k) for k in expected} == expected, pool.name
        assert (deployment.num_replicas, deployment.max_ongoing_requests) == (
            pool.replicas,
            pool.max_ongoing_requests,
        )
    for spec in (s for s in catalog.models if s.pool is None):
        deployment = deployments[spec.deployment_name]
        expected = profiles[spec.hardware_profile].ray_actor_options()
        actual = {k: deployment.ray_actor_options.get(k) for k in expected}
        assert actual == expected, spec.id
        if profiles[spec.hardware_profile].accelerator is None:
            assert deployment.ray_actor_options["label_selector"] == off_gpus, spec.id
        else:
            assert "label_selector" not in deployment.ray_actor_options, spec.id
        assert deployment.max_ongoing_requests == spec.max_ongoing_requests
        config = deployment._deployment_config
        if spec.autoscaling is not None:
            assert config.autoscaling_config.min_replicas == spec.autoscaling.min_replicas
            assert config.autoscaling_config.max_replicas == spec.autoscaling.max_replicas
        else:
            assert deployment.num_replicas == spec.replicas


def test_the_token_from_the_secret_stays_out_of_deployment_args(rayservice, cluster_env):
    built = [_build(app) for app in _serve_config(rayservice)["applications"]]
    for deployment in (d for b in built for d in b.deployments):
        init = repr(deployment.init_args) + repr(deployment.init_kwargs)
        assert "hf_from_the_secret" not in init, deployment.name
