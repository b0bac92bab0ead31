"""Scale to zero, one layer at a time: the decision for a request to a model with no replica (serving/replicas.py)
with a stand-in for Serve's counts and the handle call, the Serve options and routes it gets (serving/app.py), the
client's wish to wait, and warm-up requests. The real Ray Serve round trip is tests/integration/test_scale_to_zero.py.
"""

from __future__ import annotations

import asyncio

import pytest

from models.catalog import parse_catalog
from models.errors import ModelLoading
from serving.app import applications, deployment_options, idle_scaling
from serving.replicas import (
    LOADED,
    LOADING,
    SCALED_TO_ZERO,
    ColdStarts,
    ReplicaCounts,
    replica_state,
    wants_wait,
)

MODEL = "local/cold"


def catalog(**autoscaling):
    return parse_catalog(
        {
            "models": [
                {
                    "id": MODEL,
                    "task": "text-classification",
                    "source": {"path": "x"},
                    "autoscaling": {"min_replicas": 0, "max_replicas": 1, **autoscaling},
                },
                {"id": "local/warm", "task": "text-classification", "source": {"path": "y"}, "replicas": 1},
            ]
        }
    )


class Serve:
    """Stands in for Serve: replica counts per application, and a start that ends when the test says."""

    def __init__(self) -> None:
        self.running = 0
        self.reads = 0
        self.calls = 0
        self.up: asyncio.Event | None = None

    def read(self) -> dict[str, dict[str, int]]:
        self.reads += 1
        return {"app-cold": {"running": self.running, "starting": 0, "target": self.running}}

    async def call(self, model_id: str) -> dict:
        self.calls += 1
        assert self.up is not None
        await self.up.wait()
        self.running = 1
        return {"tasks": ["text-classification"]}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cold_starts(serve: Serve, clock: Clock, **autoscaling) -> ColdStarts:
    specs = catalog(**autoscaling).models
    counts = ReplicaCounts(serve.read, ttl_s=1.0, clock_s=clock)
    return ColdStarts(specs, {MODEL: "app-cold"}, serve.call, counts, clock_s=clock)


def test_only_models_with_min_replicas_zero_scale_to_zero():
    cold, warm = catalog().models
    assert cold.scales_to_zero and not warm.scales_to_zero
    serve, clock = Serve(), Clock()
    starts = cold_starts(serve, clock)
    assert MODEL in starts and "local/warm" not in starts


def test_replica_state_from_counts():
    assert replica_state({"running": 1, "starting": 0, "target": 1}) == LOADED
    assert replica_state({"running": 0, "starting": 1, "target": 1}) == LOADING
    assert replica_state({"running": 0, "starting": 0, "target": 1}) == LOADING
    assert replica_state({"running": 0, "starting": 0, "target": 0}) == SCALED_TO_ZERO
    assert replica_state(None) == LOADING  # the application is not deployed yet


def test_without_wait_a_request_gets_503_at_once_with_the_catalogs_estimate_and_starts_a_replica():
    async def run() -> None:
        serve, clock = Serve(), Clock()
        serve.up = asyncio.Event()
        starts = cold_starts(serve, clock, estimated_load_s=12)
        with pytest.raises(ModelLoading) as refused:
            await starts.ensure(MODEL, wait=False, wait_timeout_s=60)
        assert refused.value.extra["estimated_time"] == 12.0
        assert str(refused.value) == f"Model {MODEL} is currently loading"
        await asyncio.sleep(0.01)
        assert serve.calls == 1, "the refused request started one replica"
        clock.now += 5  # what is left of the estimate is answered
        with pytest.raises(ModelLoading) as again:
            await starts.ensure(MODEL, wait=False, wait_timeout_s=60)
        assert again.value.extra["estimated_time"] == 7.0
        assert serve.calls == 1, "one start however many requests ask"
        assert await starts.state(MODEL) == LOADING
        serve.up.set()
        await starts.models[MODEL].waking
        assert await starts.ensure(MODEL, wait=False, wait_timeout_s=60) == 0  # up: no wait, no 503

    asyncio.run(run())


def test_a_held_request_waits_for_the_start_and_the_next_estimate_is_the_measured_start():
    async def run() -> None:
        serve, clock = Serve(), Clock()
        serve.up = asyncio.Event()
        starts = cold_starts(serve, clock, estimated_load_s=30)
        holding = asyncio.ensure_future(starts.ensure(MODEL, wait=True, wait_timeout_s=60))
        await asyncio.sleep(0.05)
        assert not holding.done()
        clock.now += 8
        serve.up.set()
        held_ns = await holding
        assert held_ns >= 40_000_000, "the wait is what the request was held"
        # Scaled to zero again: the next estimate is the start measured (8 s), not the catalog's 30.
        serve.running, serve.up = 0, asyncio.Event()
        clock.now += 10
        with pytest.raises(ModelLoading) as refused:
            await starts.ensure(MODEL, wait=False, wait_timeout_s=60)
        assert refused.value.extra["estimated_time"] == 8.0

    asyncio.run(run())


