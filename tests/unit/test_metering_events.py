"""Usage events: CloudEvents 1.0 shape, the JSON-lines sink, the in-memory fake through the service."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

from hardware_profiles import load_profiles
from metering.config import MeteringSettings
from metering.events import EventSink, HttpCollectorSink, InMemorySink, JsonLinesSink, event_of
from metering.pricing import price_in_catalog
from metering.records import UsageRecord
from metering.service import MeteringService

CATALOG = load_profiles()


def usage(i: int = 0, account: str = "acme") -> UsageRecord:
    return UsageRecord(
        str(uuid.UUID(int=i + 1)),
        dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc),
        "org/m",
        "abc",
        "feature-extraction",
        "cpu-basic",
        5_000_000 + i,
        billed_account=account,
    )


def settings(tmp_path: Path, **kw) -> MeteringSettings:
    return MeteringSettings(
        database_url=f"sqlite:///{tmp_path}/ledger.db",
        spool_dir=str(tmp_path / "spool"),
        drain_interval_s=0.02,
        retry_initial_s=0.01,
        retry_max_s=0.05,
        **kw,
    )


def test_cloudevent_fields() -> None:
    charge = price_in_catalog(usage(), CATALOG)
    event = event_of(charge, source="hfi-test")
    assert event["specversion"] == "1.0"
    assert event["id"] == charge.request_id
    assert event["source"] == "hfi-test"
    assert event["type"] == "inference.usage"
    assert event["subject"] == "acme"
    assert event["time"] == "2026-03-01T12:00:00Z"
    assert event["datacontenttype"] == "application/json"
    assert event["data"]["cost_nanousd"] == charge.cost_nanousd


def test_every_adapter_implements_the_port(tmp_path: Path) -> None:
    for sink in (
        InMemorySink(),
        JsonLinesSink(tmp_path / "e.jsonl"),
        HttpCollectorSink("http://127.0.0.1:9/"),
    ):
        assert isinstance(sink, EventSink)


def test_json_lines_sink_appends_one_event_a_line(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    sink = JsonLinesSink(path)
    events = [event_of(price_in_catalog(usage(i), CATALOG), source="s") for i in range(3)]
    sink.emit(events[:2])
    sink.emit(events[2:])
    assert [json.loads(line) for line in path.read_text().splitlines()] == events


def test_service_streams_each_charge_once_to_a_flaky_sink_and_to_the_file(tmp_path: Path) -> None:
    sink = InMemorySink(fail_next=3)
    events_file = tmp_path / "events.jsonl"
    svc = MeteringService(
        settings(tmp_path, events_file=str(events_file), events_source="test-deploy"),
        CATALOG,
        sinks={"mem": sink},
    )
    try:
        charges = [svc.record(usage(i)) for i in range(25)]
        assert svc.flush(10)
    finally:
        svc.close()
    want = [c.request_id for c in charges]
    assert sink.ids == want  # in order, each once, despite three failed attempts
    assert sink.attempts >= 4
    file_ids = [json.loads(line)["id"] for line in events_file.read_text().splitlines()]
    assert file_ids == want
    assert {e["source"] for e in sink.events} == {"test-deploy"}
