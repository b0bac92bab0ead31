"""The chart's node drainer: `hfi metering drain --follow` as a Kubernetes native sidecar (an init container with
restartPolicy: Always) on the head pod and every worker group's pods, beside Ray, with the Ray container's image,
environment and spool mount; spool.drainer.enabled turns it off (clusters older than Kubernetes 1.29)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.unit.test_helm_chart import (  # native sidecars need K8S_VERSION >= 1.29
    CHART,
    CI_VALUES,
    K8S_VERSION,
    VALUE_SETS,
)
from tests.unit.test_helm_chart import _pod_templates as _rayservice_pod_templates

DRAINER = "spool-drainer"
DRAINER_STOP_S = 10  # what the sidecar delivers for at its SIGTERM (templates/_helpers.tpl, hfi.spoolDrainer)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of a values file over the chart's values: maps key by key, anything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _values(files: list[Path]) -> dict[str, Any]:
    """The values Helm renders with (a deep merge: the CI file sets part of `spool`, which test_helm_chart's
    top-level replacement would drop along with `spool.drainer`)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        values = _merge(values, yaml.safe_load(f.read_text()))
    return values


def _prepares_spool(values: dict[str, Any]) -> bool:
    volume = values["spool"]["volume"]
    return volume["type"] == "hostPath" and volume.get("prepareHostPath", False)


def _pod_templates(result) -> dict[str, dict[str, Any]]:
    return _rayservice_pod_templates(result.one("RayService"))


def _init_containers(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in template["spec"].get("initContainers", [])}


def _drain_cli():
    import typer

    from metering.cli import register

    app = typer.Typer()
    register(app)
    return typer.main.get_command(app).commands["metering"].commands["drain"]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request, helm):
    """(values, helm result) for each values set."""
    files = VALUE_SETS[request.param]
    result = helm.template(values=files)
    assert result.returncode == 0, result.stderr
    return _values(files), result


def test_every_ray_pod_has_the_drainer_as_a_native_sidecar(rendered):
    values, result = rendered
    templates = _pod_templates(result)
    assert sorted(templates) == sorted(["head", *(p["name"] for p in values["profiles"])])
    for name, template in templates.items():
        init = template["spec"]["initContainers"]
        # After the spool directory's own init container (hostPath, the default): it needs the directory writable.
        assert [c["name"] for c in init] == ["spool-dir"] * _prepares_spool(values) + [DRAINER], name
        drainer = init[-1]
        ray = template["spec"]["containers"][0]
        # Native sidecar: started before the Ray container, stopped after it (so it outlives the preStop drain).
        assert drainer["restartPolicy"] == "Always", name
        assert drainer["image"] == ray["image"] and drainer["imagePullPolicy"] == ray["imagePullPolicy"], name
        assert drainer["command"] == [
            "hfi",
            "metering",
            "drain",
            "--follow",
            "--timeout-s",
            str(DRAINER_STOP_S),
        ], name
        assert drainer["securityContext"] == values["securityContext"] == ray["securityContext"], name
        assert drainer["resources"] == values["spool"]["drainer"]["resources"], name
        assert drainer["resources"] == {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "512Mi"},
        }
        assert "lifecycle" not in drainer and "ports" not in drainer, name
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template},
            K8S_VERSION,
            strict=True,
        )


def test_the_drainer_has_the_ray_containers_environment_and_spool_mount(rendered):
    values, result = rendered
    mount_path = values["spool"]["mountPath"]
    for name, template in _pod_templates(result).items():
        drainer = _init_containers(template)[DRAINER]
        ray = template["spec"]["containers"][0]
        # The same configuration as the serving processes: the same ledger, the same spool directory.
        assert drainer["env"] == ray["env"], name
        env = {e["name"]: e for e in drainer["env"]}
        assert env["HFI_SPOOL_DIR"]["value"] == mount_path, name
        url = env["HFI_DATABASE_URL"]
        if values["database"]["type"] == "external":
            assert set(url["valueFrom"]) == {"secretKeyRef"}, name  # by reference only
        else:
            assert "$(HFI_DATABASE_PASSWORD)" in url["value"], name
            assert set(env["HFI_DATABASE_PASSWORD"]["valueFrom"]) == {"secretKeyRef"}, name
        # The spool only (no model cache, no shared memory), exactly as the Ray container mounts it.
        spool_mount = {"name": "spool", "mountPath": mount_path}
        assert drainer["volumeMounts"] == [spool_mount], name
        assert spool_mount in ray["volumeMounts"], name
        assert "spool" in {v["name"] for v in template["spec"]["volumes"]}, name


