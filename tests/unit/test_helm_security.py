"""The chart fences Ray: token auth through KubeRay's authOptions and a NetworkPolicy around the Ray ports, both on
with the default values; the ports Serve needs between pods stay open."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "hf-inference"
RAY_POD_COMPONENTS = ["ray-head", "ray-worker"]


def _env(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    envs = [{e["name"]: e for e in t["spec"]["containers"][0]["env"]} for t in templates]
    assert all(e.keys() == envs[0].keys() for e in envs), "every Ray container gets the same environment"
    return envs[0]


def _ray_policy(result) -> dict:
    policies = {p["metadata"]["name"]: p for p in result.kind("NetworkPolicy")}
    return policies["hfi-hf-inference-ray"]


def test_defaults_turn_on_ray_token_auth_through_kuberay(helm):
    result = helm.template()
    assert result.returncode == 0, result.stderr
    rayservice = result.one("RayService")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    env = _env(rayservice)
    assert "RAY_AUTH_MODE" not in env, "KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN itself"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["annotations"]["hf-inference/kuberay-operator"] == ">=1.5.1"  # authOptions needs it


def test_defaults_fence_the_ray_ports_and_keep_serves_open(helm):
    result = helm.template()
    assert result.returncode == 0, result.stderr
    policy = _ray_policy(result)
    kubernetes_validate.validate(policy, "1.30.0", strict=True)
    spec = policy["spec"]
    ray_pods = spec["podSelector"]
    assert ray_pods["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": RAY_POD_COMPONENTS}
    ]
    assert spec["policyTypes"] == ["Ingress"]
    rules = spec["ingress"]
    # Between the release's Ray pods: every port (GCS 6379, raylets, HAProxy 8000, replica ports 30000+).
    between = [r for r in rules if "ports" not in r]
    assert len(between) == 1 and between[0]["from"] == [{"podSelector": ray_pods}]
    by_port = {r["ports"][0]["port"]: r for r in rules if "ports" in r}
    assert "from" not in by_port[8000], "Serve's HTTP port answers everyone (the service's tokens guard it)"
    assert by_port[8080]["from"] == [{"namespaceSelector": {}}]  # Prometheus
    operator = by_port[8265]["from"][0]
    assert operator["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    open_ports = {
        p["port"] for r in rules if "from" not in r or r is not between[0] for p in r.get("ports", [])
    }
    for fenced in (6379, 10001, 52365):  # GCS, Ray client, dashboard agent: only from Ray pods
        assert fenced not in open_ports
    database = {p["metadata"]["name"]: p for p in result.kind("NetworkPolicy")}["hfi-hf-inference-postgresql"]
    assert database["spec"]["ingress"][0]["from"] == [{"podSelector": ray_pods}]


def test_each_fence_can_be_turned_off_and_disabled_auth_says_so_to_ray(helm):
    off = helm.template(sets={"rayAuth.mode": "disabled", "networkPolicy.enabled": "false"})
    assert off.returncode == 0, off.stderr
    rayservice = off.one("RayService")
    assert "authOptions" not in rayservice["spec"]["rayClusterConfig"]
    assert _env(rayservice)["RAY_AUTH_MODE"]["value"] == "disabled"  # Ray 2.60 would turn it on by itself
    assert off.kind("NetworkPolicy") == []
    bad = helm.template(sets={"rayAuth.mode": "maybe"})
    assert bad.returncode != 0 and "rayAuth" in bad.stderr


def test_the_policy_allows_chosen_clients_of_serve_and_metrics(helm, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "networkPolicy": {
                    "serveFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}],
                    "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
                }
            }
        )
    )
    result = helm.template(values=[values])
    assert result.returncode == 0, result.stderr
    by_port = {r["ports"][0]["port"]: r for r in _ray_policy(result)["spec"]["ingress"] if "ports" in r}
    assert by_port[8000]["from"] == [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]
    assert by_port[8080]["from"] == [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]


def test_the_service_on_the_cluster_keeps_metrics_and_docs_to_an_admin_even_in_open_mode(helm):
    from serving.config import Settings
    from serving.security import ops_policy

    result = helm.template(sets={"serve.billingMode": "open"})
    assert result.returncode == 0, result.stderr
    serve_config = yaml.safe_load(result.one("RayService")["spec"]["serveConfigV2"])
    for app in serve_config["applications"]:
        args = {k: v for k, v in app["args"].items() if k != "model"}  # a model application's own key
        settings = Settings.load(args, env={})
        # Serve listens on every interface there: `ops_endpoints: auto` is not the laptop's public default.
        assert settings.host == "0.0.0.0" and ops_policy(settings) == "admin", app["name"]
