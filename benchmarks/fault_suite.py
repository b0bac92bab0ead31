"""The fault suite: billing integrity under faults, end to end through the real service.

Ray Serve with the default tiny models, real HTTP clients on 127.0.0.1, and every check made against the ledger
(the database the charges land in) and the provider cost look-up (`POST /billing/requests`), never against the
response headers alone. Each request carries an `X-Request-Id` tag, kept as its charge's `client_request_id`, so
a scenario finds its own charges whatever else the service has charged.

1. exact: N requests at C clients (classification and embeddings, on the model's own route and through the
   router) give exactly N charges, one per request, and the sums (headers, ledger, look-up) agree to the
   nano-dollar.
2. kill: SIGKILL a model replica, then the router (ingress) replica, mid-load. Every answered request has exactly
   one charge in the ledger and the look-up, none is doubled, no 500: a 503 carries Retry-After, and a
   connection error is allowed only where the killed process held the client's connection. The killed
   process's spool file is adopted (by its successor) and its charges arrive.
3. outage: PostgreSQL stopped mid-load under two router applications beside the service on the same Ray
   instance, one in open mode (it serves on; the charges wait in the spool) and one in tokens mode (admission
   answers 503 with Retry-After). Once the database is back nothing is lost, and every reservation ends settled
   at its charge's cost (a settlement lost in the outage, by the sweep) or released without one.
4. poison: an X-Request-Id longer than the ledger keeps is a 400 and charges nothing; a spooled record the
   database refuses (in a file an orphaned process left) is dead-lettered and the records after it are charged.
5. disconnect: clients leave at random points (streams and not; images, chat, classification): a request is
   charged at most once, as ok or client_disconnected; a stream left after its first token is charged; a
   request refused before compute never is. In tokens mode, once the clients are gone no reservation is open,
   the sweep has nothing to repair, and billing's settled costs reconcile with the ledger.

`make test` runs them at CI counts (tests/integration/test_fault_suite*.py load this file). Run directly for
larger counts; it starts its own Ray, Serve and PostgreSQL on 127.0.0.1, prints a summary, writes JSON, and exits
1 if any check failed:

    .venv/bin/python benchmarks/fault_suite.py --requests 10000 --clients 64 --outage-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from core.money import usd_str  # noqa: E402
from metering.ledger import charges_table, dead_letters_table, row_to_charge  # noqa: E402
from metering.records import STATUS_CLIENT_DISCONNECTED, STATUS_OK, Charge  # noqa: E402

CLS_ID = "local/tiny-sentiment"
EMB_ID = "sentence-transformers/all-MiniLM-L6-v2"
LLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FLUX_ID = "local/tiny-flux"
ROUTER = "/hf-inference"  # every route under this prefix is the router application's
CHAT = "/v1/chat/completions"
# What a client sees when the process holding its connection dies.
CONNECTION_ERRORS = frozenset({"RemoteProtocolError", "ReadError", "WriteError", "ConnectError"})
LOOKUP_CHUNK_IDS = 1000  # metering.cost_lookup_max_ids, the default
HTTP_TIMEOUT_S = 120.0
LEDGER_WAIT_S = 90.0  # a bounded wait for the spools to drain (a restarted replica loads its model first)


# --- requests and what came back ---------------------------------------------------------------------------------


@dataclass
class Spec:
    """One request to send, and how its client behaves."""

    tag: str  # X-Request-Id: the charge's client_request_id
    path: str
    body: dict[str, Any]
    kind: str
    stream: bool = False
    leave_after_s: float | None = None  # not streamed: the client leaves after this long
    leave_after_events: int | None = None  # streamed: the client leaves after this many events
    preamble_events: int = 0  # events a stream sends before any compute (OpenAI chat: the role chunk)
    refused: bool = False  # refused before compute (a 4xx): never charged
    headers: dict[str, str] = field(default_factory=dict)
    via_router: bool = False  # through the router application, not the model's own
    app: str = ""  # which target it went to (a scenario with several)


@dataclass
class Outcome:
    """What the client saw."""

    spec: Spec
    status: int | None = None
    error: str | None = None  # the client's exception (a lost connection), by class name
    inference_id: str | None = None
    cost_usd: str | None = None
    compute_time: str | None = None
    retry_after: str | None = None
    events: int = 0  # stream events read, the final [DONE] aside
    stream_error: bool = False  # a stream whose last event is an error
    left: bool = False  # the client left before the end
    finished_at: float = 0.0  # time.monotonic()
    body: str = ""

    @property
    def answered(self) -> bool:
        """A 200 read to its end (a stream to its last event, without an error)."""
        return self.status == 200 and not self.left and not self.stream_error and self.error is None

    def describe(self) -> str:
        """One line for a failure message."""
        what = self.status if self.status is not None else (self.error or ("left" if self.left else "?"))
        return f"{self.spec.kind} {self.spec.path} -> {what} {self.body[:160]!r} [{self.spec.tag[-40:]}]"


def _take_headers(out: Outcome, r: httpx.Response) -> None:
    out.status = r.status_code
    out.inference_id = r.headers.get("inference-id")
    out.cost_usd = r.headers.get("x-hfi-cost-usd")
    out.compute_time = r.headers.get("x-compute-time")
    out.retry_after = r.headers.get("retry-after")


async def _read_stream(client: httpx.AsyncClient, spec: Spec, headers: dict[str, str], out: Outcome) -> None:
    async with client.stream("POST", spec.path, json=spec.body, headers=headers) as r:
        _take_headers(out, r)
        if r.status_code != 200:
            out.body = (await r.aread()).decode(errors="replace")[:300]
            return
        if spec.leave_after_events == 0:
            out.left = True  # leaving the block unread closes the connection
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            if '"error"' in line:  # a stream's failure is its last event (the status line was sent)
                out.stream_error, out.body = True, line[:300]
                continue
            out.events += 1
            if spec.leave_after_events is not None and out.events >= spec.leave_after_events:
                out.left = True
                return


async def send_one(client: httpx.AsyncClient, spec: Spec) -> Outcome:
    """Send `spec` and record what came back. A client that leaves closes its connection."""
    out = Outcome(spec)
    headers = {"x-request-id": spec.tag, **spec.headers} if spec.tag else dict(spec.headers)
    try:
        if spec.stream:
            await _read_stream(client, spec, headers, out)
        else:
            try:
                r = await asyncio.wait_for(
                    client.post(spec.path, json=spec.body, headers=headers), spec.leave_after_s
                )
            except asyncio.TimeoutError:
                out.left = True
            else:
                _take_headers(out, r)
                if r.status_code != 200:
                    out.body = r.text[:300]
    except httpx.HTTPError as err:
        out.error, out.body = type(err).__name__, str(err)[:300]
    out.finished_at = time.monotonic()
    return out


async def _load(
    url: str, specs: Iterator[Spec], clients: int, on_outcome: Callable[[Outcome], None] | None
) -> list[Outcome]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT_S, limits=limits) as client:

        async def worker() -> None:
            for spec in specs:  # one iterator for every worker (it never awaits)
                out = await send_one(client, spec)
                outcomes.append(out)
                if on_outcome is not None:
                    on_outcome(out)
                if out.status == 503:  # a client that honours Retry-After does not hammer a refusing service
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes


def run_load(
    url: str, specs: Iterable[Spec], clients: int, on_outcome: Callable[[Outcome], None] | None = None
) -> list[Outcome]:
    """Send `specs` from `clients` concurrent closed-loop clients; the outcomes in the order they finished."""
    return asyncio.run(_load(url, iter(specs), clients, on_outcome))


class Fault:
    """A fault (a blocking callable) run on its own thread once `at` outcomes are in, while the load goes on."""

    def __init__(self, at: int, action: Callable[[], Any]) -> None:
        self.at, self.action = at, action
        self.count = 0
        self.finished = threading.Event()
        self.finished_at = 0.0
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __call__(self, _outcome: Outcome) -> None:
        self.count += 1
        if self.count >= self.at and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fault", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self.action()
        except BaseException as err:  # raised again by join()
            self.error = err
        finally:
            self.finished_at = time.monotonic()
            self.finished.set()

    def join(self, timeout_s: float = 180) -> None:
        """Wait (bounded) for the fault to end; raise what it raised, or if it never ran."""
        if self._thread is None:
            raise RuntimeError(f"the fault never ran: only {self.count} outcomes (wanted {self.at})")
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error


# --- the ledger, the cost look-up --------------------------------------------------------------------------------


class LedgerView:
    """Read-only queries of a ledger database (SQLite or PostgreSQL)."""

    def __init__(self, database_url: str) -> None:
        self.engine = sa.create_engine(database_url)

    def _rows(self, stmt: Any) -> list[Any]:
        try:
            with self.engine.connect() as conn:
                return list(conn.execute(stmt))
        except (sa.exc.OperationalError, sa.exc.ProgrammingError) as err:
            if "no such table" in str(err) or "does not exist" in str(err):  # before the first charge
                return []
            raise

    def charges(self, prefix: str) -> list[Charge]:
        """The charges whose client request id starts with `prefix`."""
        t = charges_table
        stmt = sa.select(t).where(t.c.client_request_id.startswith(prefix, autoescape=True))
        return [row_to_charge(r) for r in self._rows(stmt)]

    def charges_of(self, account: str) -> list[Charge]:
        """Every charge billed to `account`."""
        t = charges_table
        return [row_to_charge(r) for r in self._rows(sa.select(t).where(t.c.billed_account == account))]

    def dead_letters(self, prefix: str) -> list[dict[str, Any]]:
        """The dead letters whose record holds `prefix` (a client request id)."""
        t = dead_letters_table
        stmt = sa.select(t.c.request_id, t.c.error, t.c.record).where(t.c.record.contains(prefix))
        return [
            {"request_id": r.request_id, "error": r.error, "record": json.loads(r.record)}
            for r in self._rows(stmt)
        ]

    def wait_for(
        self, prefix: str, ids: set[str], timeout_s: float = LEDGER_WAIT_S, still_s: float = 1.5
    ) -> list[Charge]:
        """The prefix's charges, once every id of `ids` is among them and their count has held still for `still_s`
        (the charges of requests whose clients left come a moment later); bounded by `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        seen, since = -1, time.monotonic()
        while True:
            found = self.charges(prefix)
            now = time.monotonic()
            if len(found) != seen:
                seen, since = len(found), now
            complete = ids <= {c.request_id for c in found}
            if (complete and now - since >= still_s) or now > deadline:
                return found
            time.sleep(0.25)

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()


@dataclass
class Target:
    """A service to test: where requests go and where their charges land."""

    url: str  # scheme, host and port
    database_url: str
    secret: str  # metering.provider_secret, for the cost look-up
    prefix: str = ""  # the application's route prefix: "" for the service itself
    spool_dir: Path | None = None
    token: str | None = None  # tokens mode: the caller's Bearer token
    name: str = "service"

    @property
    def router_only(self) -> bool:
        """A router application beside the service: every route under its prefix is its own."""
        return bool(self.prefix)

    def path(self, route: str) -> str:
        """`route` under this target's prefix."""
        return self.prefix + route

    def model(self, model_id: str, via_router: bool = False) -> str:
        """A model's route: its own application's, or (`via_router`) the router's."""
        return self.path((ROUTER if via_router and not self.router_only else "") + f"/models/{model_id}")

    @property
    def auth(self) -> dict[str, str]:
        """The caller's credentials (tokens mode)."""
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


def look_up(target: Target, ids: list[str]) -> dict[str, int]:
    """The provider cost look-up of `ids`, in chunks: {request id: cost in nano-USD} of those it knows."""
    found: dict[str, int] = {}
    auth = {"authorization": f"Bearer {target.secret}"}
    for i in range(0, len(ids), LOOKUP_CHUNK_IDS):
        r = httpx.post(
            target.url + target.path("/billing/requests"),
            json={"requestIds": ids[i : i + LOOKUP_CHUNK_IDS]},
            headers=auth,
            timeout=60,
        )
        r.raise_for_status()
        found.update((a["requestId"], a["costNanoUsd"]) for a in r.json()["requests"])
    return found


def wait_for_lookup(target: Target, ids: list[str], timeout_s: float = LEDGER_WAIT_S) -> dict[str, int]:
    """`look_up` until it knows every id (a charge may still be in another replica's spool, a restarted router
    may not be routed to yet); bounded. Raises the last error if it never answered."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, int] | None = None
    while True:
        try:
            found = look_up(target, ids)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        if (found is not None and len(found) == len(set(ids))) or time.monotonic() > deadline:
            return found or {}
        time.sleep(0.5)


def collect(
    target: Target, prefix: str, outcomes: list[Outcome], still_s: float = 1.5
) -> tuple[list[Charge], dict[str, int]]:
    """Wait (bounded) until the answered requests' charges are in the ledger and the count has held still for
    `still_s`; their look-up; both."""
    view = LedgerView(target.database_url)
    try:
        answered = {o.inference_id for o in outcomes if o.answered and o.inference_id}
        charges = view.wait_for(prefix, answered, still_s=still_s)
    finally:
        view.close()
    return charges, wait_for_lookup(target, [c.request_id for c in charges])


def new_prefix(name: str) -> str:
    """A tag prefix of its own for one run of one scenario."""
    return f"fault-{name}-{uuid.uuid4().hex[:8]}-"


# --- reconciliation ----------------------------------------------------------------------------------------------


@dataclass
class Reconciliation:
    """Requests against their charges: counts, totals, and every difference found (`problems`)."""

    sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # "200", "503", "RemoteProtocolError", "left", ...
    answered: int = 0
    charges: int = 0
    charged_by_status: dict[str, int] = field(default_factory=dict)
    charged_unanswered: int = 0  # charged, but the client read no answer (it left, or lost the connection)
    ledger_total_nanousd: int = 0
    lookup_total_nanousd: int = 0
    headers_total_usd: str = "0"  # the answered requests' x-hfi-cost-usd (streams carry none), summed exactly
    problems: list[str] = field(default_factory=list)


def outcome_key(out: Outcome) -> str:
    """How an outcome is counted."""
    if out.left:
        return "left"
    if out.error is not None:
        return out.error
    return f"{out.status}{' stream-error' if out.stream_error else ''}"


def answered_only(out: Outcome) -> bool:
    """The strictest rule: every request answered."""
    return out.answered


def never(_out: Outcome) -> bool:
    """No exception to a rule."""
    return False


# Serve's own answer when the replica it forwards a request to dies (HAProxy's errorfile, or the Python proxy):
# a text/plain 500, never one of the service's (its errors are JSON, its 500s too).
PROXY_500_BODY = "Internal Server Error"


def proxy_500(out: Outcome) -> bool:
    """A 500 from Serve's proxy layer, not from the service."""
    return out.status == 500 and out.body.strip() == PROXY_500_BODY


def proxy_503(out: Outcome) -> bool:
    """hfi-haproxy's 503 (with Retry-After) for a request whose replica could not answer: it died under the request
    (then it may have spooled the charge before the crash, like a cut connection) or none was up."""
    from serving.haproxy_launcher import UNAVAILABLE

    return out.status == 503 and UNAVAILABLE in out.body


def reconcile(
    outcomes: list[Outcome],
    charges: list[Charge],
    looked_up: dict[str, int],
    allowed: Callable[[Outcome], bool] = answered_only,
    lost: Callable[[Outcome], bool] = never,
) -> Reconciliation:
    """Every answered request has exactly one charge (its Inference-Id, the cost and compute of its headers, the
    same cost in the look-up); a refused one none; no request more than one; each outcome `allowed`, every 503
    with Retry-After, no other 5xx but those `lost` (the answer of a process that died: its charge may have been
    spooled before, like a lost connection's); the sums of headers, ledger and look-up equal."""
    rec = Reconciliation(sent=len(outcomes), charges=len(charges))
    rec.outcomes = dict(Counter(outcome_key(o) for o in outcomes))
    by_tag: dict[str, list[Charge]] = defaultdict(list)
    for c in charges:
        by_tag[c.usage.client_request_id or ""].append(c)
    tags = {o.spec.tag for o in outcomes}
    for tag, rows in by_tag.items():
        if len(rows) > 1:
            rec.problems.append(f"doubled: {tag} has {len(rows)} charges")
        if tag not in tags:
            rec.problems.append(f"a charge for no request sent: {tag}")
    headers_usd, headers_ledger_nanousd = Decimal(0), 0
    for out in outcomes:
        rows = by_tag.get(out.spec.tag, []) if out.spec.tag else []
        rec.problems += outcome_problems(out, rows, allowed, lost)
        rec.answered += out.answered
        rec.charged_unanswered += bool(rows) and not out.answered
        if out.answered and not out.spec.stream and len(rows) == 1:
            headers_usd += Decimal(out.cost_usd or "0")
            headers_ledger_nanousd += rows[0].cost_nanousd
    rec.charged_by_status = dict(Counter(c.usage.status for c in charges))
    rec.ledger_total_nanousd = sum(c.cost_nanousd for c in charges)
    rec.lookup_total_nanousd = sum(looked_up.get(c.request_id, 0) for c in charges)
    rec.headers_total_usd = str(headers_usd)
    if headers_usd != Decimal(usd_str(headers_ledger_nanousd)):
        rec.problems.append(f"sums: headers {headers_usd} USD, ledger {usd_str(headers_ledger_nanousd)} USD")
    rec.problems += lookup_problems(charges, looked_up)
    return rec


def outcome_problems(
    out: Outcome,
    rows: list[Charge],
    allowed: Callable[[Outcome], bool],
    lost: Callable[[Outcome], bool] = never,
) -> list[str]:
    """What is wrong with one request and its charges."""
    problems = []
    if lost(out):
        return [f"{out.spec.tag}: {len(rows)} charges"] if len(rows) > 1 else []
    if out.status is not None and out.status >= 500 and out.status != 503:
        problems.append(f"a {out.status}: {out.describe()}")
    if out.status == 503 and not (out.retry_after or "").isdigit():
        problems.append(f"a 503 without Retry-After: {out.describe()}")
    if not allowed(out):
        problems.append(f"an outcome this scenario does not allow: {out.describe()}")
    statuses = {c.usage.status for c in rows}
    if not statuses <= {STATUS_OK, STATUS_CLIENT_DISCONNECTED}:
        problems.append(f"{out.spec.tag}: charged as {statuses}")
    if out.answered:
        problems += answered_problems(out, rows)
    elif rows and (out.spec.refused or (out.status is not None and out.status != 200)):
        problems.append(f"charged though refused: {out.describe()}")
    elif out.spec.stream and out.left and out.events > out.spec.preamble_events and len(rows) != 1:
        problems.append(f"a stream left after {out.events} events has {len(rows)} charges: {out.spec.tag}")
    return problems


def answered_problems(out: Outcome, rows: list[Charge]) -> list[str]:
    """An answered request: one charge, its Inference-Id, status ok, the cost and compute of its headers."""
    if len(rows) != 1:
        return [f"an answered request has {len(rows)} charges: {out.describe()}"]
    row, problems = rows[0], []
    if row.request_id != out.inference_id:
        problems.append(f"{out.spec.tag}: Inference-Id {out.inference_id}, charge {row.request_id}")
    if row.usage.status != STATUS_OK:
        problems.append(f"{out.spec.tag}: answered, but charged as {row.usage.status}")
    shown = (out.cost_usd, out.compute_time)
    if not out.spec.stream and shown != (row.cost_usd_header, row.compute_time_header):
        problems.append(
            f"{out.spec.tag}: headers {shown}, ledger {(row.cost_usd_header, row.compute_time_header)}"
        )
    if row.usage.compute_ns > 0 and row.cost_nanousd < 1:
        problems.append(f"{out.spec.tag}: ran {row.usage.compute_ns} ns and cost nothing")
    return problems


def lookup_problems(charges: list[Charge], looked_up: dict[str, int]) -> list[str]:
    """Every charge answered by the cost look-up with the ledger's cost (the first 20 differences)."""
    problems = [
        f"look-up of {c.request_id} ({c.usage.client_request_id}): {looked_up.get(c.request_id)}, "
        f"ledger {c.cost_nanousd}"
        for c in charges
        if looked_up.get(c.request_id) != c.cost_nanousd
    ]
    return problems[:20] + (
        [f"... and {len(problems) - 20} more look-up differences"] if len(problems) > 20 else []
    )


@dataclass
class Result:
    """A scenario's reconciliations (one per target), and what else it measured."""

    name: str
    prefix: str
    recs: dict[str, Reconciliation] = field(default_factory=dict)
    wall_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)  # the scenario's own problems

    @property
    def problems(self) -> list[str]:
        """Everything that went wrong: empty when the scenario passed."""
        return [p for rec in self.recs.values() for p in rec.problems] + self.checks

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "wall_s": round(self.wall_s, 1),
            "recs": {k: asdict(v) for k, v in self.recs.items()},
            "notes": self.notes,
            "problems": self.problems,
        }


# --- 1. exact counts ---------------------------------------------------------------------------------------------


def exact_specs(target: Target, prefix: str, requests: int) -> list[Spec]:
    """Classification and embeddings in turn; every fourth pair through the router."""
    specs = []
    for i in range(requests):
        model = CLS_ID if i % 2 == 0 else EMB_ID
        via_router = (i // 2) % 4 == 3
        body = {"inputs": f"request {i}: {'a good' if i % 3 else 'a bad'} service, {'word ' * (i % 7)}"}
        kind = "classification" if model == CLS_ID else "embedding"
        specs.append(
            Spec(
                f"{prefix}{i:06d}",
                target.model(model, via_router),
                body,
                kind,
                headers=target.auth,
                via_router=via_router,
            )
        )
    return specs


def exact_counts(target: Target, requests: int, clients: int) -> Result:
    """N requests at C clients: N answered, exactly N charges, the sums exact."""
    result = Result("exact", new_prefix("exact"))
    started = time.monotonic()
    outcomes = run_load(target.url, exact_specs(target, result.prefix, requests), clients)
    result.wall_s = time.monotonic() - started
    charges, looked_up = collect(target, result.prefix, outcomes)
    rec = result.recs[target.name] = reconcile(outcomes, charges, looked_up)
    result.notes["requests_per_s"] = round(requests / result.wall_s, 1)
    if (rec.answered, rec.charges) != (requests, requests):
        result.checks.append(f"{requests} requests: {rec.answered} answered, {rec.charges} charges")
    if rec.ledger_total_nanousd != rec.lookup_total_nanousd:
        result.checks.append(f"totals: ledger {rec.ledger_total_nanousd}, look-up {rec.lookup_total_nanousd}")
    return result


# --- 2. killed replicas ------------------------------------------------------------------------------------------


def replica_pids(app: str, deployment: str) -> list[int]:
    """The PIDs of the live replicas of `deployment` in Serve application `app`, from Ray's actor table (this
    process must be connected to that Ray instance; the table needs no dashboard, unlike ray.util.state)."""
    import ray

    actor_class = f"ServeReplica:{app}:{deployment}"
    actors = ray._private.state.actors().values()
    return sorted(a["Pid"] for a in actors if a["State"] == "ALIVE" and a["ActorClassName"] == actor_class)


def kill_replica(app: str, deployment: str) -> int:
    """SIGKILL one replica of `deployment` (its process title checked first); its PID."""
    pids = replica_pids(app, deployment)
    if not pids:
        raise RuntimeError(f"no live replica of {app}:{deployment}")
    pid = pids[0]
    title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    if f"ServeReplica:{app}:{deployment}" not in title:  # never signal a process that is not that replica
        raise RuntimeError(f"PID {pid} is not a replica of {app}:{deployment}: {title[:200]!r}")
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_replaced(app: str, deployment: str, old_pid: int, timeout_s: float = 180) -> int:
    """Wait (bounded) until a new replica runs in place of `old_pid` and the application is RUNNING; its PID."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = replica_pids(app, deployment)
        status = serve.status().applications.get(app)
        if pids and old_pid not in pids and status is not None and status.status == "RUNNING":
            return pids[0]
        time.sleep(0.5)
    raise TimeoutError(f"{app}:{deployment} was not replaced within {timeout_s} s")


def spool_files_of(spool_dir: Path, pid: int) -> list[Path]:
    """The spool files a process wrote (`<host>-<pid>-<random>.jsonl`)."""
    pattern = re.compile(rf"-{pid}-[0-9a-f]{{8}}\.jsonl$")
    return [p for p in spool_dir.glob("*.jsonl") if pattern.search(p.name)]


def wait_gone(paths: Callable[[], list[Path]], timeout_s: float = LEDGER_WAIT_S) -> bool:
    """Whether the files `paths()` lists are all gone (adopted, replayed, removed) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while paths():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def kill_specs(target: Target, prefix: str, requests: int, chat_every: int) -> list[Spec]:
    """Classification on the model's own route and through the router in turn, and (every `chat_every`) a
    short chat through the router."""
    specs = []
    for i in range(requests):
        tag = f"{prefix}{i:06d}"
        if chat_every and i % chat_every == chat_every - 1:
            body = {"model": LLM_ID, "messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 2}
            specs.append(Spec(tag, target.path(CHAT), body, "chat", headers=target.auth, via_router=True))
            continue
        via_router = i % 2 == 1
        path = target.model(CLS_ID, via_router)
        specs.append(
            Spec(
                tag,
                path,
                {"inputs": f"kill {i}"},
                "classification",
                headers=target.auth,
                via_router=via_router,
            )
        )
    return specs


def kill_scenario(
    target: Target,
    app: str,
    deployment: str,
    requests: int,
    clients: int,
    *,
    router_dies: bool,
    proxy_500_is_problem: bool = True,
) -> Result:
    """SIGKILL a replica of `app`:`deployment` once a quarter of the requests are done, the load going on; then
    every request against the ledger and the look-up, and the dead process's spool adopted.

    Serve's own 500 for a request whose process died (HAProxy's or its Python proxy's answer) is counted apart
    (notes["proxy_500"]), its charges checked like a lost connection's, and a problem of its own unless
    `proxy_500_is_problem` is False."""
    result = Result(f"kill {deployment}", new_prefix(f"kill-{deployment[:24]}"))
    fault = Fault(max(1, requests // 4), lambda: kill_replica(app, deployment))
    started = time.monotonic()
    outcomes = run_load(
        target.url, kill_specs(target, result.prefix, requests, 8 if router_dies else 0), clients, fault
    )
    fault.join()
    result.wall_s = time.monotonic() - started
    pid = fault.result
    result.notes.update(killed_pid=pid, new_pid=wait_replaced(app, deployment, pid))

    def allowed(out: Outcome) -> bool:
        if out.answered or (out.status == 503 and out.retry_after):
            return True
        # Only the death of the process that held the connection may cut it: the router's for routed requests,
        # the model application's for its own route.
        return out.error in CONNECTION_ERRORS and out.spec.via_router == router_dies

    def died_behind_proxy(out: Outcome) -> bool:
        return (proxy_500(out) or proxy_503(out)) and out.spec.via_router == router_dies

    charges, looked_up = collect(target, result.prefix, outcomes)
    result.recs[target.name] = reconcile(outcomes, charges, looked_up, allowed, died_behind_proxy)
    charged = {c.usage.client_request_id for c in charges}
    result.notes["proxy_500"] = sum(proxy_500(o) for o in outcomes)
    result.notes["proxy_500_charged"] = sum(proxy_500(o) and o.spec.tag in charged for o in outcomes)
    result.notes["proxy_503"] = sum(proxy_503(o) for o in outcomes)
    result.notes["proxy_503_charged"] = sum(proxy_503(o) and o.spec.tag in charged for o in outcomes)
    if proxy_500_is_problem and result.notes["proxy_500"]:
        result.checks.append(
            f"Serve answered {result.notes['proxy_500']} requests with its own 500 (the replica behind it died): "
            "only a 503 with Retry-After or a lost connection is allowed"
        )
    after = [o for o in outcomes if o.finished_at > fault.finished_at]
    result.notes["answered_after_kill"] = sum(o.answered for o in after)
    if not after:
        result.checks.append("the load ended before the kill: not mid-load")
    if target.spool_dir is not None:
        spool_dir = target.spool_dir
        result.notes["spool_adopted"] = wait_gone(lambda: spool_files_of(spool_dir, pid))
        if not result.notes["spool_adopted"]:
            result.checks.append(f"the spool file of the killed process {pid} was never adopted")
    return result


# --- 3. the database down ----------------------------------------------------------------------------------------


def outage_spec(open_t: Target, tokens_t: Target, prefix: str, i: int) -> Spec:
    """Request `i` of the outage load: a third to the tokens application (classification), the rest to the open
    one (classification and embeddings, and every tenth a short chat stream)."""
    tag = f"{prefix}{i:06d}"
    if i % 3 == 0:
        path = tokens_t.model(CLS_ID)
        return Spec(
            tag, path, {"inputs": f"outage {i}"}, "classification", headers=tokens_t.auth, app=tokens_t.name
        )
    if i % 10 == 1:
        body = {
            "model": LLM_ID,
            "messages": [{"role": "user", "content": f"Hi {i}"}],
            "max_tokens": 4,
            "stream": True,
        }
        return Spec(tag, open_t.path(CHAT), body, "chat stream", stream=True, app=open_t.name)
    model = CLS_ID if i % 2 else EMB_ID
    return Spec(tag, open_t.model(model), {"inputs": f"outage {i}"}, model, app=open_t.name)


def outage_specs(
    open_t: Target, tokens_t: Target, prefix: str, requests: int, fault: Fault
) -> Iterator[Spec]:
    """A third of `requests` before the fault, as many as come while it lasts (at most 20 x `requests`), and
    two thirds after it."""
    i = 0
    while i < requests // 3 or (not fault.finished.is_set() and i < 20 * requests):
        yield outage_spec(open_t, tokens_t, prefix, i)
        i += 1
    for _ in range(requests - requests // 3):
        yield outage_spec(open_t, tokens_t, prefix, i)
        i += 1


def lookup_status(target: Target, ids: list[str]) -> tuple[int, str | None]:
    """The status and Retry-After of one cost look-up."""
    auth = {"authorization": f"Bearer {target.secret}"}
    r = httpx.post(
        target.url + target.path("/billing/requests"), json={"requestIds": ids}, headers=auth, timeout=60
    )
    return r.status_code, r.headers.get("retry-after")


def outage_scenario(
    open_t: Target,
    tokens_t: Target,
    account: str,
    db: Any,
    outage_s: float,
    requests: int,
    clients: int,
) -> Result:
    """Stop the database (`db.stop()`, `db.start()`) for `outage_s` once a third of the requests are done."""
    result = Result("outage", new_prefix("outage"))
    answered: list[str] = []
    seen: dict[str, Any] = {}

    def outage() -> None:
        db.stop()
        try:
            seen["lookup_while_down"] = lookup_status(open_t, answered[:10])
            time.sleep(outage_s)
        finally:
            db.start()

    fault = Fault(max(1, requests // 3), outage)

    def on_outcome(out: Outcome) -> None:
        if out.answered and out.inference_id and out.spec.app == open_t.name:
            answered.append(out.inference_id)
        fault(out)

    started = time.monotonic()
    outcomes = run_load(
        open_t.url, outage_specs(open_t, tokens_t, result.prefix, requests, fault), clients, on_outcome
    )
    fault.join()
    result.wall_s = time.monotonic() - started
    _outage_checks(result, outcomes, fault, seen)
    for target, allowed in ((open_t, answered_only), (tokens_t, _answered_or_503)):
        mine = [o for o in outcomes if o.spec.app == target.name]
        charges, looked_up = collect(target, result.prefix, mine)
        result.recs[target.name] = reconcile(mine, charges, looked_up, allowed)
    result.notes["sweep"] = sweep(tokens_t.database_url)  # the settlements lost while the database was down
    view = LedgerView(tokens_t.database_url)
    try:
        summary, problems = reservation_problems(tokens_t.database_url, account, view.charges_of(account))
    finally:
        view.close()
    result.notes["tokens"] = summary
    result.checks += problems
    return result


def _answered_or_503(out: Outcome) -> bool:
    return out.answered or out.status == 503


def _outage_checks(result: Result, outcomes: list[Outcome], fault: Fault, seen: dict[str, Any]) -> None:
    until_back = [o for o in outcomes if o.finished_at <= fault.finished_at]
    after = [o for o in outcomes if o.finished_at > fault.finished_at]
    result.notes.update(
        outcomes_by_app={
            app: dict(Counter(outcome_key(o) for o in outcomes if o.spec.app == app))
            for app in sorted({o.spec.app for o in outcomes})
        },
        answered_after_outage=sum(o.answered for o in after),
        lookup_while_down=seen.get("lookup_while_down"),
        requests_until_back=len(until_back),
    )
    status, retry_after = seen.get("lookup_while_down") or (None, None)
    if status != 503 or not (retry_after or "").isdigit():
        result.checks.append(
            f"the cost look-up while the database was down: {status}, Retry-After {retry_after}"
        )
    if not any(o.answered for o in after):
        result.checks.append("nothing was answered after the outage: not mid-load")


# --- 4. poison ---------------------------------------------------------------------------------------------------


def poison_records(prefix: str) -> list[dict[str, Any]]:
    """Spool records: a good charge, a poison one (a cost no BIGINT column holds: SQLite and PostgreSQL both
    refuse it), and another good one."""
    from hardware_profiles import load_profiles
    from metering.pricing import price_in_catalog
    from metering.records import UsageRecord

    records = []
    for name in ("good-1", "poison", "good-2"):
        usage = UsageRecord(
            str(uuid.uuid4()),
            dt.datetime.now(dt.timezone.utc),
            CLS_ID,
            "fault-suite",
            "text-classification",
            "cpu-basic",
            1_000_000,
            client_request_id=prefix + name,
        )
        record = price_in_catalog(usage, load_profiles(), 1).to_dict()
        if name == "poison":
            record["cost_nanousd"] = 2**64
        records.append(record)
    return records


def inject_orphan_spool(spool_dir: Path, records: list[dict[str, Any]]) -> Path:
    """Leave `records` in `spool_dir` as the spool file of a process that is gone (no one holds its lock): the
    next process that adopts orphans replays it. Written under another name first: no one adopts half of it."""
    path = spool_dir / f"fault-orphan-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
    tmp = path.with_suffix(".writing")
    with open(tmp, "wb") as f:
        f.write(b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return path


def poison_outcome(target: Target, prefix: str, records: list[dict[str, Any]], orphan: Path) -> Result:
    """After the orphan was adopted: the good records charged, the poison dead-lettered, never charged."""
    result = Result("poison", prefix)
    result.notes["orphan_adopted"] = wait_gone(lambda: [orphan] if orphan.exists() else [])
    good = {r["request_id"] for r in records if r["client_request_id"] != prefix + "poison"}
    poison = next(r for r in records if r["client_request_id"] == prefix + "poison")
    view = LedgerView(target.database_url)
    try:
        charged = {c.request_id for c in view.wait_for(prefix, good, still_s=0.5)}
        letters = view.dead_letters(prefix)
    finally:
        view.close()
    result.notes.update(
        charged=len(charged), dead_letters=[(d["request_id"], d["error"][:120]) for d in letters]
    )
    if not result.notes["orphan_adopted"]:
        result.checks.append(f"the orphaned spool file {orphan.name} was never adopted")
    if charged != good:
        result.checks.append(f"the good records around the poison: {len(charged & good)} of 2 charged")
    if poison["request_id"] in charged:
        result.checks.append("the poison record was charged")
    if [d["request_id"] for d in letters] != [poison["request_id"]]:
        result.checks.append(f"dead letters: {result.notes['dead_letters']}, expected the poison record once")
    return result


def long_request_id(target: Target) -> Result:
    """An X-Request-Id of 257 characters is a 400 naming the header, on the model's own route and through the
    router, and nothing is charged; one of 256 is served and kept whole. (X-Amzn-Trace-Id is not tried here:
    behind Serve's proxy every request reaches the service with an X-Request-Id, the proxy's own when the client
    sent none, so the trace id is never read.)"""
    prefix = new_prefix("long-id")
    too_long, longest = prefix + "x" * (257 - len(prefix)), prefix + "y" * (256 - len(prefix))
    auth = target.auth
    specs = [
        Spec(
            too_long, target.model(CLS_ID), {"inputs": "long"}, "classification", refused=True, headers=auth
        ),
        Spec(
            too_long, target.model(EMB_ID, True), {"inputs": "long"}, "embedding", refused=True, headers=auth
        ),
        Spec(longest, target.model(CLS_ID), {"inputs": "longest"}, "classification", headers=auth),
    ]
    outcomes = run_load(target.url, specs, 1)
    result = Result("long request id", prefix)
    charges, looked_up = collect(target, prefix, outcomes)
    result.recs[target.name] = reconcile(
        outcomes, charges, looked_up, lambda o: o.answered or o.status == 400
    )
    for out in outcomes[:2]:
        if out.status != 400 or "x-request-id" not in out.body.lower():
            result.checks.append(f"not a 400 naming the header: {out.describe()}")
    if [c.usage.client_request_id for c in charges] != [longest]:
        result.checks.append(f"charged {[c.usage.client_request_id for c in charges]}: only the 256-char id")
    return result


# --- 5. clients that leave ---------------------------------------------------------------------------------------


def _chat(i: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    content = f"Count slowly from {i} to {i + 40}, one number a line."
    return {
        "model": LLM_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def _leave_s(rng: random.Random, most_s: float) -> float | None:
    return None if rng.random() < 0.25 else rng.uniform(0.02, most_s)


def disconnect_spec(target: Target, tag: str, i: int, rng: random.Random) -> Spec:
    """Request `i` of the mix: an image, a chat (streamed or not, through the router or the model's own route),
    a classification, or one refused before compute (a bad image size, a malformed chat, an unknown model).
    Its client leaves at a random point, or (a quarter of them) reads the whole answer."""
    kind, auth = i % 8, target.auth
    if kind in (0, 1):
        params = {"width": 64, "height": 64, "num_inference_steps": 8, "seed": i}
        body = {"inputs": f"a cat number {i}", "parameters": params}
        headers = {**auth, "accept": "image/png"}
        leave_s = _leave_s(rng, 0.6)
        path = target.model(FLUX_ID, kind == 1)
        return Spec(tag, path, body, "image", leave_after_s=leave_s, headers=headers, via_router=kind == 1)
    if kind == 2:
        leave_s = _leave_s(rng, 0.8)
        return Spec(tag, target.path(CHAT), _chat(i, 8, False), "chat", leave_after_s=leave_s, headers=auth)
    if kind in (3, 4):
        path = target.path(CHAT) if kind == 3 else target.model(LLM_ID) + CHAT
        events = None if rng.random() < 0.25 else rng.randint(0, 6)
        body = _chat(i, 10, True)
        # OpenAI's chat stream opens with a role chunk, sent before any compute.
        return Spec(
            tag, path, body, "chat stream", True, leave_after_events=events, preamble_events=1, headers=auth
        )
    if kind == 5:
        leave_s = _leave_s(rng, 0.05)
        return Spec(
            tag,
            target.model(CLS_ID),
            {"inputs": f"leave {i}"},
            "classification",
            leave_after_s=leave_s,
            headers=auth,
        )
    path, body = [
        (target.model(FLUX_ID), {"inputs": "a", "parameters": {"width": 65}}),
        (target.path(CHAT), {"model": LLM_ID, "messages": "not a list"}),
        (target.model("local/no-such-model", True), {"inputs": "x"}),
    ][(i // 8) % 3]
    return Spec(tag, path, body, "refused", leave_after_s=_leave_s(rng, 0.05), refused=True, headers=auth)


def _may_leave(out: Outcome) -> bool:
    return out.answered or out.left or (out.spec.refused and out.status in (400, 404, 422))


def disconnect_scenario(target: Target, requests: int, clients: int, seed: int) -> Result:
    """Clients leave at random points; every request against the ledger and the look-up."""
    rng = random.Random(seed)
    result = Result("disconnect", new_prefix("leave"))
    specs = [disconnect_spec(target, f"{result.prefix}{i:05d}", i, rng) for i in range(requests)]
    started = time.monotonic()
    outcomes = run_load(target.url, specs, clients)
    result.wall_s = time.monotonic() - started
    charges, looked_up = collect(
        target, result.prefix, outcomes, still_s=3.0
    )  # the charges of clients that left
    rec = result.recs[target.name] = reconcile(outcomes, charges, looked_up, _may_leave)
    charged_tags = {c.usage.client_request_id for c in charges}
    left = [o for o in outcomes if o.left]
    result.notes.update(
        seed=seed,
        left=len(left),
        streams_left_after_a_token=sum(o.spec.stream and o.events > o.spec.preamble_events for o in left),
        charged_client_disconnected=rec.charged_by_status.get(STATUS_CLIENT_DISCONNECTED, 0),
        left_charged_by_kind=dict(Counter(o.spec.kind for o in left if o.spec.tag in charged_tags)),
        left_not_charged_by_kind=dict(Counter(o.spec.kind for o in left if o.spec.tag not in charged_tags)),
    )
    if not result.notes["streams_left_after_a_token"]:
        result.checks.append("no client left a stream after a token: the scenario tested nothing")
    return result


# --- tokens mode: reservations -----------------------------------------------------------------------------------


def create_account(database_url: str, name: str) -> str:
    """A PRO user `name` (pay-as-you-go: no cap in the way) and a token for it; billing migrates first."""
    from billing.config import BillingSettings
    from billing.service import BillingService

    svc = BillingService(BillingSettings(mode="tokens"), database_url)
    try:
        svc.accounts.create_user(name, "pro")
        return svc.accounts.issue_token(name).token
    finally:
        svc.close()


def _query(database_url: str, stmt: Any) -> list[Any]:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(stmt))
    finally:
        engine.dispose()


def reservations(database_url: str, account: str) -> list[Any]:
    """The account's reservations: id, request_id, state, estimate_nanousd, cost_nanousd, month."""
    from billing.schema import Reservation

    t = Reservation.__table__
    cols = (t.c.id, t.c.request_id, t.c.state, t.c.estimate_nanousd, t.c.cost_nanousd, t.c.month)
    return _query(database_url, sa.select(*cols).where(t.c.account == account))


def committed_nanousd(database_url: str, account: str) -> dict[str, int]:
    """The account's admission gate by month: settled costs plus open estimates."""
    from billing.schema import MonthSpend

    t = MonthSpend.__table__
    rows = _query(database_url, sa.select(t.c.month, t.c.committed_nanousd).where(t.c.account == account))
    return {r.month: int(r.committed_nanousd) for r in rows if r.committed_nanousd}


def wait_none_open(database_url: str, account: str, timeout_s: float = 60) -> int:
    """Wait (bounded) until none of the account's reservations is open (settlements and releases run as
    background tasks after the response); how many are still open."""
    deadline = time.monotonic() + timeout_s
    while True:
        still = sum(r.state == "open" for r in reservations(database_url, account))
        if still == 0 or time.monotonic() > deadline:
            return still
        time.sleep(0.25)


def sweep(database_url: str) -> dict[str, int]:
    """What `hfi billing sweep` does, now and with no grace: lost settlements settled from the ledger."""
    from billing.config import BillingSettings
    from billing.service import BillingService

    svc = BillingService(BillingSettings(mode="tokens", settle_grace_s=0.001), database_url)
    try:
        result = svc.sweep_reservations()
    finally:
        svc.close()
    return {"settled_from_ledger": result.settled_from_ledger, "expired": result.expired}


def reservation_problems(
    database_url: str, account: str, charges: list[Charge]
) -> tuple[dict[str, Any], list[str]]:
    """Every reservation of `account` settled at its charge's cost, or released with no charge, none open; every
    charge of the account settled; the admission gate equal to the settled costs; billing's reconciliation of
    each month clean."""
    rows = reservations(database_url, account)
    cost = {c.request_id: c.cost_nanousd for c in charges}
    problems: list[str] = []
    for r in rows:
        if r.state == "settled" and cost.get(r.request_id) != r.cost_nanousd:
            problems.append(
                f"reservation {r.id} settled at {r.cost_nanousd}, ledger {cost.get(r.request_id)}"
            )
        elif r.state in ("released", "expired") and r.request_id in cost:
            problems.append(
                f"reservation {r.id} {r.state}, but {r.request_id} was charged {cost[r.request_id]}"
            )
        elif r.state == "open":
            problems.append(f"reservation {r.id} of {r.request_id} still open")
    settled = {r.request_id for r in rows if r.state == "settled"}
    problems += [f"charged with no settled reservation: {rid}" for rid in sorted(set(cost) - settled)]
    by_month: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.state == "settled":
            by_month[r.month] += int(r.cost_nanousd)
    gate = committed_nanousd(database_url, account)
    if gate != {m: v for m, v in by_month.items() if v}:
        problems.append(f"admission gate {gate} != settled costs {dict(by_month)}")
    problems += _billing_reconcile(database_url, sorted(by_month))
    summary = {
        "reservations": len(rows),
        "states": dict(Counter(r.state for r in rows)),
        "settled_nanousd": sum(by_month.values()),
    }
    return summary, problems


def _billing_reconcile(database_url: str, months: list[str]) -> list[str]:
    from billing.config import BillingSettings
    from billing.service import BillingService

    svc = BillingService(BillingSettings(mode="tokens"), database_url)
    try:
        recs = [svc.reconcile(month) for month in months]
    finally:
        svc.close()
    return [f"billing reconcile {r.month}: {r}" for r in recs if not r.ok]


def tokens_disconnect_scenario(
    target: Target, account: str, requests: int, clients: int, seed: int
) -> Result:
    """The disconnect scenario in tokens mode, then the reservations: none open once the clients are gone, the
    sweep has nothing to repair, each settled at its charge's cost or released without one."""
    result = disconnect_scenario(target, requests, clients, seed)
    result.name = "disconnect (tokens)"
    still_open = wait_none_open(target.database_url, account)
    swept = sweep(target.database_url)
    view = LedgerView(target.database_url)
    try:
        summary, problems = reservation_problems(target.database_url, account, view.charges_of(account))
    finally:
        view.close()
    result.notes.update(tokens=summary, still_open=still_open, sweep=swept)
    result.checks += problems
    if still_open:
        result.checks.append(f"{still_open} reservations still open once the clients were gone")
    if swept != {"settled_from_ledger": 0, "expired": 0}:
        result.checks.append(f"the sweep had settlements to repair: {swept}")
    return result


# --- router applications beside the service ----------------------------------------------------------------------


def router_args(
    base: dict[str, Any], database_url: str, spool_dir: Path, secret: str, mode: str
) -> dict[str, Any]:
    """Settings of a router application beside the service: its own database, spool and billing mode; short
    drain and retry intervals (an outage is over in seconds here); housekeeping left to explicit sweeps."""
    return {
        **base,
        "metering": {
            "database_url": database_url,
            "spool_dir": str(spool_dir),
            "provider_secret": secret,
            "drain_interval_s": 0.2,
            "retry_initial_s": 0.05,
            "retry_max_s": 1.0,
        },
        "billing": {"mode": mode, "settle_grace_s": 3600, "sweep_interval_s": 3600, "prune_interval_s": 0},
    }


def deploy_routers(service_args: dict[str, Any], apps: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Deploy router applications ({name: (route prefix, settings)}) on the running Serve instance: the
    service's own router (`serving.deployment.Ingress`), mounted at the prefix, calling the model applications of
    the service (settings `service_args`) by handle. No model replica of their own."""
    from ray import serve

    from serving.app import app_name
    from serving.config import Settings
    from serving.deployment import Ingress

    service = Settings.load(service_args, env={})
    names = {spec.id: app_name(spec, service) for spec in service.validated()[0].models}
    runs = []
    for name, (prefix, args) in apps.items():
        settings = Settings.load({**args, "route_prefix": prefix}, env={})
        router = Ingress.options(
            name="ingress",
            num_replicas=1,
            ray_actor_options={"num_cpus": settings.ingress_num_cpus},
            max_ongoing_requests=settings.ingress_max_ongoing_requests,
        ).bind(names, settings.replica_args())
        runs.append(serve.RunTarget(router, name=name, route_prefix=prefix))
    serve.run_many(runs)


def delete_apps(names: Iterable[str]) -> None:
    """Delete Serve applications (their replicas drain their spools on the way out)."""
    from ray import serve

    for name in names:
        serve.delete(name)


# --- the benchmark -----------------------------------------------------------------------------------------------


def print_result(result: Result) -> None:
    """A few lines per scenario."""
    verdict = "ok" if not result.problems else f"{len(result.problems)} PROBLEMS"
    print(f"\n== {result.name}: {verdict} ({result.wall_s:.1f} s)")
    for name, rec in result.recs.items():
        print(
            f"   {name}: sent {rec.sent}, outcomes {rec.outcomes}, answered {rec.answered}, charges {rec.charges} "
            f"{rec.charged_by_status}, charged unanswered {rec.charged_unanswered}"
        )
        print(
            f"   {name}: ledger {usd_str(rec.ledger_total_nanousd)} USD, look-up {usd_str(rec.lookup_total_nanousd)} "
            f"USD, headers of the answered {rec.headers_total_usd} USD"
        )
    for key, value in result.notes.items():
        print(f"   {key}: {value}")
    for problem in result.problems[:30]:
        print(f"   PROBLEM {problem}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="requests of the exact-count scenario")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients of every loaded scenario")
    p.add_argument("--kill-requests", type=int, default=3000, help="requests of each kill scenario")
    p.add_argument("--outage-requests", type=int, default=3000, help="requests before and after the outage")
    p.add_argument("--outage-s", type=float, default=30.0, help="how long the database is down")
    p.add_argument("--disconnect-requests", type=int, default=400)
    p.add_argument("--disconnect-clients", type=int, default=16)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--model-store", default=os.environ.get("HFI_MODEL_STORE", "~/.cache/hfi/models"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_suite.json"))
    return p.parse_args(argv)


def start_stack(args: argparse.Namespace, work: Path, pg: Any) -> dict[str, Target]:
    """Ray and Serve with the default models (SQLite ledger), and two router applications on PostgreSQL."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.net import free_port
    from fixtures.postgres import create_database

    from serving import local

    secret = "fault-suite-secret"
    base = {
        "port": free_port(),
        "model_store": str(Path(args.model_store).expanduser()),
        "offline": True,  # the default models are built locally (`hfi prepare`): never reach for the Hub
        "model_wait_timeout_s": 600,
    }
    service_args = {
        **base,
        "metering": {
            "database_url": f"sqlite:///{work / 'ledger.db'}",
            "spool_dir": str(work / "spool"),
            "provider_secret": secret,
        },
    }
    url = local.start(service_args, ray_temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    targets = {
        "service": Target(url, service_args["metering"]["database_url"], secret, spool_dir=work / "spool")
    }
    apps = {}
    for name, mode in (("fault-open", "open"), ("fault-tokens", "tokens")):
        db = create_database(pg.url)
        apps[name] = (f"/{name}", router_args(base, db, work / name, secret, mode))
        targets[name] = Target(url, db, secret, prefix=f"/{name}", spool_dir=work / name, name=name)
    deploy_routers(service_args, apps)
    return targets


def model_app(model_id: str) -> str:
    """The Serve application (and deployment) name of a catalog model."""
    from models.catalog import load_catalog

    return next(s.deployment_name for s in load_catalog().models if s.id == model_id)


def run_all(
    args: argparse.Namespace, targets: dict[str, Target], pg: Any, done: Callable[[Result], None]
) -> None:
    """Every scenario, in order, at the counts of `args`; `done` gets each result as it comes."""
    from serving.app import INGRESS_APP

    service, open_t, tokens_t = targets["service"], targets["fault-open"], targets["fault-tokens"]
    cls_app = model_app(CLS_ID)
    done(exact_counts(service, args.requests, args.clients))
    done(long_request_id(service))
    poison_prefix = new_prefix("poison")
    records = poison_records(poison_prefix)
    orphan = inject_orphan_spool(service.spool_dir, records)  # type: ignore[arg-type]
    done(kill_scenario(service, cls_app, cls_app, args.kill_requests, args.clients, router_dies=False))
    done(poison_outcome(service, poison_prefix, records, orphan))
    done(kill_scenario(service, INGRESS_APP, "ingress", args.kill_requests, args.clients, router_dies=True))
    tokens_t.token = create_account(tokens_t.database_url, "fault-outage")
    outage = outage_scenario(
        open_t, tokens_t, "fault-outage", pg, args.outage_s, args.outage_requests, args.clients
    )
    done(outage)
    done(disconnect_scenario(service, args.disconnect_requests, args.disconnect_clients, args.seed))
    tokens_t.token = create_account(tokens_t.database_url, "fault-leave")
    clients, requests = args.disconnect_clients, args.disconnect_requests
    done(tokens_disconnect_scenario(tokens_t, "fault-leave", requests, clients, args.seed))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.postgres import PostgresServer

    from serving import local

    for key, value in local.replica_port_range().items():  # no other Ray here takes a dead replica's port
        os.environ.setdefault(key, value)
    work = Path(tempfile.mkdtemp(prefix="hfi-fault-suite-"))
    pg = PostgresServer()
    pg.start()
    started = time.monotonic()
    results: list[Result] = []

    def done(result: Result) -> None:
        results.append(result)
        print_result(result)
        sys.stdout.flush()

    try:
        run_all(args, start_stack(args, work, pg), pg, done)
    finally:
        try:
            local.stop()
        finally:
            pg.destroy()
            shutil.rmtree(work, ignore_errors=True)  # the stack's spools
    failed = [r.name for r in results if r.problems]
    verdict = "all ok" if not failed else f"FAILED: {failed}"
    print(f"\n{len(results)} scenarios in {time.monotonic() - started:.0f} s: {verdict}")
    out = {"args": vars(args), "results": [r.as_dict() for r in results]}
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
