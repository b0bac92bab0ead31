"""The HTTP collector sink against a real local collector on 127.0.0.1 that fails the first attempts, or refuses
some events (those are dead-lettered)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hardware_profiles import load_profiles
from metering import metrics
from metering.config import MeteringSettings
from metering.drain import read_dead_letter_files
from metering.events import CLOUDEVENTS_BATCH_CONTENT_TYPE, HttpCollectorSink, PermanentDeliveryError
from metering.records import UsageRecord
from metering.service import MeteringService
from metering.spool import encode_line

CATALOG = load_profiles()


class Collector:
    """An OpenMeter-shaped ingest endpoint that deduplicates by event id and counts what it saw."""

    def __init__(self, fail_before_store: int = 0, fail_after_store: int = 0, status: int = 503) -> None:
        self.fail_before_store = fail_before_store  # answered `status` without storing (collector down)
        self.fail_after_store = fail_after_store  # stored, then 500 (the answer was lost: the client retries)
        self.status = status
        self.ids: set[str] = set()
        self.order: list[str] = []
        self.duplicates = 0
        self.attempts = 0
        self.content_types: set[str] = set()
        self.auth: set[str | None] = set()
        self.attempt_ids: list[list[str]] = []  # the ids of every POST, answered or not
        self.refuse_subjects: set[str] = set()  # a batch with an event of such a subject: 400, nothing stored
        self.lock = threading.Lock()

    def handle(self, handler: BaseHTTPRequestHandler) -> int:
        body = handler.rfile.read(int(handler.headers["Content-Length"]))
        with self.lock:
            self.attempts += 1
            self.content_types.add(handler.headers["Content-Type"])
            self.auth.add(handler.headers.get("Authorization"))
            self.attempt_ids.append([e["id"] for e in json.loads(body)])
            if any(e["subject"] in self.refuse_subjects for e in json.loads(body)):
                return 400
            if self.fail_before_store > 0:
                self.fail_before_store -= 1
                return self.status
            for event in json.loads(body):
                assert event["specversion"] == "1.0" and event["type"] == "inference.usage"
                if event["id"] in self.ids:
                    self.duplicates += 1
                else:
                    self.ids.add(event["id"])
                    self.order.append(event["id"])
            if self.fail_after_store > 0:
                self.fail_after_store -= 1
                return 500
            return 204


@pytest.fixture
def collector_server() -> Iterator[tuple[Collector, str, list[Collector]]]:
    holder: list[Collector] = [Collector()]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            status = holder[0].handle(self)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/events"
    try:
        yield holder[0], url, holder
    finally:
        server.shutdown()
        server.server_close()


def usage(i: int) -> UsageRecord:
    return UsageRecord(
        str(uuid.uuid4()),
        dt.datetime.now(dt.timezone.utc),
        "org/m",
        "abc",
        "feature-extraction",
        "cpu-basic",
        2_000_000 + i,
        billed_account="acme",
    )


def make_service(tmp_path: Path, url: str) -> MeteringService:
    return MeteringService(
        MeteringSettings(
            database_url=f"sqlite:///{tmp_path}/ledger.db",
            spool_dir=str(tmp_path / "spool"),
            collector_url=url,
            collector_token="tok",
            collector_batch_size=10,
            drain_interval_s=0.02,
            retry_initial_s=0.02,
            retry_max_s=0.1,
        ),
        CATALOG,
    )


def test_collector_failing_first_attempts_gets_every_event_once(collector_server, tmp_path: Path) -> None:
    _, url, holder = collector_server
    collector = holder[0] = Collector(fail_before_store=4, fail_after_store=2)
    svc = make_service(tmp_path, url)
    try:
        charges = [svc.record(usage(i)) for i in range(57)]
        assert svc.flush(30)
    finally:
        svc.close()
    want = [c.request_id for c in charges]
    assert collector.ids == set(want)  # none lost
    assert len(collector.order) == len(want)  # none twice after deduplication by id
    assert collector.duplicates > 0  # the batches whose answer was lost came again, with the same ids
    assert collector.duplicates <= 2 * 10
    assert collector.attempts >= 4 + 2 + 6
    assert collector.content_types == {CLOUDEVENTS_BATCH_CONTENT_TYPE}
    assert collector.auth == {"Bearer tok"}


def test_events_wait_in_the_spool_while_the_collector_is_down_then_arrive(
    collector_server, tmp_path: Path
) -> None:
    _, url, holder = collector_server
    collector = holder[0] = Collector(fail_before_store=10**9)
    svc = make_service(tmp_path, url)
    try:
        charges = [svc.record(usage(i)) for i in range(15)]
        assert not svc.flush(0.3)
        assert svc.ledger.count() == 15  # the ledger does not wait for the collector
        with collector.lock:
            collector.fail_before_store = 0
        assert svc.flush(30)
    finally:
        svc.close()
    assert collector.order == [c.request_id for c in charges]
    assert collector.duplicates == 0


def test_permanent_and_transient_statuses(collector_server) -> None:
    _, url, holder = collector_server
    event = {"specversion": "1.0", "id": "e1", "type": "inference.usage", "subject": "acme"}
    sink = HttpCollectorSink(url)
    for status in (400, 413, 415, 422):  # the payload itself is bad: final
        holder[0] = Collector(fail_before_store=1, status=status)
        with pytest.raises(PermanentDeliveryError):
            sink.emit([event])
    for status in (401, 403, 404, 408, 425, 429, 500, 503):  # a token being rotated, the collector unwell
        holder[0] = Collector(fail_before_store=1, status=status)
        with pytest.raises(ConnectionError):
            sink.emit([event])
    sink.emit([event])  # the retry of the same batch
    assert holder[0].order == ["e1"]
    sink.close()
    with pytest.raises(ConnectionError):  # nothing listens on port 9
        HttpCollectorSink("http://127.0.0.1:9/", timeout_s=1).emit([event])


def dead_letter_errors() -> float:
    labels = {"stage": "events-http-dead-letter"}
    return metrics.REGISTRY.get_sample_value("hfi_metering_errors_total", labels) or 0.0


@pytest.mark.parametrize("status", [401, 403])
def test_an_auth_failure_is_retried_with_the_same_ids_until_accepted(
    collector_server, tmp_path: Path, status: int
) -> None:
    _, url, holder = collector_server
    collector = holder[0] = Collector(fail_before_store=3, status=status)  # a token rotated meanwhile
    before = dead_letter_errors()
    svc = make_service(tmp_path, url)
    try:
        charges = [svc.record(usage(i)) for i in range(8)]
        assert svc.flush(30)
    finally:
        svc.close()
    assert collector.order == [c.request_id for c in charges]  # every event delivered, in order, once
    first = collector.attempt_ids[0]
    assert all(later[: len(first)] == first for later in collector.attempt_ids[1:4])  # retried, same ids
    assert read_dead_letter_files(tmp_path / "spool") == []
    assert dead_letter_errors() == before


def test_a_400_dead_letters_the_refused_events_and_the_rest_is_delivered(
    collector_server, tmp_path: Path
) -> None:
    _, url, holder = collector_server
    collector = holder[0] = Collector()
    collector.refuse_subjects = {"poison"}
    before = dead_letter_errors()
    svc = make_service(tmp_path, url)
    try:
        charges = [
            svc.record(dataclasses.replace(usage(i), billed_account="poison") if i in (3, 14) else usage(i))
            for i in range(25)
        ]
        assert svc.flush(30)  # not blocked behind the refused events
        later = [svc.record(usage(i)) for i in range(25, 30)]
        assert svc.flush(30)
    finally:
        svc.close()
    refused = [charges[3], charges[14]]
    assert collector.ids == {c.request_id for c in charges + later} - {c.request_id for c in refused}
    letters = read_dead_letter_files(tmp_path / "spool")
    assert [d["request_id"] for d in letters] == [c.request_id for c in refused]
    assert [d["event"]["id"] for d in letters] == [c.request_id for c in refused]
    assert all(d["event"]["subject"] == "poison" and d["consumer"] == "events-http" for d in letters)
    assert all("answered 400" in d["error"] for d in letters)
    assert letters[0]["record"] == json.loads(encode_line(refused[0].spool_record()))  # as spooled
    assert letters[0]["event"]["data"] == json.loads(json.dumps(refused[0].to_dict()))  # the whole charge
    assert dead_letter_errors() == before + 2


def test_a_collector_refusing_everything_dead_letters_every_event(collector_server, tmp_path: Path) -> None:
    _, url, holder = collector_server
    holder[0] = Collector(fail_before_store=10**9, status=422)
    before = dead_letter_errors()
    svc = make_service(tmp_path, url)
    try:
        charges = [svc.record(usage(i)) for i in range(12)]
        assert svc.flush(30)
        assert svc.ledger.count() == 12  # the ledger is not concerned
    finally:
        svc.close()
    letters = read_dead_letter_files(tmp_path / "spool")
    assert sorted(d["event"]["id"] for d in letters) == sorted(c.request_id for c in charges)
    assert dead_letter_errors() == before + 12
