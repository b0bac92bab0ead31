"""The metrics port (metering.metrics.samples) and the exporter that mirrors it into Ray's metrics agent, with a
stand-in for the agent that keeps its rules: a counter adds what each process reports per tag set, a gauge keeps
the last value, and a record missing one of its instrument's tag keys is refused (ray.util.metrics does the same).
The exporter against Ray's real agent, through the shared service: tests/integration/test_metrics_export.py.
"""

from __future__ import annotations

import math

import pytest

from metering import metrics
from serving.metrics_export import RayMetricsExporter

LABELS = {"model": "org/export-test", "task": "text-to-image", "hardware_profile": "nvidia-h100"}


class Agent:
    """What Ray's metrics agent exposes: one series per instrument name and full tag set."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, frozenset], float] = {}
        self.gauges: dict[tuple[str, frozenset], float] = {}
        self.calls = 0

    def factory(self) -> Factory:
        return Factory(self)

    def total(self, name: str, **match: str) -> float:
        series = {**self.counters, **self.gauges}
        return sum(v for (n, tags), v in series.items() if n == name and match.items() <= dict(tags).items())

    def replicas(self, name: str) -> set[str]:
        return {dict(tags).get("replica", "") for (n, tags) in self.counters if n == name}


class Instrument:
    def __init__(self, agent: Agent, name: str, tag_keys: tuple[str, ...]) -> None:
        self.agent, self.name, self.tag_keys = agent, name, tag_keys

    def _key(self, tags: dict[str, str]) -> tuple[str, frozenset]:
        assert set(tags) == set(self.tag_keys), (self.name, tags, self.tag_keys)
        assert all(isinstance(v, str) for v in tags.values())
        self.agent.calls += 1
        return self.name, frozenset(tags.items())

    def inc(self, value: float, tags: dict[str, str]) -> None:
        assert value > 0  # ray.util.metrics.Counter.inc refuses anything else
        key = self._key(tags)
        self.agent.counters[key] = self.agent.counters.get(key, 0.0) + value

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.agent.gauges[self._key(tags)] = value


class Factory:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.made: dict[str, str] = {}

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Instrument:
        assert name not in self.made
        self.made[name] = "counter"
        return Instrument(self.agent, name + "_total", tag_keys)  # Ray's agent adds `_total` to a counter

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Instrument:
        assert name not in self.made
        self.made[name] = "gauge"
        return Instrument(self.agent, name, tag_keys)


def replica(name: str) -> dict[str, str]:
    return {"application": "model-x", "deployment": "model-x", "replica": name}


def request_sample(value: float) -> metrics.Sample:
    labels = (*LABELS.items(), ("status", "200"))
    return metrics.Sample("hfi_requests", "counter", "Requests", "hfi_requests_total", labels, value)


def observe(n: int, seconds: float = 0.05) -> None:
    for _ in range(n):
        metrics.observe_request(**_kw(), status=200, total_seconds=seconds, compute_seconds=seconds)


def _kw() -> dict[str, str]:
    return {
        "model_id": LABELS["model"],
        "task": LABELS["task"],
        "hardware_profile": LABELS["hardware_profile"],
    }


# The port


def test_samples_are_the_registrys_series_without_created_timestamps() -> None:
    observe(2, seconds=0.2)
    found = {
        (s.name, s.labels): s for s in metrics.samples() if dict(s.labels).get("model") == LABELS["model"]
    }
    requests = found[("hfi_requests_total", (*LABELS.items(), ("status", "200")))]
    assert (requests.family, requests.kind) == ("hfi_requests", "counter")
    assert requests.value == metrics.REGISTRY.get_sample_value(
        "hfi_requests_total", {**LABELS, "status": "200"}
    )
    bucket = found[("hfi_request_duration_seconds_bucket", (*LABELS.items(), ("le", "0.25")))]
    assert bucket.kind == "histogram" and bucket.value >= 2
    assert found[("hfi_request_duration_seconds_count", tuple(LABELS.items()))].value >= 2
    assert not any(name.endswith("_created") for name, _ in found)


# The exporter


def test_two_replicas_add_up_and_no_flush_counts_twice() -> None:
    agent = Agent()
    counts = {"a": 0.0, "b": 0.0}
    exporters = {
        name: RayMetricsExporter(
            source=lambda name=name: [request_sample(counts[name])] if counts[name] else [],
            factory=agent.factory(),
            serve_tags=replica(name),
        )
        for name in counts
    }
    for step_a, step_b in ((3, 0), (0, 0), (4, 5), (1, 2)):
        counts["a"] += step_a
        counts["b"] += step_b
        for exporter in exporters.values():
            exporter.flush()
            exporter.flush()  # a second flush with nothing new adds nothing
        assert agent.total("hfi_requests_total", **LABELS) == counts["a"] + counts["b"]
    assert agent.replicas("hfi_requests_total") == {"a", "b"}
    assert agent.total("hfi_requests_total", replica="a") == 8


def test_a_counter_grown_since_the_last_flush_exports_the_difference() -> None:
    agent = Agent()
    exporter = RayMetricsExporter(factory=agent.factory(), serve_tags=replica("r"))
    mine = {**LABELS, "status": "200"}
    exporter.flush()
    start = agent.total("hfi_requests_total", **mine)  # what this process counted before (other tests)
    observe(3)
    assert exporter.flush() > 0
    assert agent.total("hfi_requests_total", **mine) == start + 3
    observe(2)
    exporter.flush()
    exporter.flush()
    assert agent.total("hfi_requests_total", **mine) == start + 5
    assert exporter.exported()[("hfi_requests_total", tuple(mine.items()))] == start + 5


def test_histograms_are_exported_as_their_cumulative_series_exactly() -> None:
    agent = Agent()
    made = agent.factory()
    exporter = RayMetricsExporter(factory=made, serve_tags=replica("h"))
    exporter.flush()
    count = agent.total("hfi_compute_duration_seconds_count", **LABELS)
    total_s = agent.total("hfi_compute_duration_seconds_sum", **LABELS)
    observe(4, seconds=0.05)
    exporter.flush()
    assert made.made["hfi_compute_duration_seconds_bucket"] == "gauge"
    assert made.made["hfi_requests"] == "counter"
    assert agent.total("hfi_compute_duration_seconds_count", **LABELS) == count + 4
    assert math.isclose(
        agent.total("hfi_compute_duration_seconds_sum", **LABELS), total_s + 0.2
    )  # not midpoints
    le = {
        le: agent.total("hfi_compute_duration_seconds_bucket", **LABELS, le=le)
        for le in ("0.025", "0.05", "+Inf")
    }
    assert le["0.05"] - le["0.025"] >= 4 and le["+Inf"] == count + 4


def test_gauges_are_set_at_every_flush_so_that_the_agent_keeps_them() -> None:
    agent = Agent()
    exporter = RayMetricsExporter(factory=agent.factory(), serve_tags=replica("g"))
    metrics.SPOOL_PENDING_BYTES.labels("export-test").set(123)
    exporter.flush()
    calls = agent.calls
    exporter.flush()  # nothing changed: every gauge and histogram series is written again (Ray's gauge TTL)
    assert agent.calls - calls >= 1
    assert agent.total("hfi_metering_spool_pending_bytes", consumer="export-test", replica="g") == 123


def test_a_failing_flush_is_logged_and_the_next_one_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent()
    broken = {"on": True}

    def source() -> list[metrics.Sample]:
        if broken["on"]:
            raise RuntimeError("registry unavailable")
        return [request_sample(2)]

    exporter = RayMetricsExporter(source=source, factory=agent.factory(), serve_tags=replica("f"))
    exporter._flush_logged()
    assert "exporting to Ray's metrics agent failed" in caplog.text
    broken["on"] = False
    exporter.close()  # stops (never started) and flushes
    assert agent.total("hfi_requests_total", **LABELS) == 2
