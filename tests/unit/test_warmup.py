"""Warm-up (serving/warmup.py): every task's warm-up body is a request its own adapter accepts, and the warm-up runs
a real forward pass on each default model, outside metering."""

from __future__ import annotations

import logging

import pytest

from models.catalog import parse_catalog
from serving.routes.base import RequestContext
from serving.routes.registry import ADAPTERS
from serving.warmup import warm_up, warm_up_where_served, warmup_body

# Tasks without a warm-up: tabular models (their columns are their owner's), and operations that are not a model's
# catalog task (chat and completion run on text-generation models, which warm up as text-generation).
NO_WARMUP = {"tabular-classification", "tabular-regression", "chat-completion", "completion"}


@pytest.mark.parametrize("task", sorted(ADAPTERS))
def test_every_tasks_warmup_body_parses_with_its_adapter(task):
    body = warmup_body(task)
    if task in NO_WARMUP:
        assert body is None
        return
    assert body is not None, f"{task} has no warm-up body"
    spec = parse_catalog({"models": [{"id": "local/m", "task": task, "source": {"path": "m"}}]}).models[0]
    ctx = RequestContext(request_id="w", inference_id="w", model_id="local/m", started_at=None)
    parsed = ADAPTERS[task].parse(body, spec, ctx)
    assert parsed.request.task == task


def test_warm_up_runs_each_default_model_once_outside_metering(executors, caplog, monkeypatch):
    from metering import metrics

    # What goes into the request window, counted (a snapshot of the window itself moves with the clock: earlier
    # tests' requests age out of it while the warm-ups run).
    observed: list[str] = []
    monkeypatch.setattr(metrics.RECENT, "observe", lambda model_id, *a, **k: observed.append(model_id))
    caplog.set_level(logging.INFO, logger="serving.warmup")
    for model_id, executor in executors.items():
        took = warm_up(executor)
        assert took is not None and took > 0, model_id
        assert f"{model_id}: warmed up" in caplog.text
    assert observed == [], "a warm-up is not a request: not in the request window"


def test_a_failing_warm_up_is_logged_and_the_replica_serves_anyway(executors, caplog):
    executor = executors["local/tiny-sentiment"]

    class Broken:
        spec = executor.spec
        runner = executor.runner

        def run(self, request):
            raise RuntimeError("out of memory")

    caplog.set_level(logging.WARNING, logger="serving.warmup")
    assert warm_up(Broken()) is None
    assert "the warm-up request failed (serving anyway): out of memory" in caplog.text


def test_on_an_event_loop_the_warm_up_runs_on_the_thread_that_runs_the_first_request(executors):
    """A replica's constructor runs on its event loop's thread; its requests run the model through that loop's
    default thread pool (asyncio.to_thread). The warm-up warms that pool's thread, not the constructor's."""
    import asyncio
    import threading

    executor = executors["local/tiny-sentiment"]
    threads: list[str] = []

    class Recording:
        spec = executor.spec
        runner = executor.runner
        warm_batch_s = None

        def run(self, request):
            threads.append(threading.current_thread().name)
            return executor.run(request)

        def run_batch(self, requests, queue_ns):
            threads.append(threading.current_thread().name)
            return executor.run_batch(requests, queue_ns)

    async def replica() -> str:
        took = warm_up_where_served(Recording())  # as the constructor calls it: sync, on the loop's thread
        assert took is not None and took > 0
        return await asyncio.to_thread(lambda: threading.current_thread().name)  # the first request's thread

    first_request = asyncio.run(replica())
    main = threading.current_thread().name
    assert threads and set(threads) == {first_request} and first_request != main, (threads, first_request)
    # A batched model whose short batches run on the loop: its thread is warmed too.
    threads.clear()

    recording = Recording()

    async def loop_too() -> str:
        warm_up_where_served(recording, here_too=True)
        return threading.current_thread().name

    loop_thread = asyncio.run(loop_too())
    assert len(set(threads)) == 2 and threads[-1] == loop_thread, threads
    # ... and its batch's time, the last run's (the loop's), is the executor's: a replica places its first batch
    # by it (on the loop when quick) instead of sending it to a thread unknown
    assert (
        Recording.warm_batch_s is None
        and isinstance(recording.warm_batch_s, float)
        and recording.warm_batch_s > 0
    )
    # Without a loop it warms this thread, where the caller then runs the model.
    threads.clear()
    assert warm_up_where_served(Recording()) is not None
    assert set(threads) == {main}


def test_the_warm_up_of_the_loops_thread_does_not_time_an_image_models_steps_again(executors, monkeypatch):
    """`here_too` warms a second thread only: an image model's step calibration (seconds of start-up) runs once."""
    import asyncio

    import serving.warmup as warmup

    executor = executors["local/tiny-flux"]
    timed: list[str] = []
    monkeypatch.setattr(
        warmup, "calibrate", lambda ex: timed.append(ex.spec.id) or getattr(ex, "step_cost", None)
    )

    async def replica() -> float | None:
        return warm_up_where_served(executor, here_too=True)

    assert asyncio.run(replica()) is not None
    assert timed == ["local/tiny-flux"]
