"""The service's metrics through Ray's metrics agent, so that Prometheus sees every replica exactly once.

Every serving process keeps its own counters (metering/metrics.py, a prometheus_client registry), and GET
/metrics shows only the process that answers it: scraped through a load-balanced Service it counts whichever
replica answered. Under Ray each replica installs this exporter instead (`install_ray_metrics()` in its
`__init__`): a daemon thread that every `interval_s` reads the registry (`metering.metrics.samples()`) and
mirrors it into `ray.util.metrics`, tagged with the replica's Serve `application`, `deployment` and `replica`
(the tags of Serve's own metrics). Ray's metrics agent on each node (the pod's metrics port, 8080 in the chart)
exposes the series of every process of that node, each once, named `ray_` + the name:

- a counter as a Ray Counter, incremented by what it grew since the last flush: `ray_hfi_requests_total`;
- a gauge as a Ray Gauge: `ray_hfi_metering_spool_pending_bytes`;
- a histogram's cumulative series as Ray Gauges of the same names: `ray_hfi_request_duration_seconds_bucket`
  (with `le`), `..._count`, `..._sum`. Not Ray's Histogram: its agent rebuilds `_sum` from bucket midpoints
  (20,003 observations of 0.05 s come out as 1,100 s) and it costs a call per observation.

Why a periodic flush and not a call per observation: a `ray.util.metrics` record costs about 3 us of CPU
(prometheus_client's about 1.5 us), seven of them per request on the event loop; a flush costs one call per
series every few seconds, on a thread of its own. Ray's core worker reports to the agent every 10 s
(`metrics_report_interval_ms`), so a value reaches the agent up to interval_s + 10 s after it was recorded.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from metering import metrics

log = logging.getLogger("serving.metrics_export")

# Ray drops a gauge series the agent has not heard of for 2 report intervals (20 s): flushing every 5 s keeps
# the histogram and gauge series of a live replica from ever going stale.
FLUSH_INTERVAL_S = 5.0
SERVE_TAG_KEYS = ("application", "deployment", "replica")


class Instrument(Protocol):
    """What the exporter needs of a Ray metric (ray.util.metrics.Counter's `inc`, Gauge's `set`)."""

    def inc(self, value: float, tags: dict[str, str]) -> None: ...

    def set(self, value: float, tags: dict[str, str]) -> None: ...


class RayMetricFactory:
    """ray.util.metrics instruments (imported here so that building an exporter with another factory needs no Ray)."""

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
        from ray.util.metrics import Counter

        return Counter(name, description, tag_keys)

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
        from ray.util.metrics import Gauge

        return Gauge(name, description, tag_keys)


def replica_tags() -> dict[str, str]:
    """This process's Serve application, deployment and replica (Serve's own metric tags); {} outside a replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        context = serve.get_replica_context()
    except RayServeException:
        return {}
    return {
        "application": context.app_name or "",
        "deployment": context.deployment,
        "replica": context.replica_tag,
    }


SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


class RayMetricsExporter:
    """Mirrors this process's metering metrics into Ray's metrics agent, every `interval_s` and on `flush()`."""

    def __init__(
        self,
        interval_s: float = FLUSH_INTERVAL_S,
        *,
        source: Callable[[], list[metrics.Sample]] = metrics.samples,
        factory: Any = None,
        serve_tags: dict[str, str] | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.source = source
        self.factory = factory if factory is not None else RayMetricFactory()
        self.serve_tags = replica_tags() if serve_tags is None else dict(serve_tags)
        self._instruments: dict[str, Instrument] = {}
        self._exported: dict[SeriesKey, float] = {}  # counter series -> the value the agent has been given
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False  # log a failing flush once, not every interval

    def start(self) -> None:
        """Flush every `interval_s` on a daemon thread until `close()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hfi-metrics-export", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._flush_logged()

    def _flush_logged(self) -> None:
        try:
            self.flush()
            self._failing = False
        except Exception:  # monitoring must never take the replica down; the next flush tries again
            if not self._failing:
                log.exception("metrics: exporting to Ray's metrics agent failed")
            self._failing = True

    def flush(self) -> int:
        """Mirror every series now; returns how many were written (counters that did not grow are skipped)."""
        with self._lock:
            written = 0
            for sample in self.source():
                tags = {**self.serve_tags, **dict(sample.labels)}
                if sample.kind == "counter":
                    key = (sample.name, sample.labels)
                    done = self._exported.get(key, 0.0)
                    grown = sample.value - done if sample.value >= done else sample.value  # a reset restarts
                    if grown > 0:
                        self._instrument(sample).inc(grown, tags)
                        written += 1
                    self._exported[key] = sample.value
                else:  # gauges, and a histogram's cumulative series: the value itself, every flush
                    self._instrument(sample).set(sample.value, tags)
                    written += 1
            return written

    def exported(self) -> dict[SeriesKey, float]:
        """The counter series and the value each has been exported with (what the agent sums, per process)."""
        with self._lock:
            return dict(self._exported)

    def _instrument(self, sample: metrics.Sample) -> Instrument:
        # A counter keeps its family name (Ray adds `_total`); a histogram's series are instruments of their own.
        name = sample.name if sample.kind == "histogram" else sample.family
        instrument = self._instruments.get(name)
        if instrument is None:
            keys = (*self.serve_tags, *(k for k, _ in sample.labels))
            make = self.factory.counter if sample.kind == "counter" else self.factory.gauge
            instrument = make(name, sample.description, keys)
            self._instruments[name] = instrument
        return instrument

    def close(self) -> None:
        """Stop the thread and flush what was recorded since the last flush."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 1)
        self._flush_logged()


_installed: RayMetricsExporter | None = None
_install_lock = threading.Lock()


def install_ray_metrics(interval_s: float = FLUSH_INTERVAL_S) -> RayMetricsExporter:
    """Mirror this process's metrics into Ray's metrics agent from now on. Call it in a Serve replica's
    `__init__` (where the replica context gives the tags); once per process, later calls return the same one."""
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = RayMetricsExporter(interval_s)
            _installed.start()
            atexit.register(_installed.close)
        return _installed


def flush_installed(_actor: object = None) -> dict[str, Any] | None:
    """Flush this process's exporter now and say what it has exported: `{"tags": ..., "counters": {(name,
    labels): value}}`; None where none is installed. Runs in a replica through Ray's `actor.__ray_call__`
    (its one argument is the actor), for tests and for debugging."""
    exporter = _installed
    if exporter is None:
        return None
    exporter.flush()
    return {"tags": dict(exporter.serve_tags), "counters": exporter.exported()}