def test_held_requests_are_bounded_per_model_and_by_the_wait_timeout():
    async def run() -> None:
        serve, clock = Serve(), Clock()
        serve.up = asyncio.Event()
        starts = cold_starts(serve, clock, max_waiting_requests=1)
        first = asyncio.ensure_future(starts.ensure(MODEL, wait=True, wait_timeout_s=60))
        await asyncio.sleep(0.01)
        with pytest.raises(ModelLoading):  # past the bound: 503 at once, not held
            await starts.ensure(MODEL, wait=True, wait_timeout_s=60)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert starts.models[MODEL].held == 0
        with pytest.raises(ModelLoading):  # held, and the wait is over before the replica is up
            await starts.ensure(MODEL, wait=True, wait_timeout_s=0.05)
        assert starts.models[MODEL].held == 0
        assert serve.calls == 1
        serve.up.set()

    asyncio.run(run())


def test_counts_are_read_at_most_once_per_ttl_and_again_before_a_503():
    async def run() -> None:
        serve, clock = Serve(), Clock()
        serve.running = 1
        starts = cold_starts(serve, clock)
        for _ in range(5):
            assert await starts.ensure(MODEL, wait=False, wait_timeout_s=1) == 0
        assert serve.reads == 1, "a model that is up costs one read per ttl, not one per request"

        # A count that says "none" and is not fresh is read again before a 503: the replica may be up by now.
        serve.running = 0
        clock.now += 2
        assert await starts.state(MODEL) == SCALED_TO_ZERO  # e.g. /health read it
        assert serve.reads == 2
        serve.running = 1  # another router started one meanwhile
        clock.now += 0.5
        assert await starts.ensure(MODEL, wait=False, wait_timeout_s=1) == 0
        assert serve.reads == 3 and serve.calls == 0

        # A fresh "none" is not read twice.
        serve.running = 0
        serve.up = asyncio.Event()
        clock.now += 2
        with pytest.raises(ModelLoading):
            await starts.ensure(MODEL, wait=False, wait_timeout_s=1)
        assert serve.reads == 4
        serve.up.set()

    asyncio.run(run())


def test_a_failed_start_is_a_503_and_the_next_request_starts_again():
    async def run() -> None:
        serve, clock = Serve(), Clock()
        calls = []

        async def fail(model_id: str) -> dict:
            calls.append(model_id)
            raise RuntimeError("the replica died in its constructor")

        starts = ColdStarts(
            catalog().models, {MODEL: "app-cold"}, fail, ReplicaCounts(serve.read, clock_s=clock)
        )
        with pytest.raises(ModelLoading):
            await starts.ensure(MODEL, wait=True, wait_timeout_s=5)
        with pytest.raises(ModelLoading):
            await starts.ensure(MODEL, wait=True, wait_timeout_s=5)
        assert len(calls) == 2

    asyncio.run(run())


def test_wants_wait_reads_the_header_and_the_legacy_option():
    assert wants_wait({"x-wait-for-model": "true"}, {})
    assert wants_wait({"x-wait-for-model": "1"}, None)
    assert not wants_wait({"x-wait-for-model": "false"}, {"inputs": "x"})
    assert wants_wait({}, {"inputs": "x", "options": {"wait_for_model": True}})
    assert not wants_wait({}, {"inputs": "x", "options": {"wait_for_model": "yes"}})
    assert not wants_wait({}, ["not", "a", "dict"])


def test_serve_options_and_routes_of_a_model_that_scales_to_zero(tmp_path):
    import yaml

    from hardware_profiles import load_profiles

    cold, warm = catalog(idle_timeout_s=120).models
    profile = load_profiles().get("cpu-basic")
    options = deployment_options(cold, profile)["autoscaling_config"]
    assert options["min_replicas"] == 0
    assert options["look_back_period_s"] + options["downscale_to_zero_delay_s"] == 120
    assert options["metrics_interval_s"] < options["look_back_period_s"]
    assert "downscale_to_zero_delay_s" not in deployment_options(warm, profile).get("autoscaling_config", {})
    assert idle_scaling(600) == {
        "look_back_period_s": 30.0,
        "downscale_to_zero_delay_s": 570.0,
        "metrics_interval_s": 10.0,
    }

    path = tmp_path / "catalog.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "id": MODEL,
                        "task": "text-classification",
                        "source": {"path": "x"},
                        "autoscaling": {"min_replicas": 0},
                    },
                    {"id": "local/warm", "task": "text-classification", "source": {"path": "y"}},
                ]
            }
        )
    )
    routes = [(a.args.get("model"), a.route_prefix) for a in applications({"catalog_file": str(path)})]
    assert routes == [(MODEL, None), ("local/warm", "/models/local/warm"), (None, "/")]
