"""Metering through the real service (Ray Serve, the default models, the SQLite ledger): a few dozen requests.

Every request carries an `x-request-id` tagged for its test, so the ledger rows of a test are found by their
`client_request_id` whatever else the shared service has charged; the `Inference-Id` header is the row's key.
The ingress drains its spool to the ledger in the background (every 0.2 s): the tests poll with a bounded wait.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from billing.reports import MAX_CHARGES_LIMIT, month_bounds
from core.money import usd_str
from hardware_profiles import load_profiles
from metering.ledger import charges_table, row_to_charge
from metering.pricing import cost_nanousd
from metering.records import STATUS_CLIENT_DISCONNECTED, STATUS_OK, Charge

FLUX = "/models/local/tiny-flux"
EMB = "/models/sentence-transformers/all-MiniLM-L6-v2"
CLS = "/models/local/tiny-sentiment"
CHAT = "/v1/chat/completions"
LLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMB_ID = "sentence-transformers/all-MiniLM-L6-v2"
CLS_ID = "local/tiny-sentiment"
FLUX_ID = "local/tiny-flux"
LEDGER_WAIT_S = 30.0
HTTP_TIMEOUT_S = 120.0


# --- helpers ---------------------------------------------------------------------------------------------------


@dataclass
class Sent:
    """One request sent and what came back."""

    tag: str  # the x-request-id we sent (stored as the charge's client_request_id)
    task: str
    model_id: str
    status_code: int
    headers: httpx.Headers
    stream: bool = False
    body: bytes = b""

    @property
    def inference_id(self) -> str:
        return self.headers["inference-id"]


class LedgerReader:
    """Reads the service's ledger directly (read-only queries); waits for the background drain."""

    def __init__(self, database_url: str) -> None:
        self.engine = sa.create_engine(database_url)

    def _select(self, where: Any) -> list[Charge]:
        try:
            with self.engine.connect() as conn:
                return [row_to_charge(r) for r in conn.execute(sa.select(charges_table).where(where))]
        except sa.exc.OperationalError as err:  # the ingress creates the table with its first charge
            if "no such table" in str(err):
                return []
            raise

    def by_tag_prefix(self, prefix: str) -> list[Charge]:
        return self._select(charges_table.c.client_request_id.startswith(prefix, autoescape=True))

    def by_batch_ids(self, batch_ids: set[str]) -> list[Charge]:
        return self._select(charges_table.c.batch_id.in_(sorted(batch_ids)))

    def wait_for_tags(self, prefix: str, expected: int, timeout_s: float = LEDGER_WAIT_S) -> list[Charge]:
        """The charges whose client request id starts with `prefix`, once there are `expected` of them."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.by_tag_prefix(prefix)
            if len(found) >= expected or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def close(self) -> None:
        self.engine.dispose()


def tag_prefix(name: str) -> str:
    return f"metering-{name}-{uuid.uuid4().hex[:8]}-"


async def send(
    client: httpx.AsyncClient,
    tag: str,
    task: str,
    model_id: str,
    path: str,
    body: dict[str, Any],
    *,
    stream: bool = False,
    accept: str | None = None,
) -> Sent:
    headers = {"x-request-id": tag}
    if accept:
        headers["accept"] = accept
    r = await client.post(path, json=body, headers=headers)
    return Sent(tag, task, model_id, r.status_code, r.headers, stream, r.content)


def mixed_requests(prefix: str) -> list[tuple]:
    """(tag, task, model, path, body, stream, accept) of a mix over every default task, chat streaming too."""
    chat = {"model": LLM_ID, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
    specs = [
        (
            "text-to-image",
            FLUX_ID,
            FLUX,
            {"inputs": "a red cat", "parameters": {"seed": 1}},
            False,
            "image/png",
        ),
        (
            "text-to-image",
            FLUX_ID,
            FLUX,
            {"inputs": "a blue car", "parameters": {"seed": 2}},
            False,
            "image/png",
        ),
        ("chat-completion", LLM_ID, CHAT, chat, False, None),
        ("chat-completion", LLM_ID, CHAT, {**chat, "stream": True}, True, None),
        ("chat-completion", LLM_ID, CHAT, {**chat, "stream": True, "max_tokens": 3}, True, None),
        ("feature-extraction", EMB_ID, EMB, {"inputs": "hello world"}, False, None),
        ("feature-extraction", EMB_ID, EMB, {"inputs": ["a", "much longer sentence to embed"]}, False, None),
        ("feature-extraction", EMB_ID, EMB, {"inputs": "metering is exact"}, False, None),
        (
            "sentence-similarity",
            EMB_ID,
            EMB,
            {"inputs": {"source_sentence": "a cat", "sentences": ["a dog", "a car"]}},
            False,
            None,
        ),
        (
            "sentence-similarity",
            EMB_ID,
            EMB + "/pipeline/sentence-similarity",
            {"inputs": {"source_sentence": "x", "sentences": ["y"]}},
            False,
            None,
        ),
        ("text-classification", CLS_ID, CLS, {"inputs": "I love it"}, False, None),
        ("text-classification", CLS_ID, CLS, {"inputs": "I hate it, it is awful"}, False, None),
        ("text-classification", CLS_ID, CLS, {"inputs": "fine"}, False, None),
    ]
    return [(f"{prefix}{i:03d}", *spec) for i, spec in enumerate(specs)]


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger(hfi_service):
    reader = LedgerReader(hfi_service.database_url)
    yield reader
    reader.close()


@pytest.fixture(scope="module")
def mixed_run(hfi_service, ledger):
    """One concurrent, mixed run over every default task; its responses and its ledger rows by inference id."""
    prefix = tag_prefix("mixed")
    specs = mixed_requests(prefix)

    async def run() -> list[Sent]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=hfi_service.url, timeout=HTTP_TIMEOUT_S, limits=limits) as c:
            # One request per model first: replicas that are still loading must not fail the concurrent run.
            for spec in (specs[0], specs[2], specs[5], specs[10]):
                await c.post(spec[3], json=spec[4], headers={"x-request-id": f"warm-{uuid.uuid4()}"})
            return list(
                await asyncio.gather(
                    *(
                        send(c, tag, task, model, path, body, stream=stream, accept=accept)
                        for tag, task, model, path, body, stream, accept in specs
                    )
                )
            )

    sent = asyncio.run(run())
    for s in sent:
        assert s.status_code == 200, (s.tag, s.task, s.status_code, s.body[:300])
    rows = ledger.wait_for_tags(prefix, len(sent))
    return prefix, sent, rows


# --- tests -----------------------------------------------------------------------------------------------------


def test_concurrent_mixed_requests_give_exactly_one_charge_each(mixed_run, ledger) -> None:
    prefix, sent, rows = mixed_run
    assert len(rows) == len(sent), f"expected {len(sent)} charges, the ledger has {len(rows)}"
    time.sleep(0.5)  # a few more drain cycles: nothing else may arrive for these requests
    rows = ledger.by_tag_prefix(prefix)
    assert Counter(r.usage.client_request_id for r in rows) == Counter(s.tag for s in sent)
    by_id = {r.request_id: r for r in rows}
    assert set(by_id) == {s.inference_id for s in sent}
    for s in sent:
        uuid.UUID(s.inference_id)  # a UUID, as Hugging Face's provider guide asks
        row = by_id[s.inference_id]
        assert row.usage.client_request_id == s.tag
        assert (row.usage.model_id, row.usage.task) == (s.model_id, s.task)
        assert row.usage.status == STATUS_OK
        assert row.usage.compute_ns > 0 and row.cost_nanousd >= 0
        assert s.headers["x-compute-type"] == row.usage.hardware_profile == "cpu-basic"


def test_each_response_shows_its_ledger_charge(mixed_run) -> None:
    _, sent, rows = mixed_run
    by_id = {r.request_id: r for r in rows}
    non_stream = [s for s in sent if not s.stream]
    for s in non_stream:
        row = by_id[s.inference_id]
        assert s.headers["x-compute-time"] == row.compute_time_header, s.task
        assert s.headers["x-compute-time"] == f"{row.compute_ms // 1000}.{row.compute_ms % 1000:03d}"
        assert s.headers["x-hfi-cost-usd"] == usd_str(row.cost_nanousd) == row.cost_usd_header, s.task
    # A stream's headers left before its compute was known: no compute headers, one charge after the last token.
    streams = [s for s in sent if s.stream]
    assert len(streams) == 2
    for s in streams:
        assert "x-compute-time" not in s.headers and "x-hfi-cost-usd" not in s.headers
        assert s.body.rstrip().endswith(b"data: [DONE]")
        row = by_id[s.inference_id]
        assert row.usage.status == STATUS_OK and row.compute_ms >= 0 and row.usage.compute_ns > 0


def test_batched_embeddings_split_the_measured_batch_time_exactly(hfi_service, ledger) -> None:
    """Concurrent embedding requests share forward passes; each batch's shares add up to its measured time."""
    prefix = tag_prefix("batch")
    sentences = [("word " * (1 + 3 * (i % 5))).strip() for i in range(16)]  # unequal work: unequal shares

    async def burst(round_no: int) -> list[Sent]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=hfi_service.url, timeout=HTTP_TIMEOUT_S, limits=limits) as c:
            return list(
                await asyncio.gather(
                    *(
                        send(
                            c, f"{prefix}{round_no}-{i:02d}", "feature-extraction", EMB_ID, EMB, {"inputs": t}
                        )
                        for i, t in enumerate(sentences)
                    )
                )
            )

    sent: list[Sent] = []
    rows: list[Charge] = []
    rounds = 0
    while rounds < 3:  # a loaded machine may serialise a burst: send another, up to three in all
        rounds += 1
        sent += asyncio.run(burst(rounds))
        assert all(s.status_code == 200 for s in sent), [(s.status_code, s.body[:200]) for s in sent]
        rows = ledger.wait_for_tags(prefix, len(sent))
        if any(r.usage.batch_size > 1 for r in rows):
            break
    assert len(rows) == len(sent)
    assert any(r.usage.batch_size > 1 for r in rows), (
        f"no request ran in a batch of more than one after {rounds} bursts of 16 concurrent requests: "
        f"batch sizes {sorted(Counter(r.usage.batch_size for r in rows).items())}; dynamic batching of "
        f"{EMB_ID} did not group concurrent requests through the proxy"
    )
    by_id = {r.request_id: r for r in rows}
    for s in sent:
        assert s.headers["x-compute-time"] == by_id[s.inference_id].compute_time_header
        assert s.headers["x-hfi-cost-usd"] == by_id[s.inference_id].cost_usd_header
    batch_ids = {r.usage.batch_id for r in rows}
    assert None not in batch_ids, "a batched model's charge must name its batch"
    members: dict[str, list[Charge]] = defaultdict(list)
    for r in ledger.by_batch_ids(batch_ids):  # every row of those batches, ours or not
        members[r.usage.batch_id].append(r)
    for batch_id, group in members.items():
        sizes = {r.usage.batch_size for r in group}
        totals = {r.usage.batch_compute_ns for r in group}
        assert len(sizes) == 1 and len(totals) == 1, (batch_id, sizes, totals)
        assert len(group) == sizes.pop(), f"batch {batch_id}: every member is charged once"
        assert sum(r.usage.compute_ns for r in group) == totals.pop(), (
            f"batch {batch_id}: shares != batch time"
        )
    multi = [g for g in members.values() if len(g) > 1]
    assert multi
    # The split is by work (characters of input here): each share is T*w/W rounded down, or one ns more.
    for group in multi:
        total_ns, weight = group[0].usage.batch_compute_ns, sum(r.usage.input_characters for r in group)
        for r in group:
            floor_ns = total_ns * r.usage.input_characters // weight
            assert floor_ns <= r.usage.compute_ns <= floor_ns + 1, (
                r.usage.input_characters,
                weight,
                total_ns,
            )


