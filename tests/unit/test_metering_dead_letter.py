"""Records refused for good do not stop the drain: they are isolated, dead-lettered, counted, and the rest flows.

The ledger side runs on a real SQLite ledger, refused by a trigger (SQLite enforces no VARCHAR length, so the
refusal is a real constraint failure raised by the database itself). The consumer's isolation logic is also
tested on its own with a fake delivery, and the sinks' dead-letter file through a fake sink.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sqlite3
import uuid
from pathlib import Path

import pytest
import typer
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from hardware_profiles import load_profiles
from metering import metrics
from metering.cli import register
from metering.config import MeteringSettings
from metering.drain import DEAD_LETTER_DIR, DeadLetter, SpoolConsumer, read_dead_letter_files, wait_until
from metering.events import InMemorySink, PermanentDeliveryError
from metering.ledger import Ledger, UnstorableCharge, is_data_error, safe_text
from metering.pricing import price_in_catalog
from metering.records import UsageRecord
from metering.service import LEDGER, MeteringService
from metering.spool import UNREADABLE_LINE, Spool, encode_line

UTC = dt.timezone.utc
CATALOG = load_profiles()
POISON = "poison"  # the billed account the test trigger refuses


def usage(i: int, **kw) -> UsageRecord:
    values = dict(
        request_id=str(uuid.uuid4()),
        started_at=dt.datetime(2026, 3, 1, 12, tzinfo=UTC),
        model_id="org/m",
        revision="abc",
        task="feature-extraction",
        hardware_profile="nvidia-h100",
        compute_ns=100_000_000 + i,
        billed_account="acme",
    )
    return UsageRecord(**{**values, **kw})


def errors(stage: str) -> float:
    return metrics.REGISTRY.get_sample_value("hfi_metering_errors_total", {"stage": stage}) or 0.0


def refusing_ledger(url: str) -> None:
    """Migrate the ledger at `url`, then make the database itself refuse every charge billed to POISON."""
    ledger = Ledger(url)
    ledger.ensure_schema()
    ledger.close()
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    conn.execute(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON metering_charges "
        f"WHEN NEW.billed_account = '{POISON}' BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"
    )
    conn.commit()
    conn.close()


def settings(tmp_path: Path, **kw) -> MeteringSettings:
    values = dict(
        database_url=f"sqlite:///{tmp_path}/ledger.db",
        spool_dir=str(tmp_path / "spool"),
        drain_interval_s=0.02,
        drain_batch_size=4,
        retry_initial_s=0.01,
        retry_max_s=0.05,
    )
    return MeteringSettings(**{**values, **kw})


def test_a_charge_the_database_refuses_is_dead_lettered_and_the_rest_flows(tmp_path: Path) -> None:
    s = settings(tmp_path)
    refusing_ledger(s.database_url)
    before = errors("ledger-dead-letter")
    svc = MeteringService(s, CATALOG)
    try:
        good = [svc.record(usage(i)) for i in range(6)]
        bad = svc.record(usage(6, billed_account=POISON))
        good += [svc.record(usage(i)) for i in range(7, 13)]
        assert svc.flush(15)  # not blocked behind the refused charge
        later = [svc.record(usage(i)) for i in range(13, 20)]
        assert svc.flush(15)
        stored = {c.request_id for c in svc.charges()}
        letters = svc.ledger.dead_letters()
        looked_up = svc.cost_lookup([bad.request_id, good[0].request_id])
    finally:
        svc.close()
    assert stored == {c.request_id for c in good + later}
    assert len(letters) == 1
    letter = letters[0]
    assert letter["consumer"] == LEDGER and letter["request_id"] == bad.request_id
    assert letter["record"] == json.loads(encode_line(bad.spool_record()))  # the whole record, as spooled
    assert "IntegrityError" in letter["error"] and "refused by the test trigger" in letter["error"]
    assert errors("ledger-dead-letter") == before + 1
    assert [r["requestId"] for r in looked_up] == [good[0].request_id]  # never answered from memory


def test_dead_letters_are_listed_by_the_cli(tmp_path: Path) -> None:
    s = settings(tmp_path)
    refusing_ledger(s.database_url)
    with MeteringService(s, CATALOG) as svc:
        bad = svc.record(usage(1, billed_account=POISON))
        assert svc.flush(15)
    (tmp_path / "spool" / DEAD_LETTER_DIR).mkdir()
    sink_letter = {"consumer": "events-http", "request_id": "e1", "record": {"request_id": "e1"}}
    torn = '{"consumer": "events-http", "requ'  # a crash mid-append
    (tmp_path / "spool" / DEAD_LETTER_DIR / "events-http.jsonl").write_text(
        json.dumps(sink_letter) + "\n" + torn
    )
    app = typer.Typer()
    register(app)
    args = ["metering", "dead-letters", "--database-url", s.database_url, "--spool-dir", s.spool_dir]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r.get("consumer"), r.get("request_id")) for r in rows] == [
        (LEDGER, bad.request_id),
        ("events-http", "e1"),
        (None, None),
    ]
    assert rows[2]["unreadable_line"] == torn
    assert rows[0]["record"]["billed_account"] == POISON
    only = CliRunner().invoke(app, [*args, "--consumer", "events-http"])
    assert [r["request_id"] for r in json.loads(only.output)] == ["e1"]


def test_the_same_refused_record_is_kept_once(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    record = {"request_id": "r\x00" + "x" * 300, "weird": "\ud800"}
    try:
        assert ledger.add_dead_letters(LEDGER, [(record, "E\x00rror")]) == 1
        assert ledger.add_dead_letters(LEDGER, [(record, "again")]) == 0  # a replayed batch: not twice
        assert ledger.add_dead_letters("events-http", [(record, "other consumer")]) == 1
        letters = ledger.dead_letters()
    finally:
        ledger.close()
    assert [d["consumer"] for d in letters] == [LEDGER, "events-http"]
    assert letters[0]["request_id"] == safe_text(record["request_id"])
    assert letters[0]["error"] == "E\\x00rror"
    assert letters[0]["record"] == record


def test_a_charge_with_a_value_no_column_takes_is_a_data_error(tmp_path: Path) -> None:
    charge = price_in_catalog(usage(1), CATALOG)
    odd = dataclasses.replace(charge, usage=dataclasses.replace(charge.usage, input_audio_seconds="n/a"))
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    try:
        with pytest.raises(UnstorableCharge) as info:
            ledger.insert_new([charge, odd])
        assert is_data_error(info.value)
        ledger.insert_new([charge])
        assert ledger.count() == 1
    finally:
        ledger.close()


def test_data_errors_are_told_from_failures_of_the_database(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/t.db")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (a INTEGER NOT NULL, b TEXT)")

    def failure(sql: str, params: tuple) -> BaseException:
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(sql, params)
        except Exception as err:
            return err
        raise AssertionError("no failure")

    assert is_data_error(failure("INSERT INTO t VALUES (?, ?)", (None, "x")))  # NOT NULL
    assert is_data_error(failure("INSERT INTO t VALUES (?, ?)", ({}, "x")))  # cannot bind a dict
    assert is_data_error(failure("INSERT INTO t VALUES (?, ?)", (2**70, "x")))  # too large an integer
    assert not is_data_error(failure("INSERT INTO missing VALUES (?, ?)", (1, "x")))  # no such table
    engine.dispose()
    down = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    with pytest.raises(OperationalError) as refused:
        down.connect()
    assert not is_data_error(refused.value)  # connection refused: retried, never dead-lettered
    assert not is_data_error(ConnectionError("collector down"))


# The consumer's isolation on its own, with a fake delivery.


class FlakyStore:
    """Dead-letter store that fails `fail` times (the database went down), then keeps what it is given."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.letters: list[DeadLetter] = []

    def __call__(self, letters: list[DeadLetter]) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("dead-letter store down")
        self.letters.extend(letters)


