"""The saved run: a versioned JSON document (bench/schema/run.schema.json), a CSV of requests, and a PNG.

Version policy: `schema_version` is an integer, raised on any change a reader could trip on (a field renamed,
removed or retyped); new optional fields keep the version. Readers refuse a version they do not know.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.reconcile import Reconciliation
from bench.report import request_row, summarize
from bench.runner import CLOSED, PointResult
from bench.workloads import Workload

SCHEMA_ID = "hfi-bench-run"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / "run.schema.json"
CSV_FIELDS = [
    "level",
    "index",
    "scheduled_s",
    "sent_s",
    "end_s",
    "latency_s",
    "status",
    "ok",
    "error",
    "ttft_s",
    "inter_token_mean_s",
    "tokens",
    "compute_seconds",
    "compute_type",
    "cost_usd",
    "cost_source",
    "client_request_id",
    "request_id",
    "inference_id",
    "response_bytes",
]


class RunFileError(ValueError):
    """A run file cannot be read: not JSON, another schema, an unknown version, or invalid."""

    status_code = 400


def _iso(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, tz=dt.timezone.utc).isoformat(timespec="milliseconds")


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf-inference-backend")
    except PackageNotFoundError:
        return "unknown"


def build_run(
    *,
    url: str,
    workload: Workload,
    points: list[PointResult],
    replicas: int = 1,
    price_usd_per_second: Decimal | None = None,
    reconciliation: Reconciliation | None = None,
    finished_at_unix_s: float | None = None,
) -> dict[str, Any]:
    """The run document of `points` (one per load level), ready for `json.dump`."""
    import time

    first = points[0].load
    doc_points = []
    for p in points:
        doc_points.append(
            {
                "level": p.load.level,
                "concurrency": p.load.concurrency if p.load.mode == CLOSED else None,
                "rate_rps": p.load.rate_rps,
                "started_at": _iso(p.started_at_unix_s),
                "summary": summarize(p, replicas=replicas),
                "requests": [request_row(r, p.load.level) for r in p.results],
            }
        )
    return {
        "schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "hfi bench", "version": _tool_version()},
        "started_at": _iso(points[0].started_at_unix_s),
        "finished_at": _iso(finished_at_unix_s if finished_at_unix_s is not None else time.time()),
        "target": {
            "url": url,
            "model": workload.model_id,
            "task": workload.task,
            "streaming": workload.request(0).streaming,
        },
        "load": {
            "mode": first.mode,
            "levels": [p.load.level for p in points],
            "requests": first.requests,
            "duration_s": first.duration_s,
            "warmup_requests": first.warmup_requests,
            "timeout_s": first.timeout_s,
            "seed": first.seed,
            "max_in_flight": first.max_in_flight,
        },
        "workload": {
            "source": workload.source,
            "items": len(workload.items),
            "params": workload.params.as_dict(),
        },
        "pricing": {
            "price_usd_per_second": None if price_usd_per_second is None else str(price_usd_per_second),
            "replicas": replicas,
        },
        "points": doc_points,
        "reconciliation": None if reconciliation is None else reconciliation.as_dict(),
    }


def load_schema() -> dict[str, Any]:
    """The JSON Schema of the run file."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_run(doc: dict[str, Any]) -> None:
    """Raise RunFileError unless `doc` is a valid run document of a version this code reads."""
    import jsonschema

    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_ID:
        raise RunFileError(f'not an hfi bench run (expected "schema": "{SCHEMA_ID}")')
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise RunFileError(
            f"run file schema_version {doc.get('schema_version')!r}; this hfi reads version {SCHEMA_VERSION}"
        )
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise RunFileError(f"invalid run file at {where}: {e.message}")


def save_json(doc: dict[str, Any], path: str | Path) -> Path:
    """Validate and write the run document."""
    validate_run(doc)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return p


def read_run(path: str | Path) -> dict[str, Any]:
    """Read and validate a saved run."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise RunFileError(f"cannot read {path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path} is not JSON: {err.msg}") from err
    validate_run(doc)
    return doc


def save_csv(doc: dict[str, Any], path: str | Path) -> Path:
    """One row per request of every load level."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for point in doc["points"]:
            for row in point["requests"]:
                writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in CSV_FIELDS})
    return p


def save_plot(doc: dict[str, Any], path: str | Path) -> Path:
    """A PNG: the latency distribution of each level and, for a sweep, throughput and p99 against load."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    points = doc["points"]
    sweep = len(points) > 1
    fig, axes = plt.subplots(1, 3 if sweep else 1, figsize=(15 if sweep else 6, 4.5), squeeze=False)
    unit = "concurrency" if doc["load"]["mode"] == CLOSED else "arrival rate (req/s)"
    ax = axes[0][0]
    for point in points:
        lat = sorted(r["latency_s"] for r in point["requests"] if r["ok"])
        if lat:
            cdf = [(i + 1) / len(lat) for i in range(len(lat))]
            ax.step(lat, cdf, where="post", label=f"{unit.split()[0]} {point['level']:g}")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{doc['target']['model']} ({doc['target']['task']})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    if sweep:
        levels = [p["level"] for p in points]
        axes[0][1].plot(levels, [p["summary"]["throughput_rps"] for p in points], marker="o")
        axes[0][1].set_xlabel(unit)
        axes[0][1].set_ylabel("throughput (req/s)")
        axes[0][1].grid(alpha=0.3)
        p99 = [(p["summary"]["latency_seconds"] or {}).get("p99", float("nan")) for p in points]
        axes[0][2].plot(levels, p99, marker="o", color="tab:red")
        axes[0][2].set_xlabel(unit)
        axes[0][2].set_ylabel("p99 latency (s)")
        axes[0][2].grid(alpha=0.3)
        if min(levels) > 0 and max(levels) / min(levels) >= 4:  # 1,2,4,8,16: evenly spaced on a log axis
            for ax in (axes[0][1], axes[0][2]):
                ax.set_xscale("log", base=2)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", dpi=100)
    plt.close(fig)
    return p