def test_no_answered_request_in_a_batch_is_free(hfi_service, ledger) -> None:
    """96 concurrent classifications share batches of up to 16 (shares well under half a millisecond): each one
    costs at least a nano-USD through the cost look-up, and a batch's charges add up to the batch's own cost
    (its whole compute time priced once) plus at most one minimum per member."""
    prefix = tag_prefix("tinyshare")

    async def burst() -> list[Sent]:
        limits = httpx.Limits(max_connections=96)
        async with httpx.AsyncClient(base_url=hfi_service.url, timeout=HTTP_TIMEOUT_S, limits=limits) as c:
            return list(
                await asyncio.gather(
                    *(
                        send(c, f"{prefix}{i:03d}", "text-classification", CLS_ID, CLS, {"inputs": "ok"})
                        for i in range(96)
                    )
                )
            )

    sent = asyncio.run(burst())
    assert all(s.status_code == 200 for s in sent), [(s.status_code, s.body[:200]) for s in sent]
    rows = ledger.wait_for_tags(prefix, len(sent))
    assert len(rows) == len(sent)
    auth = {"authorization": f"Bearer {hfi_service.provider_secret}"}
    looked_up = httpx.post(
        hfi_service.url + "/billing/requests",
        json={"requestIds": [s.inference_id for s in sent]},
        headers=auth,
        timeout=30,
    ).json()["requests"]
    assert len(looked_up) == len(sent)
    assert all(a["costNanoUsd"] >= 1 for a in looked_up), sorted(a["costNanoUsd"] for a in looked_up)[:8]
    for s in sent:
        assert s.headers["x-hfi-cost-usd"] != usd_str(0)
    price = load_profiles().get("cpu-basic").price_at(rows[0].usage.started_at_utc).usd_per_second_exact
    members: dict[str, list[Charge]] = defaultdict(list)
    for r in ledger.by_batch_ids({r.usage.batch_id for r in rows if r.usage.batch_id}):
        members[r.usage.batch_id].append(r)
    assert any(len(g) > 1 for g in members.values())
    for batch_id, group in members.items():
        batch_cost = cost_nanousd(group[0].usage.batch_compute_ns, price)
        total = sum(r.cost_nanousd for r in group)
        minimums = sum(1 for r in group if r.cost_nanousd == 1)
        assert batch_cost <= total <= batch_cost + minimums, (batch_id, batch_cost, total, minimums)


