"""Scale to zero on the real Ray Serve: a model with `autoscaling.min_replicas: 0` and a short idle timeout, mounted
at /s2z beside the shared service (same Ray, same ledger).

It starts with no replica; a request without `x-wait-for-model` gets 503 with `estimated_time` and Retry-After at
once and starts one; a request with the header (or the legacy `options.wait_for_model`) is held and answered, its
wait in `x-queue-time` and never in the charge; the replica goes after the idle timeout (Serve's own count says
so, and /health); the next request brings it back; the real InferenceClient gets an answer with the header.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml
from huggingface_hub import InferenceClient
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

MOUNT = "/s2z"
MODEL = "local/tiny-sentiment"
ESTIMATE_S = 7.0


@pytest.fixture(scope="module")
def s2z(hfi_service, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve

    from models.catalog import packaged_catalog_path
    from serving.app import applications

    data = yaml.safe_load(packaged_catalog_path("default").read_text())
    (spec,) = [m for m in data["models"] if m["id"] == MODEL]
    spec.pop("replicas", None)
    # A profile of its own that reserves little: the session's Ray counts logical CPUs for the shared service, and
    # other modules' applications may hold the spare ones when this test runs.
    spec["hardware_profile"] = "cpu-s2z"
    spec["autoscaling"] = {
        "min_replicas": 0,
        "max_replicas": 1,
        "idle_timeout_s": 4,
        "estimated_load_s": ESTIMATE_S,
        "max_waiting_requests": 4,
    }
    catalog = Path(tmp_path_factory.mktemp("s2z")) / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [spec]}))
    profile = {
        "name": "cpu-s2z",
        "description": "cpu-basic's price, a tenth of a logical CPU reserved",
        "cpus": 0.1,
        "memory_gb": 2,
        "torch_threads": 1,
        "prices": [{"effective_from": "2025-01-01", "usd_per_hour": "0.033"}],
    }
    args = {**hfi_service.args, "catalog_file": str(catalog), "route_prefix": MOUNT, "profiles": [profile]}
    apps = applications(args)
    assert [a.route_prefix for a in apps] == [None, MOUNT], (
        "a model that scales to zero has no route of its own"
    )
    serve.run_many([serve.RunTarget(a.build(), name=a.name, route_prefix=a.route_prefix) for a in apps])
    try:
        yield {"url": f"{hfi_service.url}{MOUNT}", "app": apps[0].name, "db": hfi_service.database_url}
    finally:
        for app in apps:
            serve.delete(app.name)


def running(app: str) -> int:
    from serving.runtime_status import serve_replicas

    return serve_replicas().get(app, {}).get("running", 0)


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def charge_of(db: str, request_id: str) -> dict | None:
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT compute_ns, queue_ns, cost_nanousd FROM metering_charges WHERE request_id = :r"),
                {"r": request_id},
            ).one_or_none()
    except OperationalError:  # the ledger's first drain has not made its table yet
        return None
    finally:
        engine.dispose()
    return None if row is None else dict(row._mapping)


def test_scale_to_zero_round_trip(s2z):
    url, app = s2z["url"], s2z["app"]
    endpoint = f"{url}/models/{MODEL}"
    assert running(app) == 0, "min_replicas 0: nothing is loaded at start"
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["models"][MODEL] == "scaled_to_zero", health

    # No replica, no wait asked: 503 at once, with the catalog's estimate (nothing measured yet), and a start.
    started = time.monotonic()
    refused = httpx.post(endpoint, json={"inputs": "good"}, timeout=30)
    assert time.monotonic() - started < 5, "answered at once, not held"
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert body["error"] == f"Model {MODEL} is currently loading"
    assert 0 < body["estimated_time"] <= ESTIMATE_S
    assert int(refused.headers["retry-after"]) >= 1

    # The header holds the request until the replica is up; the wait is queue time, never charged.
    held = httpx.post(endpoint, json={"inputs": "good"}, headers={"x-wait-for-model": "true"}, timeout=120)
    assert held.status_code == 200, held.text
    assert running(app) == 1
    queue_s, compute_s = float(held.headers["x-queue-time"]), float(held.headers["x-compute-time"])
    assert queue_s > compute_s, "the held request's wait shows as queue time"
    charge = None

    def charged() -> bool:
        nonlocal charge
        charge = charge_of(s2z["db"], held.headers["inference-id"])
        return charge is not None

    wait_until(charged, 30, "the held request's charge in the ledger")
    assert charge["queue_ns"] >= int(queue_s * 1e9) - 1_000_000
    assert charge["compute_ns"] < charge["queue_ns"], "the start is not billed: only the compute is"
    assert httpx.get(f"{url}/health", timeout=30).json()["models"][MODEL] == "loaded"

    # Idle past the timeout: Serve takes the replica away, and /health says so.
    wait_until(lambda: running(app) == 0, 120, "the idle replica going away")
    wait_until(
        lambda: httpx.get(f"{url}/health", timeout=30).json()["models"][MODEL] == "scaled_to_zero",
        10,
        "/health saying scaled_to_zero",
    )

    # Back again, through the legacy body option, and then through the real client with the header.
    again = httpx.post(endpoint, json={"inputs": "good", "options": {"wait_for_model": True}}, timeout=120)
    assert again.status_code == 200, again.text
    client = InferenceClient(base_url=endpoint, headers={"x-wait-for-model": "true"})
    labels = client.text_classification("good")
    assert labels and labels[0].label
