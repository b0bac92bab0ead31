"""The warm-up on the session's Ray Serve service: the image model's replica keeps its step calibration in the
model store, and reports the same figure that it kept (measured by it, or by an earlier replica on this machine)."""

from __future__ import annotations

import asyncio
import json
import threading

from models.compute_estimate import StepCost
from serving.config import CALIBRATION_DIR

FLUX_ID = "local/tiny-flux"
FLUX_APP = "model-local--tiny-flux"


def test_the_image_replica_reports_the_calibration_it_kept_in_the_model_store(hfi_service):
    from ray import serve

    # This driver's handles need an event loop that outlives them: one on a daemon thread, left running.
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def ask() -> dict:
        return await serve.get_deployment_handle(FLUX_APP, app_name=FLUX_APP).info.remote()

    info = asyncio.run_coroutine_threadsafe(ask(), loop).result(timeout=60)
    reported = StepCost.from_info(info["image_compute"]["step_cost"])
    assert reported is not None
    kept = [
        json.loads(path.read_text())
        for path in (hfi_service.model_store / CALIBRATION_DIR).glob("*.json")
        if json.loads(path.read_text())["key"]["model"] == FLUX_ID
    ]
    assert kept, "no calibration kept for the image model"
    points = {tuple(tuple(p) for p in entry["points"]) for entry in kept}
    assert reported.points in points