def test_a_bad_request_in_a_batch_fails_alone_and_is_not_charged(hfi_service, ledger) -> None:
    """The ingress sends a batched model's requests in batches (one Ray call each): an error found on the replica
    for one request crosses back as that request's own 400; its batch mates succeed and are charged."""
    prefix = tag_prefix("badmate")
    bad = f"{prefix}bad"

    async def burst() -> list[Sent]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=hfi_service.url, timeout=HTTP_TIMEOUT_S, limits=limits) as c:
            good = [
                send(c, f"{prefix}{i:02d}", "feature-extraction", EMB_ID, EMB, {"inputs": f"sentence {i}"})
                for i in range(12)
            ]
            wrong = {"inputs": "too many", "parameters": {"dimensions": 100_000}}  # checked by the runner
            return list(await asyncio.gather(*good, send(c, bad, "feature-extraction", EMB_ID, EMB, wrong)))

    sent = asyncio.run(burst())
    by_tag = {s.tag: s for s in sent}
    assert by_tag[bad].status_code == 400, by_tag[bad].body
    assert b"parameters.dimensions" in by_tag[bad].body
    good = [s for s in sent if s.tag != bad]
    assert all(s.status_code == 200 for s in good), [(s.status_code, s.body[:200]) for s in good]
    assert all(len(json.loads(s.body)) == 384 for s in good)
    rows = ledger.wait_for_tags(prefix, len(good))
    assert sorted(r.usage.client_request_id for r in rows) == sorted(s.tag for s in good)


