"""Usage reports: charges summed per account, model, task, hardware profile and UTC day, with exact totals.

Amounts are integer nano-USD, shown as exact decimal USD strings; the totals are the sums of the rows, so they
agree to the last digit. Rows render as a text table, JSON or CSV.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from core.money import usd_str
from metering.records import Charge

FORMATS = ("table", "json", "csv")


@dataclass(frozen=True)
class UsageRow:
    """Usage of one account, model, task and profile on one UTC day."""

    account: str
    model_id: str
    task: str
    hardware_profile: str
    day: dt.date
    requests: int
    compute_ms: int
    cost_nanousd: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["day"] = self.day.isoformat()
        data["compute_seconds"] = f"{self.compute_ms // 1000}.{self.compute_ms % 1000:03d}"
        data["cost_usd"] = usd_str(self.cost_nanousd)
        return data


@dataclass(frozen=True)
class UsageTotals:
    """The sums over the rows of a report."""

    requests: int = 0
    compute_ms: int = 0
    cost_nanousd: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "compute_ms": self.compute_ms,
            "compute_seconds": f"{self.compute_ms // 1000}.{self.compute_ms % 1000:03d}",
            "cost_nanousd": self.cost_nanousd,
            "cost_usd": usd_str(self.cost_nanousd),
        }


@dataclass(frozen=True)
class UsageReport:
    """Grouped usage over [since, until), optionally for one account, with totals equal to the rows' sums."""

    since: dt.datetime | None
    until: dt.datetime | None
    account: str | None
    rows: list[UsageRow] = field(default_factory=list)

    @property
    def totals(self) -> UsageTotals:
        return UsageTotals(
            requests=sum(r.requests for r in self.rows),
            compute_ms=sum(r.compute_ms for r in self.rows),
            cost_nanousd=sum(r.cost_nanousd for r in self.rows),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the interval, the rows and the totals."""
        return {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "account": self.account,
            "rows": [r.to_dict() for r in self.rows],
            "totals": self.totals.to_dict(),
        }


ROW_COLUMNS = (
    "day",
    "account",
    "model_id",
    "task",
    "hardware_profile",
    "requests",
    "compute_seconds",
    "cost_usd",
)
CHARGE_COLUMNS = (
    "request_id",
    "started_at",
    "billed_account",
    "user",
    "model_id",
    "revision",
    "task",
    "hardware_profile",
    "status",
    "batch_size",
    "input_characters",
    "compute_seconds",
    "queue_seconds",
    "total_seconds",
    "price_usd_per_hour",
    "price_effective_from",
    "cost_nanousd",
    "cost_usd",
)


def render_report(report: UsageReport, fmt: str) -> str:
    """The report as a text table, JSON or CSV (CSV ends with a TOTAL row)."""
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2)
    rows = [r.to_dict() for r in report.rows]
    totals = report.totals.to_dict()
    total_row = {"day": "TOTAL", "requests": totals["requests"], **totals}
    if fmt == "csv":
        return _csv(ROW_COLUMNS, [*rows, total_row])
    if fmt == "table":
        return _table(ROW_COLUMNS, rows, total_row)
    raise ValueError(f"unknown format {fmt!r} (use one of {', '.join(FORMATS)})")


def render_charges(charges: list[Charge], fmt: str) -> str:
    """Raw charges (one per request) as a text table, JSON or CSV."""
    dicts = [c.to_dict() for c in charges]
    if fmt == "json":
        return json.dumps(dicts, indent=2, default=str)
    total = sum(c.cost_nanousd for c in charges)
    total_row = {"request_id": "TOTAL", "cost_nanousd": total, "cost_usd": usd_str(total)}
    if fmt == "csv":
        return _csv(CHARGE_COLUMNS, dicts)
    if fmt == "table":
        return _table(CHARGE_COLUMNS, dicts, total_row)
    raise ValueError(f"unknown format {fmt!r} (use one of {', '.join(FORMATS)})")


def _csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _table(columns: tuple[str, ...], rows: list[dict[str, Any]], total_row: dict[str, Any]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in [*rows, total_row]]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = {"requests", "compute_seconds", "cost_usd", "cost_nanousd", "batch_size", "input_characters"}

    def fmt(values: list[str]) -> str:
        parts = [
            v.rjust(w) if c in numeric else v.ljust(w)
            for v, w, c in zip(values, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [fmt(list(columns)), rule, *(fmt(r) for r in cells[:-1]), rule, fmt(cells[-1])]
    return "\n".join(lines)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
