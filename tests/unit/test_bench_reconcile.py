"""Reconciliation: one charge per successful request, costs matching the headers, every difference printed."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal

import pytest

from bench.client import RequestResult
from bench.reconcile import (
    BillingEndpoint,
    LedgerCharge,
    LedgerError,
    LedgerLayout,
    SqlLedger,
    fill_from_ledger,
    format_reconciliation,
    reconcile,
)
from bench.runner import LoadSpec, run_point
from bench.workloads import builtin_workload


class FakeSource:
    """An in-memory charge source (unit tests of the comparison only)."""

    def __init__(self, charges: list[LedgerCharge]) -> None:
        self.charges = charges
        self.asked: list[str] = []

    def charges_for(self, request_ids):
        self.asked = list(request_ids)
        return [c for c in self.charges if c.request_id in set(request_ids)]


def result(i: int, *, status: int = 200, cost: str | None = "0.000000050", compute: str | None = "0.005"):
    r = RequestResult(i, 0.0, 0.0, 0.01, status, inference_id=f"inf-{i}", request_id=f"req-{i}")
    if status >= 400:
        r.error = "boom"
    if cost is not None:
        r.cost_usd, r.cost_source = Decimal(cost), "header"
    r.compute_seconds = None if compute is None else Decimal(compute)
    return r


def test_every_kind_of_difference_is_found_and_printed() -> None:
    results = [result(0), result(1), result(2), result(3), result(4, status=500), result(5)]
    source = FakeSource(
        [
            LedgerCharge("inf-0", 50, 5),
            # inf-1: missing
            LedgerCharge("inf-2", 50, 5),
            LedgerCharge("inf-2", 50, 5),  # duplicate
            LedgerCharge("inf-3", 51, 5),  # cost differs from the header
            LedgerCharge("inf-4", 50, 5),  # a failed request was charged
            LedgerCharge("inf-5", 50, 6),  # compute differs from x-compute-time
            LedgerCharge("someone-else", 99, 1),  # not of this run: ignored
        ]
    )
    rec = reconcile(results, source, source_name="fake")
    kinds = sorted((d.kind, d.request_id) for d in rec.differences)
    assert kinds == [
        ("charged_failure", "inf-4"),
        ("compute_mismatch", "inf-5"),
        ("cost_mismatch", "inf-3"),
        ("duplicate", "inf-2"),
        ("missing", "inf-1"),
    ]
    assert not rec.ok
    assert rec.successful_requests == 5 and rec.failed_requests == 1
    assert sorted(source.asked) == [f"inf-{i}" for i in range(6)]
    text = "\n".join(format_reconciliation(rec.as_dict()))
    for kind, rid in kinds:
        assert f"{kind}: {rid}" in text
    assert "header 0.00000005 USD, ledger 0.000000051 USD" in text


def test_a_clean_run_reconciles_with_exact_totals() -> None:
    results = [result(i, cost="0.1", compute="0.1") for i in range(3)]
    source = FakeSource([LedgerCharge(f"inf-{i}", 100_000_000, 100) for i in range(3)])
    rec = reconcile(results, source, source_name="fake")
    assert rec.ok and rec.charges_found == 3
    assert rec.header_total_usd == rec.ledger_total_usd == Decimal("0.3")  # exact: no float drift
    assert rec.as_dict()["ledger_compute_seconds"] == "0.3"


def test_streams_take_their_cost_from_the_ledger() -> None:
    stream = result(0, cost=None, compute=None)
    rec = reconcile([stream], FakeSource([LedgerCharge("inf-0", 123, 7)]), source_name="fake")
    assert rec.ok
    assert fill_from_ledger([stream], rec) == 1
    assert stream.cost_usd == Decimal("0.000000123") and stream.cost_source == "ledger"
    assert stream.compute_seconds == Decimal("0.007")


def _standin_run(url: str, requests: int) -> list:
    workload = builtin_workload("text-classification", "local/tiny-sentiment")
    return asyncio.run(run_point(url, workload, LoadSpec(concurrency=2, requests=requests))).results


def test_planted_missing_charge_in_a_sqlite_table(bench_standin, tmp_path) -> None:
    # a small ledger table made here, filled from the server's charges, one of them left out
    bench_standin.reset()
    results = _standin_run(bench_standin.url, 10)
    db = tmp_path / "ledger.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE bills (rid TEXT UNIQUE, nanousd INTEGER, ms INTEGER)")
    planted = results[4].inference_id
    rows = [
        (c["request_id"], c["cost_nanousd"], c["compute_ms"])
        for c in bench_standin.state.charges
        if c["request_id"] != planted
    ]
    con.executemany("INSERT INTO bills VALUES (?, ?, ?)", rows)
    con.commit()
    con.close()
    ledger = SqlLedger(
        f"sqlite:///{db}",
        LedgerLayout(table="bills", request_id="rid", cost_nanousd="nanousd", compute_ms="ms"),
    )
    rec = reconcile(results, ledger, source_name="test")
    assert [(d.kind, d.request_id) for d in rec.differences] == [("missing", planted)]
    assert rec.charges_found == 9


def test_planted_missing_charge_in_the_metering_ledger(bench_standin, tmp_path) -> None:
    from metering.ledger import Ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    try:
        bench_standin.reset(ledger=ledger, skip_charge_for={3})  # the server's 3rd request is never charged
        results = _standin_run(bench_standin.url, 8)
        rec = reconcile(results, SqlLedger(url), source_name="metering")
    finally:
        ledger.close()
    missing = [d for d in rec.differences if d.kind == "missing"]
    assert len(missing) == 1 and len(rec.differences) == 1
    assert rec.charges_found == 7
    assert rec.header_total_usd == rec.ledger_total_usd  # the 7 that are there match their headers exactly
    assert missing[0].request_id not in {c["request_id"] for c in bench_standin.state.charges}


def test_sql_ledger_errors_name_the_problem(tmp_path) -> None:
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    # a fresh service's ledger has no table until its first charge: no charges, and a note, not an error
    assert "no charges table yet" in SqlLedger(empty).check()
    assert SqlLedger(empty).charges_for(["x"]) == []
    with pytest.raises(LedgerError, match="no table 'nope'"):
        SqlLedger(empty, LedgerLayout(table="nope")).charges_for(["x"])
    with pytest.raises(LedgerError, match="no table 'nope'"):
        SqlLedger(empty, LedgerLayout(table="nope")).check()
    with pytest.raises(LedgerError, match="bad ledger URL"):
        SqlLedger("not a url").check()
    with pytest.raises(LedgerError, match="cannot reach the ledger"):
        SqlLedger(f"sqlite:///{tmp_path}/no/such/dir/x.db", LedgerLayout()).check()


def test_billing_endpoint_finds_a_duplicate_and_a_missing_charge(bench_standin) -> None:
    bench_standin.reset(double_charge_for={2}, skip_charge_for={5})
    results = _standin_run(bench_standin.url, 6)
    rec = reconcile(
        results, BillingEndpoint(f"{bench_standin.url}/billing/costs", chunk=4), source_name="api"
    )
    assert sorted(d.kind for d in rec.differences) == ["duplicate", "missing"]
