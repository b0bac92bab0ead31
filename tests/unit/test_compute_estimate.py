"""Caps that follow the hardware (models/compute_estimate.py): an image request whose estimated compute on the
model's hardware is past its compute limit is refused (400, naming the limit, the estimate and what fits) when it
is parsed, before any compute, so it is never charged. The estimate comes from the step times a replica measures
in its warm-up (serving/warmup.py), or from `limits.image_megapixel_steps_per_s`."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.catalog import ModelSpec, load_catalog
from models.compute_estimate import (
    ESTIMATE_MARGIN,
    MEASURED,
    OVERRIDE,
    ImageWork,
    StepCost,
    check_compute_estimate,
    fit_step_cost,
    image_work,
    max_steps_within,
    step_cost_of,
)
from models.deadline import DEFAULT_MAX_COMPUTE_S
from models.errors import InvalidInput
from models.executor import ModelExecutor
from models.types import IMAGE_TO_IMAGE, TEXT_TO_IMAGE, TaskRequest
from serving.body import RawBody
from serving.config import Settings
from serving.http import create_app
from serving.ingress import IngressCore
from serving.inprocess import LocalBackend
from serving.pool import ModelPool, PoolBackend
from serving.routes.base import RequestContext
from serving.routes.registry import ADAPTERS
from serving.warmup import calibrate, step_seconds, warm_up

FLUX = "local/tiny-flux"
IMG2IMG = "local/tiny-flux-img2img"
MP_64 = 64 * 64 / 1e6


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def _spec(task: str = TEXT_TO_IMAGE, **limits: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "id": "local/m",
            "task": task,
            "source": {"path": "m"},
            "limits": {"max_pixels": 512 * 512, "max_steps": 50, **limits},
            "defaults": {"width": 64, "height": 64, "num_inference_steps": 4}
            if task == TEXT_TO_IMAGE
            else {"num_inference_steps": 10, "strength": 0.5},
        }
    )


def _info(cost: StepCost | None, size_multiple: int = 16) -> dict[str, Any]:
    step_cost = cost.to_info() if cost is not None else None
    return {"tasks": [], "image_compute": {"size_multiple": size_multiple, "step_cost": step_cost}}


def _t2i(**params: Any) -> TaskRequest:
    return TaskRequest(TEXT_TO_IMAGE, "a cat", params)


# The step cost


def test_the_step_cost_goes_through_its_points_and_is_linear_below_them():
    cost = StepCost(((0.25, 4.0), (0.0625, 0.5)))  # out of order: sorted
    assert cost.points == ((0.0625, 0.5), (0.25, 4.0))
    assert cost.step_seconds(0.0625) == pytest.approx(0.5)
    assert cost.step_seconds(0.25) == pytest.approx(4.0)
    assert cost.step_seconds(0.03125) == pytest.approx(0.25)  # half the smallest size: half its time
    assert 0.5 < cost.step_seconds(0.125) < 4.0
    assert cost.megapixel_steps_per_s() == pytest.approx(0.125)  # at the smallest (default) size


def test_a_smaller_size_measured_slower_than_a_larger_one_takes_the_lower_figure():
    cost = StepCost(((0.01, 0.9), (0.04, 0.6)))
    assert cost.points == ((0.01, 0.6), (0.04, 0.6))


def test_past_the_largest_point_a_step_grows_between_linearly_and_quadratically():
    # a fixed part and one that grows with the square of the pixels (attention), and a per-pixel one
    attention_bound = StepCost(tuple((mp, 0.001 + 30 * mp * mp) for mp in (0.004, 0.016, 0.064)))
    linear = StepCost(((0.004, 0.04), (0.016, 0.16), (0.064, 0.64)))
    for cost in (attention_bound, linear):
        last_mp, last_s = cost.points[-1]
        for ratio in (1.5, 4.0, 16.0):
            grown = cost.step_seconds(last_mp * ratio) / last_s
            assert ratio * (1 - 1e-9) <= grown <= ratio**2 * (1 + 1e-9)
    assert linear.step_seconds(0.256) == pytest.approx(2.56)  # per-pixel cost: linear
    assert attention_bound.step_seconds(0.256) > 4 * 0.128 * 3  # mostly quadratic: far more than linear


def test_the_fit_recovers_fixed_linear_and_quadratic_costs():
    c, a, b = 0.02, 0.5, 3.0  # in units of the largest size
    top = 0.25
    points = tuple((mp, c + a * mp / top + b * (mp / top) ** 2) for mp in (0.0156, 0.0625, 0.25))
    assert fit_step_cost(points) == pytest.approx((c, a, b), rel=1e-6)
    assert fit_step_cost(((0.1, 1.0),)) == pytest.approx((0.0, 1.0, 0.0))  # one point: linear


def test_the_step_cost_crosses_info_and_back():
    cost = StepCost(((0.0041, 0.03), (0.0164, 0.12)))
    again = StepCost.from_info(cost.to_info())
    assert again == cost
    assert StepCost.from_info({"points": [{"megapixels": "x"}]}) is None
    assert StepCost.from_info(None) is None
    assert StepCost.linear(0.5).step_seconds(1.0) == pytest.approx(2.0)


def test_the_operators_figure_wins_and_with_neither_there_is_none():
    measured = _info(StepCost(((MP_64, 0.01),)))
    assert step_cost_of(_spec(), measured) is not None
    set_by_hand = step_cost_of(_spec(image_megapixel_steps_per_s=0.002), measured)
    assert set_by_hand is not None and set_by_hand.source == OVERRIDE
    assert set_by_hand.step_seconds(1.0) == pytest.approx(500.0)
    assert step_cost_of(_spec(), _info(None)) is None
    assert step_cost_of(_spec(), {"tasks": []}) is None  # a replica that says nothing (older, or no image)


def test_a_calibration_step_is_the_shortest_gap_and_on_the_cpu_at_most_its_cpu_time_per_thread():
    ms = 1_000_000
    marks = [(100 * ms, 150 * ms), (300 * ms, 350 * ms), (450 * ms, 640 * ms)]  # gaps: 200 and 150 ms of wall
    assert step_seconds(marks, 0, None) == pytest.approx(0.150)  # on a GPU: wall time
    # on 2 threads, 200 ms of CPU over a 200 ms gap is a 100 ms step: the rest was waiting for the cores
    assert step_seconds(marks, 0, 2) == pytest.approx(0.100)
    assert step_seconds([(400 * ms, 700 * ms)], 100 * ms, None) == pytest.approx(0.400)  # one step: the first


# The work a request asks for


def test_the_work_of_a_text_to_image_request_is_read_as_the_runner_reads_it():
    spec = _spec()
    assert image_work(_t2i(), spec, 16) == ImageWork(64, 64, 4)  # the model's defaults
    assert image_work(_t2i(width=256, height=128, num_inference_steps=30), spec, 16) == ImageWork(
        256, 128, 30
    )
    # malformed, or past a static cap: left to the runner's validation and its own message
    assert image_work(_t2i(width="wide"), spec, 16) is None
    assert image_work(_t2i(num_inference_steps=51), spec, 16) is None
    assert image_work(_t2i(width=1024, height=1024), spec, 16) is None


def test_the_work_of_an_image_to_image_request_comes_from_target_size_or_the_images_header():
    spec = _spec(IMAGE_TO_IMAGE)
    sized = TaskRequest(IMAGE_TO_IMAGE, _png(8, 8), {"target_size": {"width": 256, "height": 192}})
    assert image_work(sized, spec, 16) == ImageWork(256, 192, 10, 0.5)
    raw = TaskRequest(IMAGE_TO_IMAGE, _png(200, 100), {"num_inference_steps": 7, "strength": 0.9})
    assert image_work(raw, spec, 16) == ImageWork(192, 96, 7, 0.9)  # rounded down to the pipeline's multiple
    assert image_work(TaskRequest(IMAGE_TO_IMAGE, "https://example.test/a.png", {}), spec, 16) is None
    assert image_work(TaskRequest(IMAGE_TO_IMAGE, b"not an image", {}), spec, 16) is None


def test_image_to_image_runs_strength_of_its_steps():
    work = ImageWork(64, 64, 10, 0.55)
    assert work.steps_run() == 5
    assert max_steps_within(work, step_s=1.0, limit_s=3.0) == 7  # floor(7 * 0.55) = 3 steps run
    assert max_steps_within(ImageWork(64, 64, 10), step_s=1.0, limit_s=3.5) == 3


# The refusal


def test_a_request_past_the_limit_is_refused_naming_the_limit_the_estimate_and_what_fits():
    spec = _spec(max_compute_s=10)
    info = _info(StepCost(((MP_64, 0.1),)))  # 0.1 s a step at 64x64, linear: 6.4 s at 512x512
    check_compute_estimate(_t2i(num_inference_steps=50), spec, info)  # 5 s: fits
    with pytest.raises(InvalidInput) as refused:
        check_compute_estimate(_t2i(width=512, height=512, num_inference_steps=50), spec, info)
    message = refused.value.message
    assert refused.value.status_code == 400
    assert "limits.max_compute_s" in message and "10 s" in message and "cpu-basic" in message
    assert "estimated at 320 s" in message and "measured on this replica" in message
    assert "at most 1 step at 512x512" in message  # 6.4 s a step: one fits in 10 s
    fitting = re.search(r"50 steps at up to (\d+)x(\d+)", message)
    assert fitting is not None
    width, height = int(fitting[1]), int(fitting[2])
    assert width == height and width % 16 == 0
    check_compute_estimate(
        _t2i(width=width, height=height, num_inference_steps=50), spec, info
    )  # and it does


def test_the_margin_lets_through_an_estimate_a_little_past_the_limit():
    spec = _spec(max_compute_s=3)
    info = _info(StepCost(((MP_64, 0.1),)))
    check_compute_estimate(_t2i(num_inference_steps=50), spec, info)  # 5 s: past 3 s, within the 2x margin
    assert ESTIMATE_MARGIN * 3 > 5.0
    with pytest.raises(InvalidInput):
        check_compute_estimate(_t2i(num_inference_steps=50), _spec(max_compute_s=2), info)  # 5 s > 2 x 2 s


def test_without_a_step_cost_or_for_other_tasks_only_the_static_caps_apply():
    big = _t2i(width=512, height=512, num_inference_steps=50)
    check_compute_estimate(big, _spec(max_compute_s=0.001), _info(None))
    check_compute_estimate(big, _spec(max_compute_s=0.001), {"tasks": []})
    spec = _spec(max_compute_s=0.001, image_megapixel_steps_per_s=1e-6)
    check_compute_estimate(TaskRequest("text-classification", "hi", {}), spec, {})
    with pytest.raises(InvalidInput, match=OVERRIDE):  # the operator's figure, with nothing measured
        check_compute_estimate(big, spec, _info(None))


def test_an_image_to_image_request_parsed_from_a_raw_body_is_refused_by_its_images_size():
    spec = _spec(IMAGE_TO_IMAGE, max_compute_s=10)
    info = _info(StepCost(((MP_64, 0.1),)), size_multiple=16)
    ctx = RequestContext(request_id="r", inference_id="r", model_id=spec.id, started_at=None)
    adapter = ADAPTERS[IMAGE_TO_IMAGE]
    small = adapter.parse(RawBody(_png(64, 64), "image/png"), spec, ctx).request
    check_compute_estimate(small, spec, info)  # 5 of 10 steps run at 64x64: 0.5 s
    big = {"inputs": base64.b64encode(_png(512, 512)).decode(), "parameters": {"num_inference_steps": 40}}
    with pytest.raises(InvalidInput) as refused:
        check_compute_estimate(adapter.parse(big, spec, ctx).request, spec, info)
    assert "512x512 at 40 steps (strength 0.5: 20 steps run)" in refused.value.message


# The real tiny FLUX, measured in its warm-up, behind the HTTP app in process


@pytest.fixture(scope="module")
def measured(default_settings, tmp_path_factory):
    """Its own tiny FLUX (the session's executors are shared), warmed up and so measured; a compute limit that
    512x512 at 50 steps is past by 4x on this machine (the default limit, or less on a machine fast enough to fit
    it); tiny FLUX img2img with the operator's figure. An ingress over both."""
    flux = load_catalog().get(FLUX)
    img2img = load_catalog("vision-audio").get(IMG2IMG)
    assert flux is not None and img2img is not None
    options = default_settings.load_options()
    executor = ModelExecutor(flux, options, torch_threads=2)
    assert warm_up(executor) is not None
    cost = executor.step_cost
    assert cost is not None and len(cost.points) >= 1
    big_s = 50 * cost.step_seconds(512 * 512 / 1e6)
    limit = min(DEFAULT_MAX_COMPUTE_S[TEXT_TO_IMAGE], big_s / 4)
    flux_spec = flux.model_dump(mode="json", exclude_none=True)
    flux_spec["limits"]["max_compute_s"] = limit
    executor.spec = ModelSpec.model_validate(flux_spec)  # the replica stops at the same limit
    img2img_spec = img2img.model_dump(mode="json", exclude_none=True)
    img2img_spec["limits"]["image_megapixel_steps_per_s"] = 1e-3
    work = tmp_path_factory.mktemp("estimate")
    settings = Settings.load(
        {
            "model_store": str(default_settings.model_store),
            "offline": True,
            "models": [flux_spec, img2img_spec],
            "metering": {"database_url": f"sqlite:///{work / 'ledger.db'}", "spool_dir": str(work / "spool")},
        },
        env={},
    )
    catalog, _ = settings.validated()
    executors = {FLUX: executor, IMG2IMG: ModelExecutor(catalog.get(IMG2IMG), options, torch_threads=2)}
    core = IngressCore(settings, LocalBackend(executors))
    with TestClient(create_app(core), raise_server_exceptions=False) as client:
        yield client, core, executor
    core.close()


def _charges(core: IngressCore) -> list:
    assert core.metering.flush(30)
    return list(core.metering.charges())


def test_the_warm_up_measures_tiny_flux_and_its_info_says_so(measured):
    _, core, executor = measured
    info = asyncio.run(core.backend.info(FLUX))
    compute = info["image_compute"]
    assert compute["size_multiple"] == executor.runner.size_multiple
    points = compute["step_cost"]["points"]
    assert points[0]["megapixels"] == pytest.approx(64 * 64 / 1e6)  # from the model's default size up
    assert all(p["seconds_per_step"] > 0 and p["megapixel_steps_per_s"] > 0 for p in points)
    assert [p["megapixels"] for p in points] == sorted(p["megapixels"] for p in points)
    assert StepCost.from_info(compute["step_cost"]) == executor.step_cost
    assert asyncio.run(core.backend.info(IMG2IMG))["image_compute"]["step_cost"] is None  # not warmed up here


def test_image_to_image_is_measured_from_64x64_up_within_its_pixel_cap(measured):
    _, core, _ = measured
    executor = core.backend.executors[IMG2IMG]
    cost = calibrate(executor)
    assert cost is not None and cost.source == MEASURED
    assert cost.points[0][0] == pytest.approx(64 * 64 / 1e6)
    assert all(mp <= executor.spec.limits.max_pixels / 1e6 for mp, _ in cost.points)


def test_a_pool_reports_the_measurement_of_the_model_it_loaded(measured):
    executor = measured[2]
    pool = ModelPool([executor.spec], lambda spec: executor, max_models=1, max_memory_bytes=1 << 40)
    info = asyncio.run(PoolBackend(pool).info(FLUX))
    assert info["pool"] is True
    assert StepCost.from_info(info["image_compute"]["step_cost"]) == executor.step_cost


def test_an_image_too_big_for_the_limit_is_refused_before_it_runs_and_one_that_fits_runs(
    measured, monkeypatch
):
    client, core, executor = measured
    ran: list[TaskRequest] = []
    run = executor.run
    monkeypatch.setattr(
        executor, "run", lambda request, *a, **kw: ran.append(request) or run(request, *a, **kw)
    )
    before = len(_charges(core))
    body = {"inputs": "a cat", "parameters": {"width": 512, "height": 512, "num_inference_steps": 50}}
    r = client.post(f"/models/{FLUX}", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "limits.max_compute_s" in error and "estimated at" in error and "cpu-basic" in error
    assert re.search(r"at most \d+ steps? at 512x512|50 steps at up to \d+x\d+", error), error
    assert ran == [], "refused before the replica saw it"
    assert len(_charges(core)) == before, "refused before any compute: never charged"

    ok = client.post(f"/models/{FLUX}", json={"inputs": "a cat"}, headers={"accept": "image/png"})
    assert ok.status_code == 200, ok.text
    assert ok.content[:8] == b"\x89PNG\r\n\x1a\n" and len(ran) == 1
    charges = _charges(core)
    assert len(charges) == before + 1 and charges[-1].usage.model_id == FLUX


def test_image_to_image_is_refused_by_the_operators_figure_and_a_small_one_runs(measured):
    client, core, _ = measured
    before = len(_charges(core))
    big = client.post(
        f"/models/{IMG2IMG}",
        content=_png(512, 512),
        headers={"content-type": "image/png"},
    )
    assert big.status_code == 400, big.text
    assert OVERRIDE in big.json()["error"] and "512x512" in big.json()["error"]
    assert len(_charges(core)) == before
    small = client.post(f"/models/{IMG2IMG}", content=_png(64, 64), headers={"content-type": "image/png"})
    assert small.status_code == 200, small.text
    assert len(_charges(core)) == before + 1
