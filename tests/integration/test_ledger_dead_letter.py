"""On a real PostgreSQL: a charge the database refuses is dead-lettered and never stops the ledger; an outage
dead-letters nothing (a refused charge spooled during it is isolated only once the database answers again)."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
from fixtures.postgres import PostgresServer

from hardware_profiles import load_profiles
from metering import metrics
from metering.config import MeteringSettings
from metering.drain import DEAD_LETTER_DIR
from metering.ledger import Ledger
from metering.records import Charge, UsageRecord
from metering.service import LEDGER, MeteringService

UTC = dt.timezone.utc
CATALOG = load_profiles()


def usage(i: int) -> UsageRecord:
    return UsageRecord(
        str(uuid.uuid4()),
        dt.datetime.now(UTC),
        "org/m",
        "abc",
        "feature-extraction",
        "nvidia-a10g",
        1_000_000 * (i + 1),
        billed_account="acme",
        client_request_id=f"client-{i}",
    )


def settings(db_url: str, spool_dir: Path) -> MeteringSettings:
    return MeteringSettings(
        database_url=db_url,
        spool_dir=str(spool_dir),
        drain_interval_s=0.02,
        drain_batch_size=5,
        retry_initial_s=0.02,
        retry_max_s=0.2,
    )


def dead_letter_errors() -> float:
    labels = {"stage": "ledger-dead-letter"}
    return metrics.REGISTRY.get_sample_value("hfi_metering_errors_total", labels) or 0.0


def spool_bad_charge(svc: MeteringService, i: int) -> tuple[Charge, dict]:
    """A good charge, then a copy of it (another request id) whose client_request_id is longer than its
    VARCHAR(256) column, written to the spool as is: the way a charge spooled by an older version, or a client
    field let through, would sit there."""
    charge = svc.record(usage(i))
    bad = {**charge.to_dict(), "request_id": str(uuid.uuid4()), "client_request_id": "x" * 300}
    svc.spool.append(bad)  # type: ignore[union-attr]
    return charge, bad


def test_a_too_long_client_request_id_is_dead_lettered_and_later_charges_flow(
    postgres_db_url: str, tmp_path: Path
) -> None:
    before = dead_letter_errors()
    svc = MeteringService(settings(postgres_db_url, tmp_path / "spool"), CATALOG)
    try:
        good: list[Charge] = [svc.record(usage(i)) for i in range(7)]
        beside, bad = spool_bad_charge(svc, 7)
        good += [beside, *(svc.record(usage(i)) for i in range(8, 16))]
        assert svc.flush(30)
        later = [svc.record(usage(i)) for i in range(16, 24)]
        assert svc.flush(30)
        stored = {c.request_id for c in svc.charges()}
        letters = svc.ledger.dead_letters()
        assert svc.cost_lookup([bad["request_id"]]) == []
    finally:
        svc.close()
    # The good charges around it, the one spooled just before it included, all reached the ledger.
    assert stored == {c.request_id for c in good + later}
    assert bad["request_id"] not in stored
    assert [(d["consumer"], d["request_id"]) for d in letters] == [(LEDGER, bad["request_id"])]
    assert letters[0]["record"] == bad  # whole, the 300 characters included
    assert "DataError" in letters[0]["error"] and "too long" in letters[0]["error"]
    assert dead_letter_errors() == before + 1
    fresh = Ledger(postgres_db_url)  # durable: another process sees it
    try:
        assert [d["request_id"] for d in fresh.dead_letters()] == [bad["request_id"]]
    finally:
        fresh.close()


def test_a_database_outage_dead_letters_nothing_and_the_batch_lands_when_it_is_back(
    postgres_server: PostgresServer, postgres_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = dead_letter_errors()
    svc = MeteringService(settings(postgres_db_url, tmp_path / "spool"), CATALOG)
    recorded: list[Charge] = []
    try:
        recorded += [svc.record(usage(i)) for i in range(5)]
        assert svc.flush(15)
        postgres_server.stop()
        try:
            recorded += [svc.record(usage(i)) for i in range(5, 15)]
            beside, bad = spool_bad_charge(svc, 15)
            recorded += [beside, *(svc.record(usage(i)) for i in range(16, 30))]
            assert not svc.flush(0.5)  # they wait in the spool
            ledger_consumer = svc.consumers[0]
            assert ledger_consumer.name == LEDGER and ledger_consumer.failures > 0
            assert ledger_consumer.dead_lettered_records == 0  # a lost connection is no refusal,
            assert "one at a time" not in caplog.text  # so the batch was retried whole, never split
        finally:
            postgres_server.start()
        assert svc.flush(30)
        stored = {c.request_id for c in svc.charges()}
        letters = svc.ledger.dead_letters()
    finally:
        svc.close()
    assert stored == {c.request_id for c in recorded}
    assert [d["request_id"] for d in letters] == [bad["request_id"]]
    assert dead_letter_errors() == before + 1
    assert not (tmp_path / "spool" / DEAD_LETTER_DIR).exists()
