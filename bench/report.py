"""The report of one load level: counts, errors, throughput, latency, streaming metrics and the cost side.

Money is `Decimal` throughout and is written as exact decimal strings. Percentiles use linear interpolation
between closest ranks (numpy's default), computed here so the report has no numpy dependency.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from bench.client import RequestResult
from bench.runner import PointResult

COST_HEADER = "header"
COST_PRICE = "price"
COST_LEDGER = "ledger"
NANO = Decimal(10) ** -9


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linear between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, float] | None:
    """p50/p90/p99/max/mean/min of `values`, or None when there are none."""
    if not values:
        return None
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "min": min(values),
        "mean": sum(values) / len(values),
        "count": len(values),
    }


def error_key(r: RequestResult) -> str:
    """How a failed request is counted: its HTTP status, or the kind of client-side failure."""
    if r.status >= 400:
        return str(r.status)
    return (r.error or "error").split(":", 1)[0]


def apply_price(results: Iterable[RequestResult], price_usd_per_second: Decimal | None) -> None:
    """Give requests without a cost header a cost of compute seconds x price (exact, to the nano-dollar)."""
    if price_usd_per_second is None:
        return
    for r in results:
        if r.cost_usd is None and r.compute_seconds is not None:
            cost = (r.compute_seconds * price_usd_per_second).quantize(NANO, rounding=ROUND_HALF_UP)
            r.cost_usd, r.cost_source = cost, COST_PRICE


def money(value: Decimal | None) -> str | None:
    """An exact decimal string (no exponent), or None."""
    return None if value is None else format(value.normalize(), "f") if value != 0 else "0"


def summarize(point: PointResult, *, replicas: int = 1) -> dict[str, Any]:
    """The summary of one load level, as plain JSON-ready data (see bench/schema/run.schema.json)."""
    results = point.results
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    wall_s = point.wall_s
    tokens = sum(r.tokens or 0 for r in ok)
    streamed = [r for r in ok if r.first_token_s is not None]
    gaps = [g for r in streamed for g in r.inter_token_s]
    return {
        "requests": len(results),
        "ok": len(ok),
        "failed": len(failed),
        "errors_by_status": dict(sorted(Counter(error_key(r) for r in failed).items())),
        "wall_seconds": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
        "offered_rate_rps": point.load.rate_rps,
        "latency_seconds": distribution([r.latency_s for r in ok]),
        "ttft_seconds": distribution([r.ttft_s for r in streamed if r.ttft_s is not None]),
        "inter_token_latency_seconds": distribution(gaps),
        "tokens": tokens,
        "tokens_per_second": tokens / wall_s if wall_s > 0 and tokens else 0.0,
        "cost": cost_summary(ok, wall_s=wall_s, replicas=replicas),
    }


def cost_summary(ok: Sequence[RequestResult], *, wall_s: float, replicas: int) -> dict[str, Any]:
    """Billed compute, cost per request and per 1,000 requests, and utilisation, over successful requests."""
    with_compute = [r for r in ok if r.compute_seconds is not None]
    compute = sum((r.compute_seconds for r in with_compute if r.compute_seconds is not None), Decimal(0))
    priced = [r for r in ok if r.cost_usd is not None]
    total = sum((r.cost_usd for r in priced if r.cost_usd is not None), Decimal(0))
    sources = sorted({r.cost_source for r in priced if r.cost_source})
    per_request = (total / len(priced)).quantize(NANO, rounding=ROUND_HALF_UP) if priced else None
    utilisation = None
    if with_compute and wall_s > 0 and replicas > 0:
        utilisation = float(compute / (Decimal(repr(wall_s)) * replicas))
    return {
        "billed_compute_seconds": money(compute) if with_compute else None,
        "requests_with_compute": len(with_compute),
        "compute_types": dict(sorted(Counter(r.compute_type for r in ok if r.compute_type).items())),
        "cost_source": "+".join(sources) if sources else None,
        "requests_priced": len(priced),
        "total_usd": money(total) if priced else None,
        "per_request_usd": money(per_request),
        "per_1000_requests_usd": money(per_request * 1000) if per_request is not None else None,
        "replicas": replicas,
        "utilisation": utilisation,
    }


def request_row(r: RequestResult, level: float) -> dict[str, Any]:
    """One request as a flat row (the run file's `requests` and the CSV)."""
    gaps = r.inter_token_s
    return {
        "level": level,
        "index": r.index,
        "scheduled_s": r.scheduled_s,
        "sent_s": r.sent_s,
        "end_s": r.end_s,
        "latency_s": r.latency_s,
        "status": r.status,
        "ok": r.ok,
        "error": r.error,
        "ttft_s": r.ttft_s,
        "inter_token_mean_s": sum(gaps) / len(gaps) if gaps else None,
        "tokens": r.tokens,
        "compute_seconds": money(r.compute_seconds),
        "compute_type": r.compute_type,
        "cost_usd": money(r.cost_usd),
        "cost_source": r.cost_source,
        "client_request_id": r.client_request_id,
        "request_id": r.request_id,
        "inference_id": r.inference_id,
        "response_bytes": r.response_bytes,
    }


def _ms(dist: dict[str, float] | None, key: str) -> str:
    return "-" if not dist else f"{dist[key] * 1000:.1f}"


def format_run(doc: dict[str, Any]) -> str:
    """The run's report as text: one row per load level, then the cost side of each."""
    mode = doc["load"]["mode"]
    head = [
        "c" if mode == "closed" else "rate",
        "ok",
        "errors",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
    ]
    streaming = any(p["summary"]["ttft_seconds"] for p in doc["points"])
    if streaming:
        head += ["ttft p50", "ttft p99", "itl p50", "tok/s"]
    table = [head]
    for p in doc["points"]:
        s = p["summary"]
        lat = s["latency_seconds"]
        errors = ",".join(f"{k}:{v}" for k, v in s["errors_by_status"].items()) or "0"
        row = [f"{p['level']:g}", str(s["ok"]), errors, f"{s['throughput_rps']:.2f}"]
        row += [_ms(lat, "p50"), _ms(lat, "p90"), _ms(lat, "p99"), _ms(lat, "max")]
        if streaming:
            row += [_ms(s["ttft_seconds"], "p50"), _ms(s["ttft_seconds"], "p99")]
            row += [_ms(s["inter_token_latency_seconds"], "p50"), f"{s['tokens_per_second']:.1f}"]
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [
        f"{doc['target']['model']} ({doc['target']['task']}) at {doc['target']['url']}, {mode} loop",
        *("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)) for r in table),
        "",
    ]
    for p in doc["points"]:
        c = p["summary"]["cost"]
        util = "-" if c["utilisation"] is None else f"{c['utilisation']:.1%}"
        per_1k = c["per_1000_requests_usd"] or "-"
        lines.append(
            f"level {p['level']:g}: billed compute {c['billed_compute_seconds'] or '-'} s "
            f"({c['requests_with_compute']} requests), cost/request {c['per_request_usd'] or '-'} USD, "
            f"per 1k {per_1k} USD (from {c['cost_source'] or 'nothing'}), utilisation {util} "
            f"of {c['replicas']} replica(s)"
        )
    return "\n".join(lines)
