"""Reconciliation: the ledger must hold exactly one charge per successful request, matching its headers.

The benchmark reads charges through a one-method port, `ChargeSource.charges_for(ids)`, with two adapters:
`SqlLedger` (the metering ledger over SQLAlchemy: SQLite or PostgreSQL) and `BillingEndpoint` (the provider
cost look-up, `POST {"requestIds": [...]}` -> `{"requests": [{"requestId", "costNanoUsd"}]}`).

Each successful request is looked up by its ledger key (the `Inference-Id` header, else `x-request-id`).
A failed request must have no charge (5xx are not billed; 4xx never reach compute).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from bench.client import RequestResult
from bench.report import COST_LEDGER, NANO, money

MISSING = "missing"  # a successful request has no charge
DUPLICATE = "duplicate"  # a request has more than one charge
COST_MISMATCH = "cost_mismatch"  # the charge's cost differs from the x-hfi-cost-usd header
COMPUTE_MISMATCH = "compute_mismatch"  # the charge's compute differs from x-compute-time
CHARGED_FAILURE = "charged_failure"  # a failed request was charged
NO_ID = "no_id"  # a successful request carried no id to look it up by


class LedgerError(RuntimeError):
    """The ledger could not be read (bad URL, missing table, unreachable database)."""

    status_code = 502


@dataclass(frozen=True)
class LedgerCharge:
    """One charge as the ledger holds it."""

    request_id: str
    cost_nanousd: int
    compute_ms: int | None = None

    @property
    def cost_usd(self) -> Decimal:
        """The cost in USD, exact."""
        return Decimal(self.cost_nanousd) * NANO

    @property
    def compute_seconds(self) -> Decimal | None:
        """The billed compute in seconds, exact."""
        return None if self.compute_ms is None else Decimal(self.compute_ms) / 1000


class ChargeSource(Protocol):
    """Where the charges of a run are read from."""

    def charges_for(self, request_ids: Sequence[str]) -> list[LedgerCharge]:
        """Every charge whose request id is in `request_ids` (duplicates included, in any order)."""
        ...


@dataclass(frozen=True)
class Difference:
    """One way the ledger and the run disagree."""

    kind: str
    request_id: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        """Plain data for the run file."""
        return {"kind": self.kind, "request_id": self.request_id, "detail": self.detail}


@dataclass
class Reconciliation:
    """The outcome: counts, totals on both sides and every difference."""

    source: str
    successful_requests: int = 0
    failed_requests: int = 0
    charges_found: int = 0
    header_total_usd: Decimal = Decimal(0)
    ledger_total_usd: Decimal = Decimal(0)
    header_compute_seconds: Decimal = Decimal(0)
    ledger_compute_seconds: Decimal = Decimal(0)
    requests_with_cost_header: int = 0
    differences: list[Difference] = field(default_factory=list)
    matched: dict[str, LedgerCharge] = field(default_factory=dict, repr=False)  # ledger key -> its charge

    @property
    def ok(self) -> bool:
        """Exactly one matching charge per successful request and none for failures."""
        return not self.differences

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the run file (money as exact decimal strings)."""
        counts: dict[str, int] = defaultdict(int)
        for d in self.differences:
            counts[d.kind] += 1
        return {
            "source": self.source,
            "ok": self.ok,
            "successful_requests": self.successful_requests,
            "failed_requests": self.failed_requests,
            "charges_found": self.charges_found,
            "requests_with_cost_header": self.requests_with_cost_header,
            "header_total_usd": money(self.header_total_usd),
            "ledger_total_usd": money(self.ledger_total_usd),
            "header_compute_seconds": money(self.header_compute_seconds),
            "ledger_compute_seconds": money(self.ledger_compute_seconds),
            "difference_counts": dict(sorted(counts.items())),
            "differences": [d.as_dict() for d in self.differences],
        }


def reconcile(results: Iterable[RequestResult], source: ChargeSource, *, source_name: str) -> Reconciliation:
    """Compare the run's requests with the charges `source` holds for them (reads only)."""
    results = list(results)
    rec = Reconciliation(source=source_name)
    keys = sorted({r.ledger_key for r in results if r.ledger_key})
    by_id: dict[str, list[LedgerCharge]] = defaultdict(list)
    for charge in source.charges_for(keys):
        by_id[charge.request_id].append(charge)
    for r in results:
        charges = by_id.get(r.ledger_key, []) if r.ledger_key else []
        if r.ok:
            rec.successful_requests += 1
            _check_success(rec, r, charges)
        else:
            rec.failed_requests += 1
            if charges:
                rec.differences.append(
                    Difference(
                        CHARGED_FAILURE, r.ledger_key, f"status {r.status} but {len(charges)} charge(s)"
                    )
                )
    return rec


