"""The ledger's batch columns on SQLite and a real PostgreSQL: migration from the first revision, round trip,
and the audit query the batch tests use (rows of one batch add up to its compute time)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from fixtures.postgres import PostgresServer, create_database, drop_database

from core.db import LEDGER, make_engine
from core.timing import split_batch_ns
from hardware_profiles import load_profiles
from metering.ledger import (
    MIGRATIONS_DIR,
    VERSION_TABLE,
    Ledger,
    charge_to_row,
    charges_table,
)
from metering.pricing import price_in_catalog
from metering.records import Charge, UsageRecord

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CATALOG = load_profiles()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = create_database(server.url)
    yield url
    drop_database(url)


def alembic_config(connection: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


def charge(i: int, **kw) -> Charge:
    values = dict(
        request_id=str(uuid.UUID(int=i + 1)),
        started_at=T0,
        model_id="sentence-transformers/all-MiniLM-L6-v2",
        revision="abc",
        task="feature-extraction",
        hardware_profile="cpu-basic",
        compute_ns=1_000_000 + i,
    )
    values.update(kw)
    return price_in_catalog(UsageRecord(**values), CATALOG)


def test_upgrade_from_the_first_revision_keeps_old_rows(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url, LEDGER)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001_metering_charges")
        old = charge(0)
        row = charge_to_row(old, dt.datetime.now(UTC))
        del row["batch_id"], row["batch_compute_ns"]  # the first revision's columns only
        with engine.begin() as conn:
            conn.execute(sa.table("metering_charges", *(sa.column(k) for k in row)).insert().values(row))
        ledger = Ledger(empty_db_url, engine=engine)
        ledger.ensure_schema()  # what a newer ingress does at start-up
        with engine.connect() as conn:
            assert (
                conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one()
                == head_revision()
            )
        columns = {c["name"] for c in sa.inspect(engine).get_columns("metering_charges")}
        assert columns == set(charges_table.c.keys())  # the migrations and the model agree
        indexes = {ix["name"] for ix in sa.inspect(engine).get_indexes("metering_charges")}
        assert "ix_metering_charges_batch_id" in indexes
        [stored] = ledger.charges()
        assert stored == old and stored.usage.batch_id is None and stored.usage.batch_compute_ns is None
    finally:
        engine.dispose()


def test_batch_shares_round_trip_and_add_up_per_batch(empty_db_url: str) -> None:
    ledger = Ledger(empty_db_url)
    try:
        batches = {"a" * 32: (12_345_679, [3, 1, 7]), "b" * 32: (999, [1] * 5)}
        expected: list[Charge] = []
        i = 0
        for batch_id, (batch_ns, weights) in batches.items():
            for share in split_batch_ns(batch_ns, weights):
                expected.append(
                    charge(
                        i,
                        compute_ns=share,
                        batch_size=len(weights),
                        batch_id=batch_id,
                        batch_compute_ns=batch_ns,
                    )
                )
                i += 1
        expected.append(charge(i))  # one that ran alone
        ledger.insert(expected)
        stored = {c.request_id: c for c in ledger.charges()}
        assert stored == {c.request_id: c for c in expected}
        t = charges_table
        audit = (
            sa.select(
                t.c.batch_id,
                sa.func.count(),
                sa.func.sum(t.c.compute_ns),
                sa.func.min(t.c.batch_compute_ns),
                sa.func.max(t.c.batch_compute_ns),
            )
            .where(t.c.batch_id.is_not(None))
            .group_by(t.c.batch_id)
        )
        with ledger.engine.connect() as conn:
            rows = {r[0]: tuple(int(v) for v in r[1:]) for r in conn.execute(audit)}
        assert rows == {
            bid: (len(weights), batch_ns, batch_ns, batch_ns) for bid, (batch_ns, weights) in batches.items()
        }
    finally:
        ledger.close()
