"""A client that leaves a non-streamed request: charged for the compute that ran, flagged, and a long request
(images, generation) stops at its next step. Driven through the real ASGI app and the real tiny models in
process; the disconnect is the cancellation Ray Serve delivers to the request's task."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest

from core.timing import Timings
from metering.records import STATUS_CLIENT_DISCONNECTED
from models.types import Interrupted, Progress, RunResult
from serving.config import Settings
from serving.http import create_app
from serving.ingress import IngressCore
from serving.streaming import finish_despite_cancel, result_of


def settings_in(tmp_path, default_settings: Settings) -> Settings:
    data = default_settings.model_dump()
    data["metering"].update(
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}", spool_dir=str(tmp_path / "spool")
    )
    return Settings.load(data, env={})


async def post_then_leave(app: Any, path: str, body: dict[str, Any], leave_when: Any) -> None:
    """POST `body` to the ASGI `app` and cancel the request's task once `leave_when()` holds (bounded)."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the disconnect is the cancellation below
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"the request should not have answered: {message}")

    task = asyncio.create_task(app(scope, receive, send))
    deadline = time.monotonic() + 60
    while not leave_when():
        assert time.monotonic() < deadline, "the request never started its compute"
        assert not task.done(), task
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def wait_for(predicate: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_client_that_leaves_an_image_request_is_charged_for_the_steps_that_ran(
    tmp_path, default_settings, inprocess_backend, monkeypatch
) -> None:
    core = IngressCore(settings_in(tmp_path, default_settings), inprocess_backend)
    executor = inprocess_backend.executors["local/tiny-flux"]
    steps: list[int] = []
    run_steps = executor.runner.run_steps

    def counting(request, on_step, should_stop):
        return run_steps(request, lambda: (steps.append(1), on_step()), should_stop)

    monkeypatch.setattr(executor.runner, "run_steps", counting)
    body = {"inputs": "a cat", "parameters": {"width": 128, "height": 128, "num_inference_steps": 50}}

    async def scenario() -> None:
        await post_then_leave(create_app(core), "/models/local/tiny-flux", body, lambda: len(steps) >= 2)
        while core._background:  # the charge is recorded after the request is gone
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
        wait_for(lambda: not executor._lock.locked())  # the runner stopped and let go of the model
        assert 2 <= len(steps) < 50, f"{len(steps)} of 50 steps ran after the client left"
        assert core.metering.flush(10)
        [charge] = core.metering.charges()
        assert charge.usage.status == STATUS_CLIENT_DISCONNECTED
        assert charge.usage.model_id == "local/tiny-flux"
        assert charge.usage.compute_ns > 0 and charge.cost_nanousd > 0
    finally:
        core.close()


def test_a_client_that_leaves_during_the_first_step_is_charged_the_exact_compute(
    tmp_path, default_settings, inprocess_backend, monkeypatch
) -> None:
    """In the model's own process the stopped runner reports what it ran, to the nanosecond: a client that
    leaves before the first step ends still pays for that step (a heartbeat would have said 0)."""
    core = IngressCore(settings_in(tmp_path, default_settings), inprocess_backend)
    executor = inprocess_backend.executors["local/tiny-flux"]
    steps: list[int] = []
    run_steps = executor.runner.run_steps

    def counting(request, on_step, should_stop):
        return run_steps(request, lambda: (steps.append(1), on_step()), should_stop)

    monkeypatch.setattr(executor.runner, "run_steps", counting)
    body = {"inputs": "a cat", "parameters": {"width": 128, "height": 128, "num_inference_steps": 50}}

    async def scenario() -> None:
        await post_then_leave(create_app(core), "/models/local/tiny-flux", body, executor._lock.locked)
        while core._background:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
        assert len(steps) <= 2, f"{len(steps)} steps ran after the client left in the first one"
        assert core.metering.flush(10)
        [charge] = core.metering.charges()
        assert charge.usage.status == STATUS_CLIENT_DISCONNECTED
        assert charge.usage.compute_ns > 0 and charge.cost_nanousd > 0
    finally:
        core.close()


def test_a_client_that_leaves_a_short_request_is_charged_for_all_of_it(tmp_path, default_settings) -> None:
    """A model that cannot stop early finishes the request anyway: its whole compute is charged, flagged."""
    started, release = threading.Event(), threading.Event()

    class Blocking:
        async def info(self, model_id):
            return {"revision": "abc", "tasks": ["text-classification"]}

        async def run(self, model_id, request):
            def work() -> RunResult:
                started.set()
                release.wait(30)
                return RunResult(output=[[{"label": "POSITIVE", "score": 1.0}]], timings=Timings(7_000_000))

            return await finish_despite_cancel(asyncio.to_thread(work))

        def stream(self, model_id, request):
            raise NotImplementedError

    core = IngressCore(settings_in(tmp_path, default_settings), Blocking())

    async def scenario() -> None:
        await post_then_leave(
            create_app(core), "/models/local/tiny-sentiment", {"inputs": "x"}, started.is_set
        )
        release.set()
        while core._background:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
        assert core.metering.flush(10)
        [charge] = core.metering.charges()
        assert (charge.usage.status, charge.usage.compute_ns) == (STATUS_CLIENT_DISCONNECTED, 7_000_000)
    finally:
        core.close()


def test_a_client_that_leaves_before_any_step_ran_is_not_charged(tmp_path, default_settings) -> None:
    """Left while still queued (or before the replica refused it): no step ran, so Interrupted carries no
    compute and no result, and nothing is charged (as a stream left before its first token)."""
    started = threading.Event()

    class Queued:
        async def info(self, model_id):
            return {"revision": "abc", "tasks": ["text-to-image"], "stoppable": True}

        async def run(self, model_id, request):
            async def waiting():
                started.set()
                await asyncio.sleep(3600)
                yield RunResult(output=None, timings=Timings(1))

            return await result_of(waiting(), lambda: None)

        def stream(self, model_id, request):
            raise NotImplementedError

    core = IngressCore(settings_in(tmp_path, default_settings), Queued())

    async def scenario() -> None:
        await post_then_leave(
            create_app(core), "/models/local/tiny-flux", {"inputs": "a cat"}, started.is_set
        )
        while core._background:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
        assert core.metering.flush(10)
        assert core.metering.charges() == []
    finally:
        core.close()


def test_result_of_turns_a_cancellation_into_the_compute_of_the_last_heartbeat() -> None:
    stopped: list[bool] = []

    async def items():
        yield Progress(5)
        yield Progress(9)
        await asyncio.sleep(3600)
        yield RunResult(output=None, timings=Timings(1))

    async def scenario() -> Interrupted:
        task = asyncio.create_task(result_of(items(), lambda: stopped.append(True)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(Interrupted) as err:
            await task
        return err.value

    gone = asyncio.run(scenario())
    assert (gone.compute_ns, gone.result, stopped) == (9, None, [True])


def test_result_of_returns_the_result_and_a_failure_is_not_interrupted() -> None:
    async def ok():
        yield Progress(1)
        yield RunResult(output="done", timings=Timings(3))

    async def failing():
        yield Progress(1)
        raise RuntimeError("the replica died")

    assert asyncio.run(result_of(ok(), lambda: None)).output == "done"
    with pytest.raises(RuntimeError, match="replica died"):
        asyncio.run(result_of(failing(), lambda: None))


def test_interrupted_crosses_a_pickle_with_its_fields() -> None:
    import pickle

    result = RunResult(output=None, timings=Timings(4), usage={"images": 1})
    again = pickle.loads(pickle.dumps(Interrupted(4, result)))
    assert (again.compute_ns, again.result.timings.compute_ns) == (4, 4)


class _SlowStoppable:
    """An executor whose run takes a few steps after it is told to stop, and reports the compute that ran."""

    stoppable = True

    def run(self, request: Any, should_stop: Any = None, total_steps: int = 1000) -> RunResult:
        steps = 0
        while steps < total_steps:
            time.sleep(0.01)
            steps += 1
            if should_stop is not None and should_stop():
                time.sleep(0.1)  # the step in progress ends first
                raise Interrupted(steps * 10_000_000)
        return RunResult(output="done", timings=Timings(steps * 10_000_000))


@pytest.mark.parametrize("how", ["stoppable", "finish"])
def test_a_second_cancellation_while_the_work_winds_down_still_charges_what_ran(how: str) -> None:
    """Serve's replica and the service's own middleware can both cancel the handler of a client that left: the
    second cancellation lands while the first one's wait for the work is in progress. The caller still gets
    Interrupted with the compute that ran (charged), never a bare CancelledError (charged nothing)."""
    from serving.streaming import run_stoppable

    executor = _SlowStoppable()

    async def scenario() -> Interrupted:
        if how == "stoppable":
            work = run_stoppable(executor, None)
        else:
            work = finish_despite_cancel(asyncio.to_thread(executor.run, None, None, 30))  # cannot stop early
        task = asyncio.create_task(work)
        await asyncio.sleep(0.1)
        stops.append(1)
        task.cancel()
        await asyncio.sleep(0.03)
        task.cancel()  # the second notice of the same disconnect
        with pytest.raises(Interrupted) as err:
            await task
        return err.value

    stops: list[int] = []
    gone = asyncio.run(scenario())
    assert gone.compute_ns >= 10_000_000
