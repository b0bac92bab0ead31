"""The compute deadline (`limits.max_compute_s`): enforced on the replica through the stoppable runners; past it the
work stops, the request gets a 504 naming the limit, and it is charged for what ran."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metering.records import STATUS_DEADLINE_EXCEEDED
from models.catalog import load_catalog, parse_catalog
from models.deadline import DEFAULT_MAX_COMPUTE_S, ComputeDeadlineExceeded, max_compute_s
from models.executor import ModelExecutor
from models.types import TEXT_TO_IMAGE, TaskRequest
from serving.config import Settings
from serving.http import create_app
from serving.ingress import IngressCore
from serving.inprocess import InProcessBackend

FLUX = "local/tiny-flux"
LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_LIMIT_S = 1e-6  # passed after the first step, whatever the machine


def _spec(model_id: str, limit_s: float | None) -> dict[str, Any]:
    spec = load_catalog().get(model_id).model_dump(mode="json", exclude_none=True)
    if limit_s is not None:
        spec["limits"]["max_compute_s"] = limit_s
    return spec


def test_each_task_has_a_default_and_the_catalog_overrides_it():
    catalog = parse_catalog({"models": [_spec(FLUX, None)]})
    assert max_compute_s(catalog.models[0]) == DEFAULT_MAX_COMPUTE_S[TEXT_TO_IMAGE]
    catalog = parse_catalog({"models": [_spec(FLUX, 2.5)]})
    assert max_compute_s(catalog.models[0]) == 2.5


def test_the_executor_stops_an_image_at_the_limit_with_the_compute_that_ran(default_settings):
    spec = parse_catalog({"models": [_spec(FLUX, TINY_LIMIT_S)]}).models[0]
    executor = ModelExecutor(spec, default_settings.load_options(), torch_threads=1)
    request = TaskRequest(TEXT_TO_IMAGE, "a cat", {"num_inference_steps": 8, "width": 64, "height": 64})
    with pytest.raises(ComputeDeadlineExceeded) as stopped:
        executor.run(request)  # no client watching: the limit alone stops it
    err = stopped.value
    assert err.status_code == 504 and err.compute_ns > 0
    assert "limits.max_compute_s" in err.message and "1e-06 s" in err.message


@pytest.fixture(scope="module")
def limited(model_store, tmp_path_factory):
    """An ingress over tiny-flux and SmolLM, both with a compute limit no request can stay within."""
    work = tmp_path_factory.mktemp("deadline")
    settings = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "models": [_spec(FLUX, TINY_LIMIT_S), _spec(LLM, TINY_LIMIT_S)],
            "metering": {"database_url": f"sqlite:///{work / 'ledger.db'}", "spool_dir": str(work / "spool")},
        },
        env={},
    )
    catalog, _ = settings.validated()
    core = IngressCore(settings, InProcessBackend(catalog, settings.load_options(), torch_threads=1))
    with TestClient(create_app(core), raise_server_exceptions=False) as client:
        yield client, core
    core.close()


def _charge(core: IngressCore, inference_id: str):
    assert core.metering.flush(30)
    found = [c for c in core.metering.charges() if c.usage.request_id == inference_id]
    assert len(found) == 1, "charged once"
    return found[0]


def test_an_image_past_the_limit_is_a_504_naming_it_and_is_charged_for_what_ran(limited):
    client, core = limited
    r = client.post(f"/models/{FLUX}", json={"inputs": "a cat", "parameters": {"num_inference_steps": 8}})
    assert r.status_code == 504, r.text
    assert "limits.max_compute_s" in r.json()["error"] and r.json()["error_type"] == "timeout"
    charge = _charge(core, r.headers["x-request-id"])  # the error answer names the request it charged
    assert charge.usage.status == STATUS_DEADLINE_EXCEEDED and charge.usage.compute_ns > 0


def test_a_stream_past_the_limit_ends_with_an_error_naming_it_and_is_charged(limited):
    client, core = limited
    body = {"messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 40, "stream": True}
    r = client.post(f"/models/{LLM}/v1/chat/completions", json=body)
    assert r.status_code == 200  # the status line went out with the first chunk
    events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    last = json.loads(events[-1])
    assert "limits.max_compute_s" in last["error"], events[-3:]
    charge = _charge(core, r.headers["inference-id"])
    assert charge.usage.status == STATUS_DEADLINE_EXCEEDED and charge.usage.compute_ns > 0


def test_a_generation_past_the_limit_is_a_504(limited):
    client, core = limited
    body = {"messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 40}
    r = client.post(f"/models/{LLM}/v1/chat/completions", json=body)
    assert r.status_code == 504 and "limits.max_compute_s" in r.json()["error"], r.text
    assert _charge(core, r.headers["x-request-id"]).usage.status == STATUS_DEADLINE_EXCEEDED
