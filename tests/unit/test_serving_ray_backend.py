"""The ingress's handle layer (RayBackend) over stand-in handles: a batched model gets one call per batch.

The real path (Ray Serve handles, replicas, errors crossing the process boundary) is tested on the shared Ray
service in tests/integration/test_metering_service.py; this pins the call pattern, which Ray does not expose.
"""

from __future__ import annotations

import asyncio

from metering.timing import Timings
from models.catalog import ModelSpec
from models.errors import InvalidInput
from models.types import RunResult
from serving.deployment import RayBackend, calls_in_flight


def spec(model_id: str, **kw) -> ModelSpec:
    return ModelSpec(id=model_id, task="feature-extraction", source={"path": "/nowhere"}, **kw)


class Method:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list = []

    def remote(self, arg):
        self.calls.append(arg)
        return self.fn(arg)


class StandInHandle:
    """What RayBackend uses of a DeploymentHandle: `run.remote` and `run_many.remote`, awaitable."""

    def __init__(self, delay_s: float = 0.02) -> None:
        async def run_one(request):
            await asyncio.sleep(delay_s)
            return RunResult(output=request * 10, timings=Timings(compute_ns=1_000, queue_ns=5))

        async def run_many(requests):
            await asyncio.sleep(delay_s)  # the replica is busy: the ingress queues the next batch meanwhile
            return [
                InvalidInput(f"bad input {r}")
                if r < 0
                else RunResult(r * 10, Timings(compute_ns=1_000, queue_ns=5))
                for r in requests
            ]

        self.run = Method(run_one)
        self.run_many = Method(run_many)


def test_a_batched_model_gets_one_call_per_batch_and_each_caller_its_result():
    handle = StandInHandle()
    backend = RayBackend(
        {"m": handle}, [spec("m", batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.005})]
    )

    async def main():
        return await asyncio.gather(*(backend.run("m", i) for i in [*range(20), -1]), return_exceptions=True)

    results = asyncio.run(main())
    assert [r.output for r in results[:20]] == [i * 10 for i in range(20)]
    assert isinstance(results[20], InvalidInput) and "bad input -1" in str(results[20])  # only its caller
    assert handle.run.calls == []
    sizes = [len(c) for c in handle.run_many.calls]
    assert sum(sizes) == 21 and max(sizes) <= 8 and len(sizes) <= 5  # 21 requests in a few calls, not 21
    assert all(r.timings.queue_ns >= 5 for r in results[:20])  # the ingress wait is added to the replica's


def test_an_unbatched_model_gets_one_call_per_request():
    handle = StandInHandle(0.0)
    backend = RayBackend({"m": handle}, [spec("m")])

    async def main():
        return await asyncio.gather(*(backend.run("m", i) for i in range(3)))

    assert [r.output for r in asyncio.run(main())] == [0, 10, 20]
    assert handle.run.calls == [0, 1, 2] and handle.run_many.calls == []


def test_calls_in_flight_follow_the_replicas_and_the_autoscaling_target():
    assert calls_in_flight(spec("m", replicas=3)) == 3
    assert calls_in_flight(spec("m", replicas=0)) == 1
    autoscaled = spec("m", autoscaling={"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 1.5})
    assert calls_in_flight(autoscaled) == 6
