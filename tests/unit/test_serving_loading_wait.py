"""A request for a model whose replicas are still starting waits (bounded), then gets a clear 503."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from core.timing import Timings
from models.types import RunResult
from serving.config import Settings
from serving.http import create_app
from serving.ingress import IngressCore


class SlowToLoad:
    """A backend whose replica becomes ready after `ready_after_s` (a fake for this one ingress behaviour)."""

    def __init__(self, ready_after_s: float) -> None:
        self.ready_after_s = ready_after_s

    async def info(self, model_id):
        await asyncio.sleep(self.ready_after_s)
        return {"revision": "abc", "tasks": ["text-classification"]}

    async def run(self, model_id, request):
        return RunResult(
            output=[[{"label": "POSITIVE", "score": 1.0}]], timings=Timings(compute_ns=1_000_000)
        )

    def stream(self, model_id, request):
        raise NotImplementedError


def make_client(tmp_path, wait_s: float, ready_after_s: float) -> TestClient:
    settings = Settings.load(
        {
            "model_wait_timeout_s": wait_s,
            "models": [{"id": "org/m", "task": "text-classification", "source": {"path": "m"}}],
            "metering": {
                "database_url": f"sqlite:///{tmp_path / 'l.db'}",
                "spool_dir": str(tmp_path / "spool"),
            },
        },
        env={},
    )
    return TestClient(create_app(IngressCore(settings, SlowToLoad(ready_after_s))))


def test_waits_for_a_loading_model(tmp_path):
    r = make_client(tmp_path, wait_s=5, ready_after_s=0.3).post("/models/org/m", json={"inputs": "x"})
    assert r.status_code == 200 and r.headers["x-compute-time"] == "0.001"


def test_gives_up_with_503_and_an_estimate(tmp_path):
    r = make_client(tmp_path, wait_s=0.2, ready_after_s=5).post("/models/org/m", json={"inputs": "x"})
    assert r.status_code == 503
    assert r.json() == {
        "error": "Model org/m is currently loading",
        "error_type": "overloaded",
        "estimated_time": 0.2,
    }