def consumer_of(
    spool: Spool, deliver, store, refused=lambda err: isinstance(err, ValueError)
) -> SpoolConsumer:
    return SpoolConsumer(
        LEDGER,
        spool,
        deliver,
        batch_size=10,
        interval_s=0.01,
        retry_initial_s=0.01,
        retry_max_s=0.02,
        refused=refused,
        dead_letter=store,
    )


def test_refused_records_are_isolated_one_by_one_and_transient_failures_keep_the_batch(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", [LEDGER])
    delivered: list[str] = []
    calls: list[int] = []
    transient = [2]  # the first two attempts fail as if the database were down

    def deliver(records: list[dict]) -> None:
        calls.append(len(records))
        if transient[0] > 0:
            transient[0] -= 1
            raise ConnectionError("database down")
        if any(r["bad"] for r in records):
            raise ValueError("refused: " + ",".join(r["id"] for r in records if r["bad"]))
        delivered.extend(r["id"] for r in records)

    store = FlakyStore(fail=1)
    for i in range(8):
        spool.append({"id": f"r{i}", "bad": i in (2, 5)})
    consumer = consumer_of(spool, deliver, store).start()
    try:
        assert wait_until(lambda: spool.pending(LEDGER) == 0, 10)
        spool.append({"id": "r8", "bad": False})  # the drain goes on past them
        assert wait_until(lambda: "r8" in delivered, 10)
    finally:
        consumer.stop()
        spool.close()
    assert calls[:2] == [8, 8]  # a transient failure retries the whole batch, never splits it
    assert sorted(set(delivered)) == [f"r{i}" for i in (0, 1, 3, 4, 6, 7, 8)]
    assert [(d.record["id"], d.error) for d in store.letters] == [
        ("r2", "ValueError: refused: r2"),
        ("r5", "ValueError: refused: r5"),
    ]
    assert consumer.dead_lettered_records == 2


def test_a_sinks_refused_events_go_to_its_dead_letter_file(tmp_path: Path) -> None:
    class PickySink(InMemorySink):
        def emit(self, events) -> None:
            if any(e["subject"] == POISON for e in events):
                raise PermanentDeliveryError("collector answered 400")
            super().emit(events)

    sink = PickySink()
    s = settings(tmp_path, collector_batch_size=5)
    before = errors("picky-dead-letter")
    with MeteringService(s, CATALOG, sinks={"picky": sink}) as svc:
        charges = [svc.record(usage(i, billed_account=POISON if i == 3 else "acme")) for i in range(9)]
        assert svc.flush(15)
    letters = read_dead_letter_files(s.spool_dir)
    assert [d["request_id"] for d in letters] == [charges[3].request_id]
    assert letters[0]["event"]["id"] == charges[3].request_id and letters[0]["event"]["subject"] == POISON
    assert letters[0]["error"] == "PermanentDeliveryError: collector answered 400"
    assert letters[0]["file"] == str(tmp_path / "spool" / DEAD_LETTER_DIR / "picky.jsonl")
    assert sorted(sink.ids) == sorted(c.request_id for i, c in enumerate(charges) if i != 3)
    assert errors("picky-dead-letter") == before + 1


def test_the_dead_letter_migration_matches_the_model(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from metering.ledger import Base

    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    ledger.ensure_schema()
    with ledger.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        columns = [r[1] for r in conn.execute(text("PRAGMA table_info(metering_dead_letters)"))]
    ledger.close()
    assert [d for d in diff if "metering_dead_letters" in repr(d)] == []
    assert columns == ["id", "request_id", "consumer", "error", "record", "dead_at"]


def test_unreadable_spooled_records_are_dead_lettered_not_blocking(tmp_path: Path) -> None:
    sink = InMemorySink()
    with MeteringService(settings(tmp_path), CATALOG, sinks={"mem": sink}) as svc:
        first = svc.record(usage(1))
        svc.spool.append({"request_id": "half", "model_id": "org/m"})  # type: ignore[union-attr]
        svc.spool.append(["not", "an", "object"])  # type: ignore[union-attr,arg-type]
        last = svc.record(usage(2))
        assert svc.flush(15)
        stored = {c.request_id for c in svc.charges()}
        in_ledger = svc.ledger.dead_letters()
    assert stored == {first.request_id, last.request_id}
    assert [d["record"] for d in in_ledger] == [
        {"request_id": "half", "model_id": "org/m"},
        ["not", "an", "object"],
    ]
    assert all(d["error"].startswith("unreadable charge: ") for d in in_ledger)
    assert sink.ids == [first.request_id, last.request_id]
    in_file = read_dead_letter_files(tmp_path / "spool")
    assert [d["record"] for d in in_file] == [
        {"request_id": "half", "model_id": "org/m"},
        ["not", "an", "object"],
    ]
    assert [d["request_id"] for d in in_file] == ["half", None]
    assert all(
        "event" not in d and d["file"] == str(tmp_path / "spool" / DEAD_LETTER_DIR / "mem.jsonl")
        for d in in_file
    )


def test_a_spool_line_that_is_not_json_is_dead_lettered_whole_by_every_consumer(tmp_path: Path) -> None:
    # A line the disk (or a hand) spoiled, in a file left by a process that is gone: never dropped silently.
    good = usage(1)
    with MeteringService(settings(tmp_path), CATALOG) as svc:
        line = encode_line(svc.record(good).spool_record())
    spool_dir = tmp_path / "spool"
    (spool_dir / "deadhost-9-abc.jsonl").write_bytes(line[:40] + b"\xff garbage\n" + line)
    sink = InMemorySink()
    with MeteringService(settings(tmp_path), CATALOG, sinks={"mem": sink}) as svc:
        assert svc.flush(15)
        assert {c.request_id for c in svc.charges()} == {good.request_id}
        in_ledger = svc.ledger.dead_letters()
    assert len(in_ledger) == 1 and in_ledger[0]["request_id"] is None
    assert in_ledger[0]["record"] == {
        UNREADABLE_LINE: line[:40].decode() + "\\xff garbage",
        "file": "deadhost-9-abc.jsonl",
        "offset": 0,
    }
    assert in_ledger[0]["error"].startswith("unreadable charge: ")
    assert sink.ids == [good.request_id]
    assert [d["record"][UNREADABLE_LINE] for d in read_dead_letter_files(spool_dir)] == [
        line[:40].decode() + "\\xff garbage"
    ]