def test_disconnect_mid_stream_is_charged_for_what_ran_and_bad_requests_are_not(
    hfi_service, ledger, ray_metrics
) -> None:
    prefix = tag_prefix("disconnect")
    url = hfi_service.url
    before = ray_metrics.settle()
    body = {
        "model": LLM_ID,
        "messages": [{"role": "user", "content": "Tell me a very long story about a cat."}],
        "max_tokens": 256,
        "stream": True,
    }
    events = 0
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as c:
        with c.stream("POST", CHAT, json=body, headers={"x-request-id": prefix + "stream"}) as r:
            assert r.status_code == 200
            inference_id = r.headers["inference-id"]
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events += 1
                    if events == 3:
                        break  # leave after three tokens; closing the response drops the connection
        bad = c.post(
            FLUX, json={"inputs": "a", "parameters": {"width": 65}}, headers={"x-request-id": prefix + "bad"}
        )
        assert bad.status_code == 400 and "width" in bad.json()["error"]
        # A later good request: once its charge is in, anything spooled before it would be in too.
        ok = c.post(CLS, json={"inputs": "after"}, headers={"x-request-id": prefix + "ok"})
        assert ok.status_code == 200
    assert events == 3
    rows = ledger.wait_for_tags(prefix, 2)
    by_tag = {r.usage.client_request_id: r for r in rows}
    assert set(by_tag) == {prefix + "stream", prefix + "ok"}, "the 400 must not be charged"
    cut = by_tag[prefix + "stream"]
    assert cut.request_id == inference_id
    assert cut.usage.status == STATUS_CLIENT_DISCONNECTED
    assert cut.usage.compute_ns > 0 and cut.compute_ms > 0 and cut.cost_nanousd > 0
    assert by_tag[prefix + "ok"].usage.status == STATUS_OK

    after = ray_metrics.settle()  # every replica's counters, summed as Prometheus would
    flux = {"model": FLUX_ID, "task": "text-to-image", "hardware_profile": "cpu-basic"}
    chat = {"model": LLM_ID, "task": "chat-completion", "hardware_profile": "cpu-basic"}
    assert (
        after.total("ray_hfi_requests_total", **flux, status="400")
        == before.total("ray_hfi_requests_total", **flux, status="400") + 1
    )
    assert (
        after.total("ray_hfi_requests_total", **chat, status="499")
        >= before.total("ray_hfi_requests_total", **chat, status="499") + 1
    )
    assert after.total("ray_hfi_charges_total", **chat, status=STATUS_CLIENT_DISCONNECTED) >= 1