def test_the_drainer_command_is_the_real_clis_follow_mode(rendered):
    _, result = rendered
    drain_cli = _drain_cli()
    for name, template in _pod_templates(result).items():
        command = _init_containers(template)[DRAINER]["command"]
        assert command[:3] == ["hfi", "metering", "drain"], name
        params = drain_cli.make_context("drain", list(command[3:])).params
        assert params["follow"] is True, name
        assert params["timeout_s"] == DRAINER_STOP_S, name
        # The spool directory and the ledger come from the environment (HFI_SPOOL_DIR, HFI_DATABASE_URL).
        assert params["spool_dir"] is None and params["database_url"] is None, name


@pytest.mark.parametrize(
    "sets",
    [{}, {"shutdown.terminationGracePeriodSeconds": "55", "shutdown.rayStopGracePeriodSeconds": "30"}],
)
def test_the_drainers_stop_fits_in_the_margin_the_prestop_hook_leaves(helm, sets):
    import shlex

    result = helm.template(sets=sets)
    assert result.returncode == 0, result.stderr
    for name, template in _pod_templates(result).items():
        grace_s = template["spec"]["terminationGracePeriodSeconds"]
        script = template["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]
        stop, drain = (shlex.split(part) for part in script.split(";"))
        prestop_s = int(stop[stop.index("--grace-period") + 1]) + int(drain[drain.index("--timeout-s") + 1])
        command = _init_containers(template)[DRAINER]["command"]
        drainer_s = int(command[command.index("--timeout-s") + 1])
        # The sidecar is stopped after the Ray container (its preStop hook at most prestop_s): its own delivery
        # ends with 5 s to spare before the kubelet's SIGKILL.
        assert prestop_s + drainer_s + 5 <= grace_s, name


@pytest.mark.parametrize(
    ("sets", "init_names"),
    [
        ({}, ["spool-dir"]),
        ({"spool.volume.type": "emptyDir"}, []),
        ({"spool.volume.type": "existingClaim", "spool.volume.existingClaim": "spool-rwx"}, []),
    ],
)
def test_disabled_drainer_leaves_no_sidecar(helm, sets, init_names):
    result = helm.template(sets={**sets, "spool.drainer.enabled": "false"})
    assert result.returncode == 0, result.stderr
    for name, template in _pod_templates(result).items():
        assert [c["name"] for c in template["spec"].get("initContainers", [])] == init_names, name
        if not init_names:
            assert "initContainers" not in template["spec"], name
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template},
            K8S_VERSION,
            strict=True,
        )


def test_the_drainers_resources_come_from_values(helm, tmp_path):
    resources = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    f = tmp_path / "drainer.yaml"
    f.write_text(yaml.safe_dump({"spool": {"drainer": {"resources": resources}}}))
    result = helm.template(values=[f])
    assert result.returncode == 0, result.stderr
    for name, template in _pod_templates(result).items():
        assert _init_containers(template)[DRAINER]["resources"] == resources, name
        assert _init_containers(template)["spool-dir"]["resources"]["limits"] == {"memory": "64Mi"}, name
        assert template["spec"]["containers"][0]["resources"]["limits"]["memory"] != "2Gi", name  # its own


def test_helm_lint_passes_with_the_drainer_off(helm):
    result = helm.lint(values=[CI_VALUES], sets={"spool.drainer.enabled": "false"})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"spool.drainer.enabled": "maybe"}, "at '/spool/drainer/enabled'"),
        (
            {"spool.drainer.timeoutSeconds": "30"},
            "at '/spool/drainer': additional properties 'timeoutSeconds'",
        ),
        ({"spool.drainer.resources.requests.cpu": "lots"}, "at '/spool/drainer/resources/requests/cpu'"),
    ],
)
def test_bad_drainer_values_fail_with_a_clear_message(helm, sets, message):
    result = helm.template(sets=sets)
    assert result.returncode != 0, f"{sets}: rendered without error"
    assert message in result.stderr, result.stderr


def test_a_cluster_older_than_1_29_is_told_to_turn_the_drainer_off(helm):
    """Native sidecars came in Kubernetes 1.29: on an older cluster the render fails, naming the setting, unless the
    drainer is off (the chart itself installs on 1.27 and later)."""
    old = ["template", "hfi", str(CHART), "--namespace", "inference", "--kube-version", "1.28.5"]
    refused = helm.run(*old)
    assert refused.returncode != 0
    assert "spool.drainer.enabled" in refused.stderr and "1.29" in refused.stderr, refused.stderr
    off = helm.run(*old, "--set", "spool.drainer.enabled=false")
    assert off.returncode == 0, off.stderr
    assert helm.run("template", "hfi", str(CHART), "--kube-version", "1.29.0").returncode == 0