def _check_success(rec: Reconciliation, r: RequestResult, charges: list[LedgerCharge]) -> None:
    if not r.inference_id and not r.request_id:
        rec.differences.append(
            Difference(NO_ID, r.client_request_id, "no Inference-Id or x-request-id header")
        )
    if not charges:
        rec.differences.append(Difference(MISSING, r.ledger_key, "successful request has no charge"))
        return
    rec.charges_found += len(charges)
    if len(charges) > 1:
        costs = ", ".join(money(c.cost_usd) or "" for c in charges)
        rec.differences.append(Difference(DUPLICATE, r.ledger_key, f"{len(charges)} charges: {costs} USD"))
    charge = charges[0]
    rec.ledger_total_usd += sum((c.cost_usd for c in charges), Decimal(0))
    ledger_compute = charge.compute_seconds
    if ledger_compute is not None:
        rec.ledger_compute_seconds += ledger_compute
    if r.cost_source == "header" and r.cost_usd is not None:
        rec.requests_with_cost_header += 1
        rec.header_total_usd += r.cost_usd
        if r.cost_usd != charge.cost_usd:
            rec.differences.append(
                Difference(
                    COST_MISMATCH,
                    r.ledger_key,
                    f"header {money(r.cost_usd)} USD, ledger {money(charge.cost_usd)} USD",
                )
            )
    if r.compute_seconds is not None:
        rec.header_compute_seconds += r.compute_seconds
        if ledger_compute is not None and r.compute_seconds != ledger_compute:
            rec.differences.append(
                Difference(
                    COMPUTE_MISMATCH,
                    r.ledger_key,
                    f"x-compute-time {money(r.compute_seconds)} s, ledger {money(ledger_compute)} s",
                )
            )
    rec.matched[r.ledger_key] = charge


def fill_from_ledger(results: Iterable[RequestResult], rec: Reconciliation) -> int:
    """Give successful requests without a cost header their charge's cost (and compute); returns how many.

    A stream's headers leave before its compute is known, so the ledger is the only source of what it cost.
    """
    filled = 0
    for r in results:
        charge = rec.matched.get(r.ledger_key) if r.ok else None
        if charge is None or r.cost_source == "header":
            continue
        r.cost_usd, r.cost_source = charge.cost_usd, COST_LEDGER
        if r.compute_seconds is None:
            r.compute_seconds = charge.compute_seconds
        filled += 1
    return filled


def reconcile_until_settled(
    results: Sequence[RequestResult],
    source: ChargeSource,
    *,
    source_name: str,
    wait_s: float = 0.0,
    poll_s: float = 0.5,
) -> Reconciliation:
    """Reconcile, re-reading for up to `wait_s` seconds while charges are missing (the spool drains late)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        rec = reconcile(results, source, source_name=source_name)
        if not any(d.kind == MISSING for d in rec.differences) or time.monotonic() >= deadline:
            return rec
        time.sleep(poll_s)


def format_reconciliation(rec: dict[str, Any]) -> list[str]:
    """Human-readable lines of a reconciliation's `as_dict()`: the verdict, totals and every difference."""
    verdict = "OK" if rec["ok"] else f"{len(rec['differences'])} difference(s)"
    lines = [
        f"reconciliation against {rec['source']}: {verdict}",
        f"  successful requests {rec['successful_requests']}, charges found {rec['charges_found']}, "
        f"failed requests {rec['failed_requests']}",
        f"  cost: headers {rec['header_total_usd']} USD over {rec['requests_with_cost_header']} requests, "
        f"ledger {rec['ledger_total_usd']} USD",
        f"  compute: headers {rec['header_compute_seconds']} s, ledger {rec['ledger_compute_seconds']} s",
    ]
    lines += [f"  {d['kind']}: {d['request_id']}: {d['detail']}" for d in rec["differences"]]
    return lines


# Adapters


@dataclass(frozen=True)
class LedgerLayout:
    """Where charges sit in a database that is not the metering ledger: table and column names."""

    table: str = "charges"
    request_id: str = "request_id"
    cost_nanousd: str = "cost_nanousd"
    compute_ms: str | None = "compute_ms"


