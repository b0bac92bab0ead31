"""Prometheus metrics of one serving process, in a registry of their own.

The ingress calls `observe_request` once per request (every status, errors included); `MeteringService.record`
calls `observe_charge` once per charge. Cost is exported as a float counter of USD: that is monitoring, the
ledger holds the exact amounts.

The registry counts what this process served. `render()` is its exposition text (GET /metrics: the whole service
only when it runs in one process). `samples()` is the port through which a process that runs under a framework
mirrors these series into that framework's own export (serving/metrics_export.py: Ray's metrics agent on each
node, so that Prometheus sees every replica once); recording stays here, on this module's small API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from metering.recent import RecentRequests
from metering.records import STATUS_OK, Charge

REGISTRY = CollectorRegistry(auto_describe=True)

_LABELS = ("model", "task", "hardware_profile")
# From 1 ms to 5 min: embeddings take milliseconds, image generation seconds to minutes.
_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)

REQUESTS = Counter(
    "hfi_requests",
    "Requests by model, task, hardware profile and status",
    (*_LABELS, "status"),
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "hfi_request_duration_seconds",
    "Total time of a request in the ingress",
    _LABELS,
    buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
QUEUE_SECONDS = Histogram(
    "hfi_queue_duration_seconds",
    "Time a request waited before its compute began (not billed)",
    _LABELS,
    buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
COMPUTE_SECONDS = Histogram(
    "hfi_compute_duration_seconds",
    "Compute time of a request (the billed phase, batch share included)",
    _LABELS,
    buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
BILLED_COMPUTE_SECONDS = Counter(
    "hfi_billed_compute_seconds",
    "Billed compute seconds (the measured nanoseconds)",
    _LABELS,
    registry=REGISTRY,
)
COST_USD = Counter(
    "hfi_cost_usd", "Charged cost in USD (exact amounts are in the ledger)", _LABELS, registry=REGISTRY
)
CHARGES = Counter("hfi_charges", "Charges recorded, by status", (*_LABELS, "status"), registry=REGISTRY)
METERING_ERRORS = Counter(
    "hfi_metering_errors",
    "Metering failures by stage (spool, ledger, a sink; <consumer>-dead-letter: records refused for good)",
    ("stage",),
    registry=REGISTRY,
)
UNSPOOLED_CHARGES = Gauge(
    "hfi_metering_unspooled_charges",
    "Charges held in memory because the spool could not write them (a full or failing disk): while any are "
    "held, the process refuses new requests (metering.refuse_when_unspooled)",
    registry=REGISTRY,
)
# The last minute's requests per model in this process (`hfi status`: requests/s and p50).
RECENT = RecentRequests()

SPOOL_PENDING_BYTES = Gauge(
    "hfi_metering_spool_pending_bytes",
    "Spooled bytes not yet delivered, by consumer",
    ("consumer",),
    registry=REGISTRY,
)


def observe_request(
    *,
    model_id: str,
    task: str,
    hardware_profile: str,
    status: str | int,
    total_seconds: float,
    queue_seconds: float | None = None,
    compute_seconds: float | None = None,
) -> None:
    """Count one request and observe its latency; queue and compute apart when they are known."""
    key = (model_id, task, hardware_profile, str(status))
    count, total, queue, compute = _REQUEST_CHILDREN.get(key) or _request_children(key)
    count.inc()
    total.observe(total_seconds)
    if queue_seconds is not None:
        queue.observe(queue_seconds)
    if compute_seconds is not None:
        compute.observe(compute_seconds)
    RECENT.observe(model_id, total_seconds, ok=key[3].startswith("2"))


_REQUEST_CHILDREN: dict[tuple[str, str, str, str], tuple[Any, Any, Any, Any]] = {}


def _request_children(key: tuple[str, str, str, str]) -> tuple[Any, Any, Any, Any]:
    """The labelled series of a request key, made once (as for the charges below)."""
    labels = key[:3]
    children = (
        REQUESTS.labels(*key),
        REQUEST_SECONDS.labels(*labels),
        QUEUE_SECONDS.labels(*labels),
        COMPUTE_SECONDS.labels(*labels),
    )
    _REQUEST_CHILDREN[key] = children
    return children


_CHARGE_CHILDREN: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}


def _charge_children(key: tuple[str, str, str, str]) -> tuple[Any, Any, Any]:
    labels = key[:3]
    children = (BILLED_COMPUTE_SECONDS.labels(*labels), COST_USD.labels(*labels), CHARGES.labels(*key))
    _CHARGE_CHILDREN[key] = children
    return children


def prepare(model_id: str, task: str, hardware_profile: str) -> None:
    """Make the series of a model's answered and charged requests now, at zero: a replica calls it before its
    traffic, so that its first request does not make them (a few hundred microseconds, measured in process), and
    the series are there to scrape before any request."""
    answered, charged = (
        (model_id, task, hardware_profile, "200"),
        (model_id, task, hardware_profile, STATUS_OK),
    )
    if answered not in _REQUEST_CHILDREN:
        _request_children(answered)
    if charged not in _CHARGE_CHILDREN:
        _charge_children(charged)


def observe_charge(charge: Charge) -> None:
    """Add one charge's billed compute seconds and cost to the counters."""
    u = charge.usage
    key = (u.model_id, u.task, u.hardware_profile, u.status)
    billed, cost, count = _CHARGE_CHILDREN.get(key) or _charge_children(key)
    billed.inc(charge.usage.compute_ns / 1e9)
    cost.inc(charge.cost_nanousd / 1e9)
    count.inc()


def observe_error(stage: str, count: int = 1) -> None:
    """Count `count` metering failures at `stage` (the request itself went on)."""
    METERING_ERRORS.labels(stage).inc(count)


def set_unspooled(count: int) -> None:
    """How many charges this process holds in memory, waiting for its spool to take them."""
    UNSPOOLED_CHARGES.set(count)


def render() -> tuple[bytes, str]:
    """The exposition text of every metric and its content type, for GET /metrics."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class Sample:
    """One series of the registry, cumulative since this process started.

    `kind` is its family's type: a counter's and a histogram's series only grow (`name` ends in `_total`, or
    `_bucket` / `_count` / `_sum`); a gauge's go up and down. `family` is the family's name (a counter's without
    `_total`), `labels` the series' labels in their declared order (a bucket's `le` last)."""

    family: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def samples() -> list[Sample]:
    """Every series of the registry as it stands now (no `_created` timestamps): what an exporter mirrors."""
    found: list[Sample] = []
    for family in REGISTRY.collect():
        if family.type not in ("counter", "gauge", "histogram"):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            found.append(
                Sample(
                    family.name, family.type, family.documentation, s.name, tuple(s.labels.items()), s.value
                )
            )
    return found
