"""The ingress's handle layer (RayBackend) over stand-in handles: a batched model gets one call per batch.

The real path (Ray Serve handles, replicas, errors crossing the process boundary) is tested on the shared Ray
service in tests/integration/test_metering_service.py; this pins the call pattern, which Ray does not expose.
"""

from __future__ import annotations

import asyncio

from core.timing import Timings
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


def dying_handle(deaths: int) -> StandInHandle:
    """A handle whose replica dies (Ray's ActorDiedError) on the first `deaths` calls, then answers."""
    from ray.exceptions import ActorDiedError

    handle = StandInHandle(0.0)
    left = [deaths]

    async def run_one(request):
        if left[0] > 0:
            left[0] -= 1
            raise ActorDiedError()
        return RunResult(output=request * 10, timings=Timings(compute_ns=1_000))

    handle.run = Method(run_one)
    return handle


def test_a_request_whose_replica_died_is_retried_once():
    handle = dying_handle(1)
    backend = RayBackend({"m": handle}, [spec("m")])
    assert asyncio.run(backend.run("m", 4)).output == 40
    assert handle.run.calls == [4, 4]


def test_a_second_death_is_a_503_with_retry_after_never_a_500():
    from models.errors import ReplicaUnavailable
    from serving.errors import error_response

    handle = dying_handle(2)
    backend = RayBackend({"m": handle}, [spec("m")])
    try:
        asyncio.run(backend.run("m", 4))
    except ReplicaUnavailable as err:
        response = error_response(err)
    else:
        raise AssertionError("two deaths must not answer")
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert handle.run.calls == [4, 4]  # once, then one retry: no more


def test_a_batch_whose_replica_died_is_retried_for_each_caller():
    from ray.exceptions import ActorDiedError

    handle = StandInHandle(0.0)
    died = [False]
    run_many = handle.run_many.fn

    async def dies_once(requests):
        if not died[0]:
            died[0] = True
            raise ActorDiedError()
        return await run_many(requests)

    handle.run_many = Method(dies_once)
    backend = RayBackend(
        {"m": handle}, [spec("m", batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.005})]
    )

    async def main():
        return await asyncio.gather(*(backend.run("m", i) for i in range(6)))

    assert [r.output for r in asyncio.run(main())] == [i * 10 for i in range(6)]
    assert sum(len(c) for c in handle.run_many.calls) >= 12  # every request went out twice


class ProgressStream:
    """What `handle.options(stream=True).run_progress.remote()` gives: heartbeats, then (never) a result."""

    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self):
        return self._items()

    async def _items(self):
        from models.types import Progress

        for elapsed in (10, 20, 30):
            yield Progress(elapsed)
        await asyncio.sleep(3600)  # a long run, until the caller goes away

    def cancel(self) -> None:
        self.cancelled = True


def test_a_stoppable_model_whose_caller_leaves_is_stopped_and_interrupted_with_what_ran():
    from models.types import Interrupted

    stream = ProgressStream()
    handle = StandInHandle(0.0)
    handle.run_progress = Method(lambda request: stream)
    handle.options = lambda **kw: handle
    backend = RayBackend({"m": handle}, [spec("m")])
    backend.stoppable["m"] = True  # what its info() said

    async def main():
        task = asyncio.create_task(backend.run("m", 1))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except Interrupted as gone:
            return gone
        raise AssertionError("a cancelled caller must get Interrupted")

    gone = asyncio.run(main())
    assert gone.compute_ns == 30 and gone.result is None
    assert stream.cancelled  # the replica's generator was told to stop
    assert handle.run.calls == []


def test_an_unstoppable_model_whose_caller_leaves_finishes_and_is_interrupted_with_its_result():
    from models.types import Interrupted

    handle = StandInHandle(0.2)
    backend = RayBackend({"m": handle}, [spec("m")])

    async def main():
        task = asyncio.create_task(backend.run("m", 2))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except Interrupted as gone:
            return gone
        raise AssertionError("a cancelled caller must get Interrupted")

    gone = asyncio.run(main())
    assert gone.result.output == 20 and gone.compute_ns == 1_000  # it ran to its end: all of it is charged
