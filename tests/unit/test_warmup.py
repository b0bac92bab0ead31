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


# Kept calibrations (serving.warmup.CalibrationCache): a later replica of the same model on the same hardware takes
# the figure instead of timing steps again (seconds of every start of an image model).


def _counting_calibrate(monkeypatch, points=((0.004096, 0.01), (0.016384, 0.03))):
    """`calibrate` replaced by one that counts its calls and returns a fixed measurement."""
    import serving.warmup as warmup
    from models.compute_estimate import StepCost

    calls: list[str] = []

    def calibrate(executor):
        calls.append(executor.spec.id)
        return StepCost(points)

    monkeypatch.setattr(warmup, "calibrate", calibrate)
    return calls


def test_a_kept_calibration_is_reused_by_the_next_replica_on_the_same_hardware(
    executors, tmp_path, monkeypatch
):
    from models.compute_estimate import KEPT, MEASURED
    from serving.warmup import CalibrationCache, step_cost

    executor = executors["local/tiny-flux"]
    calls = _counting_calibrate(monkeypatch)
    cache = CalibrationCache(tmp_path / "calibration", 3600)
    first = step_cost(executor, cache)
    assert calls == ["local/tiny-flux"]
    (kept,) = (tmp_path / "calibration").iterdir()
    assert kept.suffix == ".json"
    kept_cost = step_cost(executor, cache)  # from the file
    assert calls == ["local/tiny-flux"]
    assert kept_cost is not None and first is not None
    assert kept_cost.points == first.points and (first.source, kept_cost.source) == (MEASURED, KEPT)
    assert step_cost(executor, None) == first  # no cache: measured again
    assert len(calls) == 2
    # warm_up takes it from there too
    assert warm_up(executor, calibrations=cache) is not None and executor.step_cost == kept_cost
    assert len(calls) == 2


def test_a_calibration_is_measured_again_when_anything_it_depends_on_differs(
    executors, tmp_path, monkeypatch
):
    import torch

    from serving.warmup import CalibrationCache, calibration_key, step_cost

    executor = executors["local/tiny-flux"]
    calls = _counting_calibrate(monkeypatch)
    cache = CalibrationCache(tmp_path, 3600)
    step_cost(executor, cache)
    key = calibration_key(executor)
    assert key["model"] == "local/tiny-flux" and key["revision"] == executor.revision
    assert key["device"] == "cpu" and "cores)" in key["hardware"]
    assert (
        key["torch_threads"] == torch.get_num_threads()
        and key["max_pixels"] == executor.spec.limits.max_pixels
    )
    # other limits, or other load options: another key, measured
    spec = executor.spec
    monkeypatch.setattr(
        executor, "spec", spec.model_copy(update={"options": {"optimize": {"compile": True}}})
    )
    step_cost(executor, cache)
    assert len(calls) == 2
    calls.pop()
    monkeypatch.setattr(
        executor,
        "spec",
        spec.model_copy(update={"limits": spec.limits.model_copy(update={"max_pixels": 128 * 128})}),
    )
    step_cost(executor, cache)
    assert len(calls) == 2
    monkeypatch.setattr(executor, "spec", spec)
    # other torch threads: measured
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        step_cost(executor, cache)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3
    step_cost(executor, cache)  # the first one's still there
    assert len(calls) == 3


def test_an_old_or_broken_kept_calibration_is_measured_again_and_replaced(
    executors, tmp_path, monkeypatch, caplog
):
    import json

    from serving.warmup import CalibrationCache, step_cost

    executor = executors["local/tiny-flux"]
    calls = _counting_calibrate(monkeypatch)
    cache = CalibrationCache(tmp_path, 3600)
    step_cost(executor, cache)
    (path,) = tmp_path.iterdir()
    kept = json.loads(path.read_text())
    path.write_text(json.dumps({**kept, "measured_at": kept["measured_at"] - 3601}))  # past its age
    step_cost(executor, cache)
    assert len(calls) == 2
    assert json.loads(path.read_text())["measured_at"] > kept["measured_at"]  # replaced
    caplog.set_level(logging.INFO, logger="serving.warmup")
    for broken in (
        "{not json",
        json.dumps({**kept, "points": [[0.01, -1]]}),
        json.dumps({"key": kept["key"]}),
    ):
        path.write_text(broken)
        step_cost(executor, cache)
    assert len(calls) == 5
    assert "not usable" in caplog.text
    assert step_cost(executor, cache) is not None and len(calls) == 5  # the last measurement, kept


def test_a_store_that_cannot_keep_calibrations_still_measures(executors, tmp_path, monkeypatch, caplog):
    from serving.warmup import CalibrationCache, step_cost

    executor = executors["local/tiny-flux"]
    calls = _counting_calibrate(monkeypatch)
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # where the directory would be
    caplog.set_level(logging.INFO, logger="serving.warmup")
    cache = CalibrationCache(blocked / "calibration", 3600)
    assert step_cost(executor, cache) is not None
    assert step_cost(executor, cache) is not None
    assert len(calls) == 2
    assert "not kept" in caplog.text


def test_the_settings_keep_calibrations_in_the_model_store_unless_turned_off(tmp_path):
    from serving.config import Settings

    cache = Settings.load({"model_store": str(tmp_path)}, env={}).calibration_cache()
    assert cache is not None and cache.directory == tmp_path / ".calibration" and cache.max_age_s == 7 * 86400
    assert Settings.load({"calibration_cache_days": 0}, env={}).calibration_cache() is None
