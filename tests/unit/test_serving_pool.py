"""Pools (serving/pool.py, models/catalog.py `pools`): lazy loads, LRU eviction by count and memory, models in use
kept, the catalog's checks, and the Serve layout (the first pool at /models)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from models.catalog import CatalogError, ModelSpec, load_catalog, parse_catalog
from models.types import RunResult, TaskRequest
from serving.app import applications
from serving.pool import BoundModelHandle, ModelPool, PoolBackend

POOLED = [
    {"id": f"org/m{i}", "task": "text-classification", "source": {"path": f"m{i}"}, "pool": "small"}
    for i in range(4)
]
POOLS = [{"name": "small", "max_models": 2, "max_memory_mb": 1}]


class FakeRunner:
    batchable = False
    stoppable = False


class FakeExecutor:
    """Stands in for ModelExecutor: counts its loads, answers with its model id."""

    loads: list[str] = []

    def __init__(self, spec: ModelSpec, gate: threading.Event | None = None) -> None:
        if gate is not None:
            gate.wait(5)
        FakeExecutor.loads.append(spec.id)
        self.spec = spec
        self.runner = FakeRunner()
        self.stoppable = False
        self.revision = "r"
        self.device = "cpu"
        self.load_seconds = 0.0

    def tasks(self):
        return ("text-classification",)

    def run(self, request: TaskRequest) -> RunResult:
        from core.timing import Timings

        return RunResult(output=self.spec.id, timings=Timings(compute_ns=1, queue_ns=0))


def make_pool(max_models=2, max_memory_bytes=10_000, size=1_000, gate=None) -> ModelPool:
    FakeExecutor.loads = []
    specs = [ModelSpec.model_validate(m) for m in POOLED]
    return ModelPool(
        specs,
        lambda spec: FakeExecutor(spec, gate),
        max_models=max_models,
        max_memory_bytes=max_memory_bytes,
        measure=lambda ex: size,
    )


def run(coro):
    return asyncio.run(coro)


def test_a_model_is_loaded_on_its_first_request_only():
    pool = make_pool()
    backend = PoolBackend(pool)
    req = TaskRequest("text-classification", "x")

    async def go():
        assert (await backend.run("org/m0", req)).output == "org/m0"
        assert (await backend.run("org/m0", req)).output == "org/m0"

    run(go())
    assert FakeExecutor.loads == ["org/m0"] and pool.loads == 1


def test_concurrent_first_requests_share_one_load():
    gate = threading.Event()
    pool = make_pool(gate=gate)
    backend = PoolBackend(pool)

    async def go():
        calls = [backend.run("org/m1", TaskRequest("text-classification", "x")) for _ in range(5)]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks)

    assert [r.output for r in run(go())] == ["org/m1"] * 5
    assert FakeExecutor.loads == ["org/m1"]


def test_least_recently_used_idle_model_is_evicted_past_max_models():
    pool = make_pool(max_models=2)
    backend = PoolBackend(pool)
    req = TaskRequest("text-classification", "x")

    async def go():
        for model in ("org/m0", "org/m1", "org/m0", "org/m2"):  # m1 is the least recently used when m2 comes
            await backend.run(model, req)

    run(go())
    assert list(pool.entries) == ["org/m0", "org/m2"] and pool.evictions == 1
    run(backend.run("org/m1", req))  # back: loaded again, evicting m0 (now the least recently used)
    status = pool.status()
    assert status["loaded"] == ["org/m2", "org/m1"] and status["evictions"] == 2
    assert status["load_counts"] == {"org/m0": 1, "org/m1": 2, "org/m2": 1}


def test_memory_bound_evicts_too():
    pool = make_pool(max_models=10, max_memory_bytes=2_500, size=1_000)
    backend = PoolBackend(pool)

    async def go():
        for model in ("org/m0", "org/m1", "org/m2"):
            await backend.run(model, TaskRequest("text-classification", "x"))

    run(go())
    assert list(pool.entries) == ["org/m1", "org/m2"] and pool.memory_bytes == 2_000


def test_a_model_in_use_is_never_evicted():
    pool = make_pool(max_models=1)

    async def go():
        async with pool.use("org/m0"):
            async with pool.use("org/m1"):  # over the bound, but m0 is busy: both stay for now
                assert set(pool.entries) == {"org/m0", "org/m1"}
            # m1 done: over the bound, and m0 is still busy, so the idle one goes
            assert list(pool.entries) == ["org/m0"]
        assert list(pool.entries) == ["org/m0"] and pool.evictions == 1

    run(go())


def test_a_model_of_another_application_goes_through_the_remote_backend():
    class Remote:
        async def run(self, model_id, request):
            return f"remote {model_id}"

        async def info(self, model_id):
            return {"tasks": ["x"]}

    backend = PoolBackend(make_pool(), Remote())
    assert run(backend.run("org/elsewhere", TaskRequest("x", "y"))) == "remote org/elsewhere"
    assert run(backend.info("org/elsewhere")) == {"tasks": ["x"]}
    assert run(backend.info("org/m3"))["pool"] is True


def test_bound_handle_passes_the_model_id():
    seen = {}

    class Method:
        def remote(self, *args, **kwargs):
            seen.update(args=args, kwargs=kwargs)

    class Handle:
        run = Method()

        def options(self, **kwargs):
            seen["options"] = kwargs
            return self

    BoundModelHandle(Handle(), "org/m0").options(stream=True).run.remote("req")
    assert seen == {"options": {"stream": True}, "args": ("req",), "kwargs": {"model_id": "org/m0"}}


def test_the_catalog_checks_pools():
    with pytest.raises(CatalogError, match="pool 'nope' is not declared"):
        parse_catalog({"models": [{**POOLED[0], "pool": "nope"}], "pools": POOLS})
    with pytest.raises(CatalogError, match="differs from its pool's"):
        parse_catalog({"models": [{**POOLED[0], "hardware_profile": "gpu-l4"}], "pools": POOLS})
    catalog = parse_catalog({"models": POOLED, "pools": POOLS})
    assert [m.id for m in catalog.pooled("small")] == [m["id"] for m in POOLED]


def test_the_first_pool_is_mounted_at_models_and_pooled_models_have_no_application():
    own = {"id": "org/own", "task": "text-classification", "source": {"path": "own"}}
    other = {**POOLED[3], "id": "org/other", "pool": "other"}
    pools = [{"name": "empty"}, *POOLS, {"name": "other"}]
    apps = applications({"models": [own, *POOLED[:2], other], "pools": pools})
    assert [(a.name, a.route_prefix, a.args.get("pool")) for a in apps] == [
        ("model-org--own", "/models/org/own", None),
        # the first pool with models: every /models/... nobody else claims
        ("pool-small", "/models", "small"),
        ("pool-other", "/pools/other", "other"),  # reached by handle (the router, the first pool)
        ("hf-inference", "/", None),
    ]


def test_packaged_all_tasks_catalog_by_name_lays_out_a_pool():
    catalog = load_catalog("all-tasks")
    assert len({m.task for m in catalog.models}) >= 25
    assert all(m.pool == "small-cpu" for m in catalog.models if m.id != "HuggingFaceTB/SmolLM2-135M-Instruct")
    apps = applications({"catalog_file": "all-tasks"})
    assert [(a.name, a.route_prefix, a.import_path) for a in apps] == [
        (
            "model-HuggingFaceTB--SmolLM2-135M-Instruct",
            "/models/HuggingFaceTB/SmolLM2-135M-Instruct",
            "serving.app:build_model_app",
        ),
        ("pool-small-cpu", "/models", "serving.app:build_pool_app"),
        ("hf-inference", "/", "serving.app:build_ingress_app"),
    ]
    mounted = applications({"catalog_file": "all-tasks", "route_prefix": "/blue"})
    assert [(a.name, a.route_prefix) for a in mounted][1] == ("blue-pool-small-cpu", "/blue/models")


def test_logical_cpus_count_a_pool_once():
    from serving.config import Settings
    from serving.local import logical_cpus

    settings = Settings.load({"catalog_file": "all-tasks"})
    # SmolLM2 (1) + the pool (1) + the router (0.25), however many models the pool holds
    import os

    assert logical_cpus(settings) == max(os.cpu_count() or 1, 4)


def test_an_evicted_batched_model_is_released():
    """A batched model's batcher worker holds the model: eviction stops it, and the weights are freed."""
    import gc
    import weakref

    class BatchRunner(FakeRunner):
        batchable = True

    class BatchExecutor(FakeExecutor):
        def __init__(self, spec: ModelSpec) -> None:
            super().__init__(spec)
            self.runner = BatchRunner()

        def run_batch(self, requests, queue_ns):
            return [self.run(r) for r in requests]

    batched = [{**m, "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0}} for m in POOLED[:2]]
    pool = ModelPool(
        [ModelSpec.model_validate(m) for m in batched],
        BatchExecutor,
        max_models=1,
        max_memory_bytes=10_000,
        measure=lambda ex: 1,
    )
    backend = PoolBackend(pool)

    async def go():
        assert (await backend.run("org/m0", TaskRequest("text-classification", "x"))).output == "org/m0"
        first = weakref.ref(pool.entries["org/m0"].backend.executors["org/m0"])
        workers = list(pool.entries["org/m0"].backend.batchers["org/m0"]._workers)
        assert workers  # its requests went through a batcher, whose worker waits for more
        await backend.run("org/m1", TaskRequest("text-classification", "x"))  # evicts m0
        await asyncio.sleep(0)  # the cancelled worker finishes
        assert all(w.cancelled() for w in workers)  # stopped, not left pending until a collection finds it
        del workers
        gc.collect()
        assert list(pool.entries) == ["org/m1"] and first() is None

    run(go())


def test_the_router_sees_a_pooled_model_with_its_pools_replicas():
    from serving.pool import as_deployed

    catalog = parse_catalog(
        {
            "models": [{**POOLED[0], "replicas": 1}, {**POOLED[1], "pool": None}],
            "pools": [{**POOLS[0], "replicas": 3}],
        }
    )
    assert [(s.id, s.replicas) for s in as_deployed(catalog)] == [("org/m0", 3), ("org/m1", 1)]