def behind_haproxy() -> bool:
    """Whether the service takes HTTP through Serve's HAProxy ingress (set by serving.local before Ray started)."""
    import os

    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def test_a_client_that_leaves_an_image_request_is_charged_for_what_ran(hfi_service, ledger) -> None:
    """A non-streamed image whose client leaves mid-run is charged, once, for the compute it used.

    Behind Serve's Python proxy the replica learns that the client left: the charge is flagged
    client_disconnected and the runner stops at its next step (a 50-step run is abandoned within seconds, and the
    next image does not wait for it). Behind HAProxy a request forwarded to the replica is stopped the same way
    (HAProxy closes the replica's connection; see test_fault_suite's request left on its own route), but one has
    also been seen to run to its end, charged in full as `ok` (right after start-up; cause not pinned down), and
    HAProxy drops a request whose client left before it was forwarded (then nothing ran). So behind HAProxy a
    short run is used and each of those outcomes is accepted: charged once for what ran, or not at all if nothing
    ran, never free.
    """
    prefix = tag_prefix("leave-image")
    steps = 3 if behind_haproxy() else 50
    slow = {"inputs": "a cat", "parameters": {"width": 256, "height": 256, "num_inference_steps": steps}}
    with httpx.Client(base_url=hfi_service.url, timeout=HTTP_TIMEOUT_S) as c:
        c.post(FLUX, json={"inputs": "warm"}, headers={"x-request-id": prefix + "warm"})  # a loaded replica
    with pytest.raises(httpx.ReadTimeout):  # leave mid-run (1.5 s a step here)
        httpx.post(hfi_service.url + FLUX, json=slow, headers={"x-request-id": prefix + "left"}, timeout=1.0)
    with httpx.Client(base_url=hfi_service.url, timeout=HTTP_TIMEOUT_S) as c:
        started = time.monotonic()
        after = c.post(FLUX, json={"inputs": "next"}, headers={"x-request-id": prefix + "next"})
        waited_s = time.monotonic() - started
    assert after.status_code == 200, after.text
    if behind_haproxy():
        # HAProxy may drop a request whose client left before a replica took it (then nothing ran and nothing is
        # charged), or forward it, and then the run goes to its end and is charged in full: once either way.
        rows = ledger.wait_for_tags(prefix, 3)  # all three, or (left dropped unforwarded) two at the time-out
        tags = sorted(r.usage.client_request_id for r in rows)
        assert tags in (
            sorted(prefix + t for t in ("warm", "next")),
            sorted(prefix + t for t in ("warm", "left", "next")),
        )
        assert all(r.usage.compute_ns > 0 and r.cost_nanousd > 0 for r in rows)
        assert all(r.usage.status in ("ok", STATUS_CLIENT_DISCONNECTED) for r in rows)
        return
    rows = ledger.wait_for_tags(prefix, 3)
    left = next(r for r in rows if r.usage.client_request_id == prefix + "left")
    assert left.usage.compute_ns > 0 and left.cost_nanousd > 0
    assert left.usage.status == STATUS_CLIENT_DISCONNECTED
    # The abandoned run stopped within a step or two of the client leaving: its billed compute is a few
    # seconds, nowhere near the minute-plus of the whole run, and the next request did not wait for it.
    assert left.usage.compute_ns < 30 * 10**9, left.usage.compute_ns
    assert waited_s < 30, waited_s


