"""The Helm chart: lint, render, validate every manifest offline, and refuse bad values with a clear message.

helm is a real binary (tests/fixtures/helm.py); built-in kinds are checked with kubernetes-validate --strict,
the RayService with the schema the project keeps (helm/schemas/rayservice.schema.json).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from hardware_profiles.schema import HardwareProfile
from models.catalog import parse_catalog

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "hf-inference"
CI_VALUES = CHART / "ci" / "two-gpu-profiles-values.yaml"
RAYSERVICE_SCHEMA = ROOT / "helm" / "schemas" / "rayservice.schema.json"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the chart is checked against (Chart.yaml kubeVersion >=1.27)
VALUE_SETS = {"default": [], "ci-two-gpu-profiles": [CI_VALUES]}
SECRET_ENV = {"HF_TOKEN", "HFI_DATABASE_URL", "HFI_DATABASE_PASSWORD"}


def _values(files: list[Path]) -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        values.update(yaml.safe_load(f.read_text()))  # top-level keys replace, as the fields tested here do
    return values


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request, helm):
    """(values, helm result) for each values set."""
    files = VALUE_SETS[request.param]
    result = helm.template(values=files)
    assert result.returncode == 0, result.stderr
    return _values(files), result


def _pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def _as_pod_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def _worker_groups(result) -> dict[str, dict[str, Any]]:
    return {
        g["groupName"]: g for g in result.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }


def _k8s_validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# Lint and render


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_passes(helm, name):
    result = helm.lint(values=VALUE_SETS[name])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_default_values_render_the_expected_objects(helm):
    result = helm.template()
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in result.documents)
    # The bundled ledger database, the network policies around Ray and it, no ingress or monitor unless asked for.
    assert kinds == ["NetworkPolicy", "NetworkPolicy", "RayService", "Service", "StatefulSet"]


def test_ci_values_render_every_optional_part(helm):
    result = helm.template(values=[CI_VALUES])
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in result.documents)
    # external database: no StatefulSet, no Service, one network policy (Ray's)
    assert kinds == ["Ingress", "NetworkPolicy", "PodMonitor", "RayService"]


# Offline validation of every manifest


def test_builtin_kinds_pass_kubernetes_validate_strict(rendered):
    _, result = rendered
    for doc in result.documents:
        if doc["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1"):
            continue
        _k8s_validate(doc)


def test_rayservice_embedded_core_types_pass_kubernetes_validate_strict(rendered):
    _, result = rendered
    rayservice = result.one("RayService")
    for name, template in _pod_templates(rayservice).items():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": template,
        }
        _k8s_validate(pod_template)
    serve_service = {"apiVersion": "v1", "kind": "Service", **rayservice["spec"]["serveService"]}
    _k8s_validate(serve_service)


def test_kubernetes_validate_strict_catches_a_misspelt_pod_field(rendered):
    # The check above is not vacuous: an unknown field in a rendered pod template fails it.
    _, result = rendered
    template = copy.deepcopy(_pod_templates(result.one("RayService"))["head"])
    template["spec"]["containers"][0]["resource"] = template["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        _k8s_validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
        )


def test_rayservice_matches_the_kept_kuberay_schema(rendered):
    _, result = rendered
    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    jsonschema.validate(result.one("RayService"), schema, cls=jsonschema.Draft7Validator)


def test_kept_rayservice_schema_rejects_what_the_api_server_would(rendered):
    _, result = rendered
    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    bad = copy.deepcopy(result.one("RayService"))
    # rayStartParams is map[string]string in the CRD: a number there is refused by the API server.
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft7Validator)
    bad = copy.deepcopy(result.one("RayService"))
    bad["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft7Validator)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions with In) selects these labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_podmonitor_scrapes_every_ray_pod_once_on_its_metrics_port(helm):
    values = [CI_VALUES]
    result = helm.template(values=values, sets={"database.type": "bundled"})  # and its database pods
    assert result.returncode == 0, result.stderr
    (monitor,) = result.kind("PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    port = _values([])["metrics"]["port"]  # the CI values keep the default port
    cluster = result.one("RayService")["spec"]["rayClusterConfig"]
    start_params = {"head": cluster["headGroupSpec"]["rayStartParams"]}
    start_params.update({g["groupName"]: g["rayStartParams"] for g in cluster["workerGroupSpecs"]})
    # Head and every worker group: selected, with the named port where Ray's metrics agent listens.
    for name, template in _pod_templates(result.one("RayService")).items():
        assert _selects(monitor["spec"]["selector"], template["metadata"]["labels"]), name
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == port == int(start_params[name]["metrics-export-port"]), name
    # Nothing else: not the ledger database's pods.
    (database,) = result.kind("StatefulSet")
    assert not _selects(monitor["spec"]["selector"], database["spec"]["template"]["metadata"]["labels"])
    # The pod's profile lands beside the service's own `hardware_profile` label, never over it.
    targets = {r["targetLabel"] for r in endpoint["relabelings"]}
    assert "hardware_profile" not in targets and "pod_hardware_profile" in targets


def test_nothing_scrapes_the_serve_service_whose_metrics_page_is_one_replicas(helm):
    # GET /metrics through the Serve Service answers from whichever replica the Service picks.
    result = helm.template(values=[CI_VALUES])
    assert result.returncode == 0, result.stderr
    assert result.kind("ServiceMonitor") == []
    serve_ports = {p["name"] for p in result.one("RayService")["spec"]["serveService"]["spec"]["ports"]}
    for monitor in result.kind("PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] not in serve_ports and endpoint.get("path", "/metrics") == "/metrics"


# The RayService: autoscaler, upgrades, worker groups per profile


def test_rayservice_turns_on_the_autoscaler_and_an_upgrade_strategy(rendered):
    _, result = rendered
    spec = result.one("RayService")["spec"]
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]
    assert spec["serveService"]["spec"]["ports"][0]["name"] == "serve"


def _accelerator_resources(ray_start_params: dict[str, str]) -> dict[str, int]:
    """The custom resources of rayStartParams, read the way KubeRay's autoscaler reads them."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    return json.loads(raw[1:-1].replace("\\", ""))


