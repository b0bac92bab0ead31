"""The warm-up on the session's Ray Serve service: an image model's replica, and a pool replica that loads one,
keep their step calibration in the model store and report the figure that they kept (measured by them, or by an
earlier replica of the same model on this machine). A replica that measured without keeping would report figures
of its own, which no kept file holds."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models.compute_estimate import StepCost
from serving.config import CALIBRATION_DIR

FLUX_ID = "local/tiny-flux"
FLUX_APP = "model-local--tiny-flux"
POOL = "pool-small-cpu"


@pytest.fixture(scope="module")
def ask() -> Callable[[str, str, str, Any], Any]:
    """Calls a deployment's method by Serve handle. This driver's handles need an event loop that outlives them:
    one on a daemon thread, left running."""
    from ray import serve

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def call(deployment: str, app: str, method: str, *args: Any) -> Any:
        async def remote() -> Any:
            handle = serve.get_deployment_handle(deployment, app_name=app)
            return await getattr(handle, method).remote(*args)

        return asyncio.run_coroutine_threadsafe(remote(), loop).result(timeout=120)

    return call


def kept_points(model_store, model_id: str) -> set[tuple[tuple[float, float], ...]]:
    kept = [json.loads(path.read_text()) for path in (model_store / CALIBRATION_DIR).glob("*.json")]
    return {tuple(tuple(p) for p in entry["points"]) for entry in kept if entry["key"]["model"] == model_id}


def test_the_image_replica_reports_the_calibration_it_kept_in_the_model_store(hfi_service, ask):
    info = ask(FLUX_APP, FLUX_APP, "info")
    reported = StepCost.from_info(info["image_compute"]["step_cost"])
    assert reported is not None
    assert reported.points in kept_points(hfi_service.model_store, FLUX_ID)


def test_a_pool_replica_keeps_the_calibration_of_an_image_model_it_loads(hfi_tasks_service, ask):
    app = next(name for name in hfi_tasks_service.app_names if name.endswith(POOL))
    info = ask(POOL, app, "info", FLUX_ID)  # loads it on the pool replica, warm-up included
    assert info["pool"] is True
    reported = StepCost.from_info(info["image_compute"]["step_cost"])
    assert reported is not None
    assert reported.points in kept_points(Path(hfi_tasks_service.args["model_store"]), FLUX_ID)
