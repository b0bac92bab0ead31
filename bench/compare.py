"""Compare two saved runs: one row per metric and load level, with B / A ratios."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

# (label, getter from a point's summary, better when higher)
_Metric = tuple[str, Callable[[dict[str, Any]], float | None], bool]


def _dist(name: str, key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda s: (s.get(name) or {}).get(key)


def _cost(key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(s: dict[str, Any]) -> float | None:
        value = s["cost"].get(key)
        return None if value is None else float(Decimal(value))

    return get


METRICS: list[_Metric] = [
    ("throughput (req/s)", lambda s: s["throughput_rps"], True),
    ("latency p50 (s)", _dist("latency_seconds", "p50"), False),
    ("latency p90 (s)", _dist("latency_seconds", "p90"), False),
    ("latency p99 (s)", _dist("latency_seconds", "p99"), False),
    ("latency max (s)", _dist("latency_seconds", "max"), False),
    ("TTFT p50 (s)", _dist("ttft_seconds", "p50"), False),
    ("TTFT p99 (s)", _dist("ttft_seconds", "p99"), False),
    ("inter-token p50 (s)", _dist("inter_token_latency_seconds", "p50"), False),
    ("tokens/s", lambda s: s["tokens_per_second"] or None, True),
    ("error rate", lambda s: s["failed"] / s["requests"] if s["requests"] else None, False),
    ("billed compute (s)", _cost("billed_compute_seconds"), False),
    ("cost per 1k requests (USD)", _cost("per_1000_requests_usd"), False),
    ("utilisation", lambda s: s["cost"]["utilisation"], True),
]


def ratio(a: float | None, b: float | None) -> float | None:
    """b / a, or None when either is missing or a is zero."""
    if a is None or b is None or a == 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return b / a


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (level, metric, A, B, B/A, better) for every level both runs measured."""
    levels_b = {p["level"]: p for p in b["points"]}
    rows: list[dict[str, Any]] = []
    pairs = [(p, levels_b[p["level"]]) for p in a["points"] if p["level"] in levels_b]
    if not pairs and len(a["points"]) == 1 and len(b["points"]) == 1:
        pairs = [(a["points"][0], b["points"][0])]  # two single runs at different levels: compare them anyway
    for pa, pb in pairs:
        for label, get, higher_is_better in METRICS:
            va, vb = get(pa["summary"]), get(pb["summary"])
            if va is None and vb is None:
                continue
            r = ratio(va, vb)
            better = None if r is None or r == 1 else (r > 1) == higher_is_better
            level = f"{pa['level']:g}"
            if pb["level"] != pa["level"]:
                level += f"/{pb['level']:g}"
            rows.append({"level": level, "metric": label, "a": va, "b": vb, "ratio": r, "b_better": better})
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 0.001 <= abs(value) < 100000:
        return f"{value:.4g}"
    return f"{value:.3e}"


def format_table(a: dict[str, Any], b: dict[str, Any], *, name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as a text table: B/A above 1 means B is larger; the last column says which is better."""
    head = [
        f"A: {name_a}: {a['target']['model']} {a['target']['task']} {a['load']['mode']} loop, "
        f"compute {','.join(_compute_types(a)) or '-'}",
        f"B: {name_b}: {b['target']['model']} {b['target']['task']} {b['load']['mode']} loop, "
        f"compute {','.join(_compute_types(b)) or '-'}",
    ]
    rows = compare_rows(a, b)
    if not rows:
        return "\n".join([*head, "no load level in common"])
    unit = "concurrency" if a["load"]["mode"] == "closed" else "rate"
    table = [[unit, "metric", "A", "B", "B/A", ""]]
    for r in rows:
        mark = "" if r["b_better"] is None else ("B better" if r["b_better"] else "A better")
        table.append([r["level"], r["metric"], _fmt(r["a"]), _fmt(r["b"]), _fmt(r["ratio"]), mark])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*head, "", *lines])


def _compute_types(doc: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for p in doc["points"]:
        for name in p["summary"]["cost"]["compute_types"]:
            seen[name] = None
    return list(seen)