def test_billing_endpoint_answers_the_ledger_costs_of_real_inference_ids(hfi_service, mixed_run) -> None:
    _, sent, rows = mixed_run
    ledger_cost = {r.request_id: r.cost_nanousd for r in rows}
    ids = [s.inference_id for s in sent]
    unknown = [str(uuid.uuid4()), str(uuid.uuid4())]
    asked = [unknown[0], *ids, ids[0], unknown[1]]  # unknown ids, a duplicate
    auth = {"authorization": f"Bearer {hfi_service.provider_secret}"}
    r = httpx.post(
        hfi_service.url + "/billing/requests", json={"requestIds": asked}, headers=auth, timeout=30
    )
    assert r.status_code == 200, r.text
    answered = r.json()["requests"]
    assert [a["requestId"] for a in answered] == ids  # in the order asked, each once, unknown ids left out
    for a in answered:
        assert type(a["costNanoUsd"]) is int and a["costNanoUsd"] == ledger_cost[a["requestId"]]
    assert sum(a["costNanoUsd"] for a in answered) == sum(ledger_cost.values())
    for headers in ({"authorization": "Bearer wrong-secret"}, {}):
        denied = httpx.post(hfi_service.url + "/billing/requests", json={"requestIds": ids}, headers=headers)
        assert denied.status_code == 401, denied.text
        assert "costNanoUsd" not in denied.text


def test_metrics_expose_requests_latency_compute_and_cost_by_model_task_profile(
    hfi_service, mixed_run, ray_metrics
) -> None:
    """As Prometheus sees them in a cluster: through Ray's metrics agent, summed over every replica (the mixed
    run's requests were counted by the models' own replicas and by the router)."""
    _, _sent, rows = mixed_run
    snap = ray_metrics.settle()
    for (model, task), group in _groups(rows).items():
        labels = {"model": model, "task": task, "hardware_profile": "cpu-basic"}
        assert snap.total("ray_hfi_requests_total", **labels, status="200") >= len(group)
        assert snap.total("ray_hfi_request_duration_seconds_count", **labels) >= len(group)
        assert snap.total("ray_hfi_request_duration_seconds_bucket", **labels, le="+Inf") >= len(group)
        assert snap.total("ray_hfi_compute_duration_seconds_count", **labels) >= 1
        assert snap.total("ray_hfi_queue_duration_seconds_count", **labels) >= 1
        billed_s = sum(r.usage.compute_ns for r in group) / 1e9
        assert snap.total("ray_hfi_billed_compute_seconds_total", **labels) >= billed_s - 1e-6
        cost = sum(r.cost_nanousd for r in group) / 1e9
        assert snap.total("ray_hfi_cost_usd_total", **labels) >= cost - 1e-12
        assert snap.total("ray_hfi_charges_total", **labels, status="ok") >= len(group)


