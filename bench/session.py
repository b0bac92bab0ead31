"""One benchmark invocation: every level of a sweep, the live progress bar, pricing and reconciliation."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, TextIO

from bench.client import RequestResult
from bench.output import build_run
from bench.reconcile import (
    ChargeSource,
    LedgerError,
    Reconciliation,
    fill_from_ledger,
    reconcile_until_settled,
)
from bench.report import apply_price
from bench.runner import CLOSED, LoadSpec, PointResult, run_point
from bench.workloads import Workload


@dataclass
class BenchPlan:
    """What to run: the target, the workload, the load levels and the cost inputs."""

    url: str
    workload: Workload
    load: LoadSpec  # the first level; a sweep replaces the concurrency or rate
    sweep: Sequence[float] = ()
    token: str | None = None
    price_usd_per_second: Decimal | None = None
    replicas: int = 1
    ledger: ChargeSource | None = None
    ledger_name: str = ""
    ledger_wait_s: float = 0.0

    def levels(self) -> list[LoadSpec]:
        """One LoadSpec per level of the sweep (or just the load)."""
        if not self.sweep:
            return [self.load]
        if self.load.mode == CLOSED:
            return [replace(self.load, concurrency=int(level)) for level in self.sweep]
        return [replace(self.load, rate_rps=float(level)) for level in self.sweep]


class LiveProgress:
    """A progress bar on stderr with live throughput and errors; silent when disabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._progress: Any = None
        self._task: Any = None
        self._t0 = 0.0
        self._ok = 0
        self._errors = 0
        self._load: LoadSpec | None = None

    def __enter__(self) -> LiveProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=self._stream),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_level(self, load: LoadSpec) -> None:
        """A new bar for the next load level."""
        self._t0, self._ok, self._errors, self._load = time.perf_counter(), 0, 0, load
        if self._progress is None:
            return
        label = f"c={load.concurrency}" if load.mode == CLOSED else f"rate={load.rate_rps:g}/s"
        total = load.requests if load.requests is not None else None
        self._task = self._progress.add_task(label, total=total, stats="")

    def update(self, r: RequestResult) -> None:
        """Count one answered request and refresh throughput and errors."""
        if r.ok:
            self._ok += 1
        else:
            self._errors += 1
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        stats = f"{self._ok / elapsed:7.1f} req/s  errors {self._errors}"
        self._progress.update(self._task, advance=1, stats=stats)


def run_plan(
    plan: BenchPlan, *, progress: LiveProgress | None = None, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], str | None]:
    """Run every level, reconcile and price; return the run document and the ledger's error, if any.

    A ledger that cannot be read after the load does not lose the run: the document is returned without a
    reconciliation and the error is returned beside it.
    """
    progress = progress or LiveProgress(False)
    points: list[PointResult] = []
    with progress:
        for load in plan.levels():
            progress.start_level(load)
            run = run_point(plan.url, plan.workload, load, token=plan.token, progress=progress.update)
            points.append(asyncio.run(run))
    finished_at = time.time()
    results = [r for p in points for r in p.results]
    rec: Reconciliation | None = None
    ledger_error: str | None = None
    if plan.ledger is not None:
        try:
            rec = reconcile_until_settled(
                results, plan.ledger, source_name=plan.ledger_name, wait_s=plan.ledger_wait_s
            )
        except LedgerError as err:
            ledger_error = str(err)
        else:
            filled = fill_from_ledger(results, rec)
            if filled:
                log(f"cost of {filled} request(s) without a cost header (streams) taken from the ledger")
    apply_price(results, plan.price_usd_per_second)
    doc = build_run(
        url=plan.url,
        workload=plan.workload,
        points=points,
        replicas=plan.replicas,
        price_usd_per_second=plan.price_usd_per_second,
        reconciliation=rec,
        finished_at_unix_s=finished_at,
    )
    return doc, ledger_error
