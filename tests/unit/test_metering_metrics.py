"""Prometheus metrics: a registry of our own, request and charge metrics with their labels."""

from __future__ import annotations

import datetime as dt

from prometheus_client import REGISTRY as GLOBAL_REGISTRY

from hardware_profiles import load_profiles
from metering import metrics
from metering.pricing import price_in_catalog
from metering.records import UsageRecord


def sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_request_metrics_keep_queue_apart_from_compute() -> None:
    labels = {"model": "org/metrics-test", "task": "text-to-image", "hardware_profile": "nvidia-h100"}
    before = sample("hfi_requests_total", **labels, status="200")
    metrics.observe_request(
        model_id="org/metrics-test",
        task="text-to-image",
        hardware_profile="nvidia-h100",
        status=200,
        total_seconds=1.5,
        queue_seconds=0.25,
        compute_seconds=1.2,
    )
    assert sample("hfi_requests_total", **labels, status="200") == before + 1
    assert sample("hfi_request_duration_seconds_sum", **labels) >= 1.5
    assert sample("hfi_queue_duration_seconds_sum", **labels) >= 0.25
    assert sample("hfi_compute_duration_seconds_sum", **labels) >= 1.2
    assert sample("hfi_queue_duration_seconds_bucket", **labels, le="0.25") >= 1


def test_charge_metrics_count_billed_seconds_and_cost() -> None:
    usage = UsageRecord(
        "m1",
        dt.datetime(2026, 1, 1),
        "org/metrics-charge",
        "r",
        "feature-extraction",
        "nvidia-h100",
        2 * 10**9,
    )
    charge = price_in_catalog(usage, load_profiles())
    labels = {"model": "org/metrics-charge", "task": "feature-extraction", "hardware_profile": "nvidia-h100"}
    metrics.observe_charge(charge)
    assert sample("hfi_billed_compute_seconds_total", **labels) == 2.0
    assert abs(sample("hfi_cost_usd_total", **labels) - 0.0025) < 1e-12
    assert sample("hfi_charges_total", **labels, status="ok") == 1


def test_render_is_prometheus_text_from_our_registry_only() -> None:
    metrics.observe_error("spool")
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    text = body.decode()
    assert "# TYPE hfi_requests_total counter" in text
    assert 'hfi_metering_errors_total{stage="spool"}' in text
    assert "python_gc_objects_collected_total" not in text  # the default registry is not mixed in
    assert GLOBAL_REGISTRY.get_sample_value("hfi_requests_total") is None


def test_a_replica_prepares_its_models_series_at_zero_before_any_request(tmp_path) -> None:
    """`prepare` (a replica's constructor, via IngressCore.prepare) makes the answered and charged series of a model
    at zero: scrapeable before traffic, and the first request's observe finds them made. It counts nothing, and
    pricing a request of the profile ahead records nothing either."""
    from metering.config import MeteringSettings
    from metering.service import MeteringService

    labels = {"model": "org/prepared", "task": "text-classification", "hardware_profile": "cpu-basic"}
    text = metrics.render()[0].decode()
    assert 'model="org/prepared"' not in text
    metrics.prepare("org/prepared", "text-classification", "cpu-basic")
    metrics.prepare("org/prepared", "text-classification", "cpu-basic")  # again: nothing changes
    text = metrics.render()[0].decode()
    assert (
        'hfi_requests_total{hardware_profile="cpu-basic",model="org/prepared",status="200",task="text-classification"} 0.0'
        in text
    )
    assert (
        'hfi_charges_total{hardware_profile="cpu-basic",model="org/prepared",status="ok",task="text-classification"} 0.0'
        in text
    )
    assert sample("hfi_billed_compute_seconds_total", **labels) == 0.0
    metrics.observe_request(
        model_id="org/prepared",
        task="text-classification",
        hardware_profile="cpu-basic",
        status=200,
        total_seconds=0.1,
    )
    assert sample("hfi_requests_total", **labels, status="200") == 1

    svc = MeteringService(
        MeteringSettings(spool_dir=str(tmp_path / "spool"), database_url=f"sqlite:///{tmp_path}/l.db"),
        load_profiles(),
    )
    try:
        before = metrics.render()[0]
        svc.prepare("cpu-basic")
        assert svc.spool is not None and svc.spool.pending("ledger") == 0
        assert metrics.render()[0] == before
    finally:
        svc.close()
