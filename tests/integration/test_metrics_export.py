"""Metrics that add up across replicas, through the shared service and Ray's real metrics agent.

Two replicas serve the same model's requests: the model's own replica takes `/models/{id}` (one hop), the router
takes `/pipeline/{task}/{id}`, and each counts what it served in its own process under the same labels. The
agent of the node shows every replica's series once, tagged with its Serve application, deployment and replica:
the sum over those is what was sent. GET /metrics through the service shows one process (the router) only.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serving.app import app_name
from serving.config import Settings

MODEL = "local/tiny-sentiment"
SERIES = {"model": MODEL, "task": "text-classification", "hardware_profile": "cpu-basic"}
OK = {**SERIES, "status": "200"}
N_MODEL = 7  # to the model's replica
N_ROUTER = 5  # to the router's replica


def applications(args: dict) -> tuple[str, str]:
    """The Serve application names of MODEL's application and of the router."""
    settings = Settings.load(args)
    spec = settings.validated()[0].get(MODEL)
    return app_name(spec, settings), app_name(None, settings)


def counted(state: dict | None, name: str = "hfi_requests_total", labels: dict = OK) -> float:
    """What one replica had exported of one counter series."""
    if state is None:
        return 0.0
    return state["counters"].get((name, tuple(labels.items())), 0.0)


def page_value(text: str, name: str, labels: dict) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def test_requests_served_by_two_replicas_add_up_once_on_the_metrics_agent(hfi_service, ray_metrics) -> None:
    model_app, router_app = applications(hfi_service.args)
    first = ray_metrics.settle({model_app, router_app})
    with httpx.Client(base_url=hfi_service.url, timeout=60) as client:
        for i in range(N_MODEL):
            r = client.post(f"/models/{MODEL}", json={"inputs": f"metrics add up {i}"})
            assert r.status_code == 200, r.text
        for i in range(N_ROUTER):
            r = client.post(
                f"/pipeline/text-classification/{MODEL}", json={"inputs": f"metrics via router {i}"}
            )
            assert r.status_code == 200, r.text
    second = ray_metrics.settle({model_app, router_app})

    # Each replica counted, in its own process, the requests it served.
    grew = {r: counted(s) - counted(first.exports.get(r)) for r, s in second.exports.items()}
    by_app = {
        app: {r for r, s in second.exports.items() if s["tags"]["application"] == app}
        for app in (model_app, router_app)
    }
    assert all(by_app.values()), second.exports.keys()
    assert sum(grew[r] for r in by_app[model_app]) == N_MODEL
    assert sum(grew[r] for r in by_app[router_app]) == N_ROUTER

    # The agent shows each replica once: the sum over the replica labels is every request sent.
    sent = N_MODEL + N_ROUTER
    assert second.total("ray_hfi_requests_total", **OK) - first.total("ray_hfi_requests_total", **OK) == sent
    serving = {
        dict(tags).get("replica", "")
        for (n, tags), v in second.series.items()
        if n == "ray_hfi_requests_total"
        and OK.items() <= dict(tags).items()
        and v > first.series.get((n, tags), 0.0)
    }
    assert len(serving) >= 2 and serving <= set(second.exports)
    assert (
        second.total("ray_hfi_charges_total", **SERIES, status="ok")
        - first.total("ray_hfi_charges_total", **SERIES, status="ok")
        == sent
    )
    assert second.total("ray_hfi_cost_usd_total", **SERIES) > first.total("ray_hfi_cost_usd_total", **SERIES)

    # Histograms come as their cumulative series, per live replica (a replica gone drops out of the agent).
    def live(snapshot, name, **labels):
        return sum(snapshot.total(name, **labels, replica=r) for r in second.exports)

    for name in ("ray_hfi_request_duration_seconds_count", "ray_hfi_request_duration_seconds_bucket"):
        extra = {"le": "+Inf"} if name.endswith("_bucket") else {}
        assert live(second, name, **SERIES, **extra) - live(first, name, **SERIES, **extra) == sent

    # GET /metrics through the service is one process's page: the router's count, not the service's.
    page = page_value(httpx.get(hfi_service.url + "/metrics", timeout=30).text, "hfi_requests_total", OK)
    assert page in {counted(second.exports[r]) for r in by_app[router_app]}
    assert page < second.total("ray_hfi_requests_total", **OK)