class SqlLedger:
    """Read charges from a SQL ledger (SQLite or PostgreSQL); read-only, never migrates or writes.

    Without a layout it reads the metering ledger through metering's own table model (`metering_charges`);
    with one, it reflects the named table (another deployment's ledger, or a test's table).
    """

    def __init__(self, database_url: str, layout: LedgerLayout | None = None, *, chunk: int = 500) -> None:
        self.database_url = database_url
        self.layout = layout
        self.chunk = chunk

    def check(self) -> str | None:
        """Connect now (a bad URL or an unreachable database raises LedgerError); a note if there is no table yet.

        The metering ledger creates its table with the first charge, so a fresh service has none: not an error.
        """
        import sqlalchemy as sa

        engine = self._engine()
        try:
            with engine.connect():
                pass
            if self._columns(engine) is None:  # a custom layout's missing table raises here
                return "the metering ledger has no charges table yet (a fresh service)"
            return None
        except sa.exc.OperationalError as err:
            raise LedgerError(f"cannot reach the ledger: {err.orig}") from err
        finally:
            engine.dispose()

    def charges_for(self, request_ids: Sequence[str]) -> list[LedgerCharge]:
        """Every charge of `request_ids`, read in chunks."""
        import sqlalchemy as sa

        engine = self._engine()
        try:
            cols = self._columns(engine)
            if cols is None:
                return []  # no table yet: the ledger holds no charges
            out: list[LedgerCharge] = []
            with engine.connect() as conn:
                for start in range(0, len(request_ids), self.chunk):
                    part = list(request_ids[start : start + self.chunk])
                    for row in conn.execute(sa.select(*cols).where(cols[0].in_(part))):
                        compute = int(row[2]) if len(row) > 2 and row[2] is not None else None
                        out.append(LedgerCharge(str(row[0]), int(row[1]), compute))
            return out
        except sa.exc.OperationalError as err:
            raise LedgerError(f"cannot read the ledger: {err.orig}") from err
        finally:
            engine.dispose()

    def _engine(self) -> Any:
        import sqlalchemy as sa

        try:
            if self.layout is None:
                from core.db import LEDGER, make_engine

                return make_engine(self.database_url, LEDGER)
            return sa.create_engine(self.database_url)
        except (sa.exc.ArgumentError, ImportError) as err:
            raise LedgerError(f"bad ledger URL {self.database_url!r}: {err}") from err

    def _columns(self, engine: Any) -> list[Any] | None:
        """The request id, cost and compute columns; None when the metering table does not exist yet."""
        import sqlalchemy as sa

        if self.layout is None:
            from metering.ledger import charges_table as table

            if not sa.inspect(engine).has_table(table.name):
                return None
            return [table.c.request_id, table.c.cost_nanousd, table.c.compute_ms]
        lay = self.layout
        try:
            table = sa.Table(lay.table, sa.MetaData(), autoload_with=engine)
            cols = [table.c[lay.request_id], table.c[lay.cost_nanousd]]
            if lay.compute_ms and lay.compute_ms in table.c:
                cols.append(table.c[lay.compute_ms])
        except sa.exc.NoSuchTableError as err:
            raise LedgerError(f"the ledger at {self.database_url!r} has no table {lay.table!r}") from err
        except KeyError as err:
            raise LedgerError(f"the ledger table {lay.table!r} has no column {err}") from err
        return cols


class BillingEndpoint:
    """The provider cost look-up over HTTP: integer nano-USD per request id (no compute times)."""

    def __init__(
        self, url: str, *, token: str | None = None, timeout_s: float = 30.0, chunk: int = 500
    ) -> None:
        self.url = url
        self.token = token
        self.timeout_s = timeout_s
        self.chunk = chunk

    def charges_for(self, request_ids: Sequence[str]) -> list[LedgerCharge]:
        """POST the ids in chunks; ids the endpoint does not know are simply absent from the answer."""
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        out: list[LedgerCharge] = []
        with httpx.Client(timeout=self.timeout_s, trust_env=False) as client:
            for start in range(0, len(request_ids), self.chunk):
                part = list(request_ids[start : start + self.chunk])
                try:
                    resp = client.post(self.url, json={"requestIds": part}, headers=headers)
                    resp.raise_for_status()
                    rows = resp.json()["requests"]
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
                    raise LedgerError(f"billing endpoint {self.url}: {err}") from err
                for row in rows:
                    cost = row.get("costNanoUsd")
                    if isinstance(cost, int) and row.get("requestId") is not None:
                        out.append(LedgerCharge(str(row["requestId"]), cost))
        return out
