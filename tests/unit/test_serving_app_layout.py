"""The service's Serve applications (serving.app.applications): one per model at /models/{id}, the router at the
mount point, and the HTTP layer routing a model application's requests on their whole path."""

from __future__ import annotations

import asyncio

import pytest

from serving.app import applications, build_model_app
from serving.http import StripPrefix

MODELS = [
    {"id": "org/a", "task": "text-classification", "source": {"path": "a"}},
    {"id": "org/b.v2", "task": "feature-extraction", "source": {"path": "b"}},
]


def test_one_application_per_model_then_the_router():
    apps = applications({"models": MODELS})
    assert [(a.name, a.route_prefix, a.import_path) for a in apps] == [
        ("model-org--a", "/models/org/a", "serving.app:build_model_app"),
        ("model-org--b-v2", "/models/org/b.v2", "serving.app:build_model_app"),
        ("hf-inference", "/", "serving.app:build_ingress_app"),
    ]
    assert [a.args.get("model") for a in apps] == ["org/a", "org/b.v2", None]
    assert all({k: v for k, v in a.args.items() if k != "model"} == apps[-1].args for a in apps)


def test_a_mount_point_moves_every_route_and_name():
    apps = applications({"models": MODELS, "route_prefix": "/blue"})
    assert [(a.name, a.route_prefix) for a in apps] == [
        ("blue-model-org--a", "/blue/models/org/a"),
        ("blue-model-org--b-v2", "/blue/models/org/b.v2"),
        ("blue-hf-inference", "/blue"),
    ]


def test_a_model_application_names_a_model_of_the_catalog():
    with pytest.raises(ValueError, match="not in the catalog"):
        build_model_app({"models": MODELS, "model": "org/zzz"})
    with pytest.raises(ValueError, match="name its model"):
        build_model_app({"models": MODELS})


def route(mount: str, path: str, root_path: str) -> tuple[str, str]:
    """(path, root_path) that the app behind StripPrefix sees for a request Serve hands over."""
    seen: dict[str, str] = {}

    async def app(scope, receive, send):
        seen.update(path=scope["path"], root_path=scope["root_path"])

    scope = {"type": "http", "path": path, "raw_path": path.encode(), "root_path": root_path}
    asyncio.run(StripPrefix(app, mount)(scope, None, None))
    return seen["path"], seen["root_path"]


@pytest.mark.parametrize(
    ("mount", "path", "root_path", "expected"),
    [
        # Serve hands a model application its requests with the whole path and its prefix as root_path
        ("/", "/models/org/a/pipeline/x", "/models/org/a", "/models/org/a/pipeline/x"),
        ("/", "/hf-inference/models/org/a", "", "/models/org/a"),
        ("/blue", "/blue/models/org/a", "/blue/models/org/a", "/models/org/a"),
        ("/blue", "/blue/hf-inference/v1/models", "/blue", "/v1/models"),
        ("/blue", "/bluer/x", "", "/bluer/x"),  # a prefix is a whole path segment
    ],
)
def test_routes_match_on_the_whole_path_less_the_mount_point(mount, path, root_path, expected):
    assert route(mount, path, root_path) == (expected, "")