def test_one_worker_group_per_profile_with_its_gpu(rendered):
    values, result = rendered
    groups = {
        g["groupName"]: g for g in result.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    assert sorted(groups) == sorted(p["name"] for p in values["profiles"])
    for p in values["profiles"]:
        profile = HardwareProfile.model_validate({k: v for k, v in p.items() if k != "worker"})
        group = groups[profile.name]
        worker = p.get("worker", {})
        assert group["minReplicas"] == worker.get("minReplicas", 0)
        assert group["maxReplicas"] == worker.get("maxReplicas", 1)
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        params = group["rayStartParams"]
        options = profile.ray_actor_options()
        assert int(params["num-cpus"]) >= options["num_cpus"]
        if profile.accelerator is None:
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
            continue
        gpus = math.ceil(profile.accelerator.count)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert params["num-gpus"] == str(gpus)
        assert _accelerator_resources(params) == {f"accelerator_type:{profile.accelerator.type}": 1}
        node_selector = pod["nodeSelector"]
        assert values["gpuNodeSelectors"][profile.accelerator.type].items() <= node_selector.items()
        assert worker.get("nodeSelector", {}).items() <= node_selector.items()
        for toleration in values["gpuTolerations"] + worker.get("tolerations", []):
            assert toleration in pod["tolerations"]


def test_ci_h100_group_has_its_own_placement_and_size(helm):
    result = helm.template(values=[CI_VALUES])
    groups = {
        g["groupName"]: g for g in result.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    h100 = groups["nvidia-h100"]
    assert h100["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "node.kubernetes.io/instance-type": "p5.48xlarge",
    }
    limits = h100["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "23", "memory": "240Gi", "nvidia.com/gpu": "1"}
    assert (h100["minReplicas"], h100["maxReplicas"]) == (0, 2)


def test_half_gpu_profile_packs_two_replicas_per_pod(helm, tmp_path):
    values = _values([CI_VALUES])
    values["profiles"][0]["accelerator"]["count"] = 0.5
    f = tmp_path / "half.yaml"
    f.write_text(yaml.safe_dump({"profiles": values["profiles"]}))
    result = helm.template(values=[CI_VALUES, f])
    assert result.returncode == 0, result.stderr
    group = result.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["rayStartParams"]["num-gpus"] == "1"
    assert group["rayStartParams"]["num-cpus"] == "14"  # 2 replicas x 7 CPUs
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "60Gi"


# serveConfigV2: the same catalog and profiles as the local service


def test_serve_config_carries_the_models_and_profiles_from_values(rendered):
    values, result = rendered
    serve_config = yaml.safe_load(result.one("RayService")["spec"]["serveConfigV2"])
    *model_apps, app = serve_config["applications"]
    assert app["import_path"] == "serving.app:build_ingress_app"
    assert app["route_prefix"] == "/"
    assert serve_config["http_options"]["port"] == 8000

    # One application per model at /models/{id}: HAProxy sends a model's requests straight to its replicas. A
    # model that scales to zero has none: the router answers for it while it has no replica.
    def route(model: dict) -> str | None:
        return None if (model.get("autoscaling") or {}).get("min_replicas") == 0 else f"/models/{model['id']}"

    assert [(a["route_prefix"], a["args"]["model"]) for a in model_apps] == [
        (route(m), m["id"]) for m in values["models"]
    ]
    assert {a["import_path"] for a in model_apps} == {"serving.app:build_model_app"}
    assert all({k: v for k, v in a["args"].items() if k != "model"} == app["args"] for a in model_apps)
    args = app["args"]
    # The catalog is exactly the values' models and passes the project's own catalog validation.
    assert args["models"] == values["models"]
    catalog = parse_catalog({"models": args["models"]}, "serveConfigV2")
    profile_names = {p["name"] for p in args["profiles"]}
    assert {m.hardware_profile for m in catalog.models} <= profile_names
    for p in args["profiles"]:
        assert "worker" not in p  # the chart's own part stays out of the application's settings
        HardwareProfile.model_validate(p)
    assert args["billing"] == {"mode": values["serve"]["billingMode"]}


# Secrets: by reference only


def test_secrets_come_from_secret_refs_never_inline(rendered):
    values, result = rendered
    rayservice = result.one("RayService")
    for name, template in _pod_templates(rayservice).items():
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert "HFI_DATABASE_URL" in env, name
        for var in SECRET_ENV & env.keys():
            entry = env[var]
            if "valueFrom" in entry:
                assert set(entry["valueFrom"]) == {"secretKeyRef"}
            else:
                # The bundled database URL is assembled from the password Secret by Kubernetes itself.
                assert var == "HFI_DATABASE_URL"
                assert "$(HFI_DATABASE_PASSWORD)" in entry["value"]
                assert "valueFrom" in env["HFI_DATABASE_PASSWORD"]
        assert ("HF_TOKEN" in env) == bool(values["hfToken"]["existingSecret"])
    for sts in result.kind("StatefulSet"):
        env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert set(env["POSTGRES_PASSWORD"]["valueFrom"]) == {"secretKeyRef"}
    assert not result.kind("Secret")


def test_ci_values_take_the_external_database_url_from_its_secret(helm):
    result = helm.template(values=[CI_VALUES])
    head = _pod_templates(result.one("RayService"))["head"]
    env = {e["name"]: e for e in head["spec"]["containers"][0]["env"]}
    assert env["HFI_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "hfi-ledger",
        "key": "database-url",
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}


def test_pods_run_as_non_root(rendered):
    _, result = rendered
    for name, template in _pod_templates(result.one("RayService")).items():
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, name
        assert template["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_notes_show_the_python_client_for_each_model(helm):
    result = helm.run("install", "--dry-run=client", "hfi", str(CHART), "-f", str(CI_VALUES))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    for model_id in [m["id"] for m in _values([CI_VALUES])["models"]]:
        assert f'InferenceClient(base_url="$BASE/models/{model_id}"' in notes
    assert "BASE=https://inference.example.com" in notes


# Bad values fail with the schema's or the template's message


def _bad(tmp_path: Path, edit) -> Path:
    values = _values([CI_VALUES])
    edit(values)
    f = tmp_path / "bad-values.yaml"
    f.write_text(yaml.safe_dump({k: values[k] for k in ("profiles", "models", "database", "hfToken")}))
    return f


def _set(path: list[Any], value: Any):
    def edit(values):
        target = values
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return edit


_DELETE = object()

BAD_VALUES = {
    "model naming an unknown profile": (
        _set(["models", 2, "hardware_profile"], "nvidia-a100"),
        'models[black-forest-labs/FLUX.1-schnell].hardware_profile: unknown profile "nvidia-a100"; '
        "declared profiles: nvidia-h100, nvidia-l4",
    ),
    "GPU profile without a GPU type": (
        _set(["profiles", 1, "accelerator", "type"], _DELETE),
        "at '/profiles/1/accelerator': missing property 'type'",
    ),
    "GPU profile with an empty GPU type": (
        _set(["profiles", 1, "accelerator", "type"], ""),
        "at '/profiles/1/accelerator/type'",
    ),
    "model naming an unknown pool": (
        _set(["models", 0, "pool"], "nope"),
        'pool: unknown pool "nope"',
    ),
    "negative model replicas": (
        _set(["models", 1, "replicas"], -1),
        "at '/models/1/replicas': minimum: got -1, want 0",
    ),
    "negative autoscaling min_replicas": (
        _set(["models", 0, "autoscaling", "min_replicas"], -2),
        "at '/models/0/autoscaling/min_replicas': minimum: got -2, want 0",
    ),
    "negative worker maxReplicas": (
        _set(["profiles", 0, "worker", "maxReplicas"], -1),
        "at '/profiles/0/worker/maxReplicas': minimum: got -1, want 0",
    ),
    "worker minReplicas above maxReplicas": (
        _set(["profiles", 0, "worker", "minReplicas"], 9),
        "profiles[nvidia-l4].worker: minReplicas (9) is above maxReplicas (4)",
    ),
    "models needing more replicas than the group can hold": (
        _set(["profiles", 0, "worker", "maxReplicas"], 1),
        "profiles[nvidia-l4].worker.maxReplicas: its models need at least 2 replicas but 1 pods hold only 1",
    ),
    "profile declared twice": (
        lambda v: v["profiles"].append(copy.deepcopy(v["profiles"][0])),
        'profiles: profile "nvidia-l4" is declared twice',
    ),
    "model listed twice": (
        lambda v: v["models"].append(copy.deepcopy(v["models"][0])),
        'models: model "sentence-transformers/all-MiniLM-L6-v2" is listed twice',
    ),
    "GPU type with no node selector": (
        _set(["profiles", 0, "accelerator", "type"], "MI300X"),
        'profiles[nvidia-l4]: no node selector for GPU type "MI300X"',
    ),
    "inline HF token": (
        _set(["hfToken", "value"], "hf_abc"),
        "at '/hfToken': additional properties 'value' not allowed",
    ),
    "external database without a secret": (
        _set(["database", "external", "existingSecret"], ""),
        "at '/database/external/existingSecret': minLength",
    ),
    "price without an amount": (
        _set(["profiles", 0, "prices", 0, "usd_per_hour"], _DELETE),
        "at '/profiles/0/prices/0'",
    ),
    "model source with both a path and a repo": (
        _set(["models", 0, "source", "path"], "/models/minilm"),
        "at '/models/0/source'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_with_a_clear_message(helm, tmp_path, case):
    edit, message = BAD_VALUES[case]
    bad = _bad(tmp_path, edit)
    result = helm.template(values=[CI_VALUES, bad])
    assert result.returncode != 0, f"{case}: rendered without error"
    assert message in result.stderr, result.stderr
    if message.startswith("at '"):
        # helm lint enforces the schema too (it reports a template's `fail` only as information).
        lint = helm.lint(values=[CI_VALUES, bad])
        assert lint.returncode != 0
        assert message in lint.stdout + lint.stderr


# One hop: Serve's HAProxy ingress on every node


def test_every_ray_pod_runs_serves_haproxy_ingress_and_can_turn_it_off(helm):
    on = helm.template(values=[])
    for name, template in _pod_templates(on.one("RayService")).items():
        container = template["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1", name
        assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/home/ray/anaconda3/bin/hfi-haproxy", (
            name
        )  # 503s, ids
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000, name  # HAProxy listens on every node that has replicas
    off = helm.template(values=[], sets={"serve.haproxy": "false"})
    assert off.returncode == 0, off.stderr
    for name, template in _pod_templates(off.one("RayService")).items():
        env = {e["name"] for e in template["spec"]["containers"][0]["env"]}
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in env, name


# Pod shutdown: the spool is drained within the grace period, and what is left survives on the node


def _drain_command(container: dict[str, Any]) -> tuple[int, list[str]]:
    """(`ray stop`'s grace period, the `hfi metering drain` arguments) of a container's preStop hook."""
    import shlex

    shell, flag, script = container["lifecycle"]["preStop"]["exec"]["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    stop, drain = (part.strip() for part in script.split(";"))
    stop_args = shlex.split(stop)
    assert stop_args[:3] == ["ray", "stop", "--grace-period"], stop  # Ray stops first, then the drain
    drain_args = shlex.split(drain)
    assert drain_args[:4] == ["exec", "hfi", "metering", "drain"], drain
    return int(stop_args[3]), drain_args[4:]


def test_every_ray_pod_stops_ray_then_drains_its_spool_within_the_grace_period(rendered):
    import typer

    from metering.cli import register

    values, result = rendered
    app = typer.Typer()
    register(app)
    drain_cli = typer.main.get_command(app).commands["metering"].commands["drain"]
    shutdown = values["shutdown"]
    for name, template in _pod_templates(result.one("RayService")).items():
        grace_s = template["spec"]["terminationGracePeriodSeconds"]
        assert grace_s == shutdown["terminationGracePeriodSeconds"] == 120, name
        container = template["spec"]["containers"][0]
        stop_s, args = _drain_command(container)
        assert stop_s == shutdown["rayStopGracePeriodSeconds"]
        params = drain_cli.make_context("drain", list(args)).params  # the real CLI takes these arguments
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert params["spool_dir"] == env["HFI_SPOOL_DIR"] == "/var/lib/hfi/spool", name  # the spool's mount
        assert params["database_url"] is None  # the pod's own HFI_DATABASE_URL, from its Secret
        assert params["timeout_s"] >= 10 and stop_s + params["timeout_s"] + 15 == grace_s, name


def test_the_default_spool_is_a_per_release_node_directory_given_to_the_pod_user(helm):
    result = helm.template(release="billing", namespace="prod")
    assert result.returncode == 0, result.stderr
    for name, template in _pod_templates(result.one("RayService")).items():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        # per namespace and release: a replica adopts only the spools of its own ledger
        assert volumes["spool"]["hostPath"] == {
            "path": "/var/lib/hfi-spool/prod/billing-hf-inference",
            "type": "DirectoryOrCreate",
        }, name
        # The directory is prepared first; the drainer sidecar (tests/unit/test_helm_drainer.py) comes after it.
        init, drainer = spec["initContainers"]
        assert (init["name"], drainer["name"]) == ("spool-dir", "spool-drainer")
        assert "restartPolicy" not in init  # a plain init container: it runs to completion before the others
        assert init["volumeMounts"] == [{"name": "spool", "mountPath": "/var/lib/hfi/spool"}]
        assert init["command"][-1] == "chown 1000:100 '/var/lib/hfi/spool' && chmod 0770 '/var/lib/hfi/spool'"
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
        assert init["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
        _k8s_validate(_as_pod_template(name, template))


@pytest.mark.parametrize(
    ("sets", "volume_key"),
    [
        ({"spool.volume.prepareHostPath": "false"}, "hostPath"),
        ({"spool.volume.type": "emptyDir"}, "emptyDir"),
        (
            {"spool.volume.type": "existingClaim", "spool.volume.existingClaim": "spool-rwx"},
            "persistentVolumeClaim",
        ),
    ],
)
def test_other_spool_volumes_have_no_prepare_init_container(helm, sets, volume_key):
    result = helm.template(sets={**sets, "shutdown.terminationGracePeriodSeconds": "60"})
    assert result.returncode == 0, result.stderr
    for name, template in _pod_templates(result.one("RayService")).items():
        # Only the drainer sidecar (spool.drainer), no spool-dir.
        assert [c["name"] for c in template["spec"]["initContainers"]] == ["spool-drainer"], name
        assert volume_key in {v["name"]: v for v in template["spec"]["volumes"]}["spool"]
        assert template["spec"]["terminationGracePeriodSeconds"] == 60
        _, args = _drain_command(template["spec"]["containers"][0])
        assert args[-2:] == ["--timeout-s", "15"]  # 60 - 30 (ray stop) - 15 (margin)
        _k8s_validate(_as_pod_template(name, template))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            {"shutdown.terminationGracePeriodSeconds": "50"},
            "shutdown: terminationGracePeriodSeconds (50) must leave at least 25 s after "
            "rayStopGracePeriodSeconds (30)",
        ),
        ({"shutdown.terminationGracePeriodSeconds": "5"}, "at '/shutdown/terminationGracePeriodSeconds'"),
        (
            {"shutdown.drainTimeoutSeconds": "5"},
            "at '/shutdown': additional properties 'drainTimeoutSeconds'",
        ),
        ({"spool.volume.hostPath": "relative/dir"}, "at '/spool/volume/hostPath'"),
        ({"spool.volume.type": "nfs"}, "at '/spool/volume/type'"),
    ],
)
def test_bad_shutdown_and_spool_values_fail_with_a_clear_message(helm, sets, message):
    result = helm.template(sets=sets)
    assert result.returncode != 0, f"{sets}: rendered without error"
    assert message in result.stderr, result.stderr