def _groups(rows: list[Charge]) -> dict[tuple[str, str], list[Charge]]:
    groups: dict[tuple[str, str], list[Charge]] = defaultdict(list)
    for r in rows:
        groups[(r.usage.model_id, r.usage.task)].append(r)
    return groups


def test_usage_report_totals_equal_the_sum_of_the_charges(hfi_service, mixed_run, ledger) -> None:
    """The usage API's month (GET /billing/usage; GET /usage redirects there) against the ledger: its totals are
    the sums of the month's charges, its CSV ends with that total, and it lists exactly those charges."""
    _, _sent, rows = mixed_run
    for month in sorted({r.usage.started_at_utc.strftime("%Y-%m") for r in rows}):
        start, end = month_bounds(month)
        mine = sa.and_(
            charges_table.c.billed_account == "local",  # open mode: every charge is the local account's
            charges_table.c.started_at >= start,
            charges_table.c.started_at < end,
        )
        for _ in range(20):  # a charge of an earlier test may still be draining: read while the ledger holds
            window = ledger._select(mine)  # what the report must sum: ours, and all else charged that month
            report, listed, table = _usage_month(hfi_service.url, month)
            if {c.request_id for c in ledger._select(mine)} == {c.request_id for c in window}:
                break
        assert {r.request_id for r in rows if r.usage.started_at_utc.strftime("%Y-%m") == month} <= {
            c.request_id for c in window
        }
        total = sum(c.cost_nanousd for c in window)
        assert report["account"] == "local" and report["requests"] == len(window)
        assert report["total_nanousd"] == total and report["total_usd"] == usd_str(total)
        for part in ("by_model", "by_hardware_profile", "by_day"):
            assert sum(row["cost_nanousd"] for row in report[part]) == total, part
        assert table[-1]["request_id"] == "TOTAL"
        assert table[-1]["cost_usd"] == report["total_usd"] and len(table) - 1 == len(window)
        assert listed == {c.request_id: c.cost_nanousd for c in window}
    moved = httpx.get(hfi_service.url + "/usage", params={"month": month}, timeout=30)
    assert moved.status_code == 308 and moved.headers["location"] == f"billing/usage?month={month}"


def _usage_month(url: str, month: str) -> tuple[dict, dict[str, int], list[dict[str, str]]]:
    """The usage API's report of `month` (first page), all its charges (page after page), and its CSV."""
    params: dict[str, Any] = {"month": month, "limit": MAX_CHARGES_LIMIT}
    r = httpx.get(url + "/billing/usage", params={**params, "format": "json"}, timeout=30)
    assert r.status_code == 200, r.text
    report = page = r.json()
    listed = {c["request_id"]: c["cost_nanousd"] for c in page["charges"]}
    while page["next_cursor"]:
        page = httpx.get(
            url + "/billing/usage", params={**params, "cursor": page["next_cursor"]}, timeout=30
        ).json()
        listed.update({c["request_id"]: c["cost_nanousd"] for c in page["charges"]})
    r = httpx.get(url + "/billing/usage", params={**params, "format": "csv"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    return report, listed, list(csv.DictReader(io.StringIO(r.text)))


def test_usage_events_file_has_one_cloudevent_per_charge(hfi_service, mixed_run) -> None:
    _, _sent, rows = mixed_run
    wanted = {r.request_id: r for r in rows}
    deadline = time.monotonic() + LEDGER_WAIT_S
    while True:  # the file sink drains on its own thread
        events = [
            json.loads(line) for line in hfi_service.events_file.read_text().splitlines() if line.strip()
        ]
        ours = [e for e in events if e["id"] in wanted]
        if len({e["id"] for e in ours}) == len(wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert Counter(e["id"] for e in ours) == Counter(list(wanted)), (
        "one event per charge, keyed by its Inference-Id"
    )
    for e in ours:
        charge = wanted[e["id"]]
        assert e["specversion"] == "1.0" and e["type"] == "inference.usage" and e["source"]
        assert e["subject"] == charge.usage.billed_account
        assert e["data"]["request_id"] == e["id"] == charge.request_id
        assert e["data"]["cost_nanousd"] == charge.cost_nanousd
        assert e["data"]["compute_ms"] == charge.compute_ms
