"""The ledger on SQLite and on a real PostgreSQL server (started by the fixture): same tests, both backends."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fixtures.postgres import PostgresServer, create_database, drop_database

from hardware_profiles import load_profiles
from metering.ledger import VERSION_TABLE, Ledger
from metering.pricing import price_in_catalog
from metering.records import Charge, UsageRecord

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CATALOG = load_profiles(
    extra=[
        {
            "name": "gpu-repriced",
            "prices": [
                {"effective_from": "2025-01-01", "usd_per_hour": "3.60"},
                {"effective_from": "2026-03-02", "usd_per_hour": "7.20"},
            ],
        }
    ]
)


@pytest.fixture(scope="module")
def pg_module_url(postgres_server: PostgresServer) -> Iterator[str]:
    """One database for this module (CREATE DATABASE costs ~0.3 s here); tests empty the table instead."""
    url = create_database(postgres_server.url)
    yield url
    drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nested/dir/ledger.db"
    url = request.getfixturevalue("pg_module_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        if sa.inspect(conn).has_table("metering_charges"):
            conn.execute(sa.text("TRUNCATE metering_charges"))
    engine.dispose()
    return url


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    ledger = Ledger(ledger_url)
    yield ledger
    ledger.close()


# every optional field of a charge set to something other than its default (a request near midnight UTC)
EVERY_FIELD = dict(
    queue_ns=5_000_000,
    total_ns=200_000_000,
    batch_size=2,
    batch_id="b1",
    batch_compute_ns=30_000_000,
    input_characters=12,
    input_audio_seconds=1.5,
    user="alice",
    billed_account="acme",
    status="client_disconnected",
    client_request_id="client-1",
    extra={"generated_tokens": 7},
    started_at=dt.datetime(2026, 3, 1, 23, 59, 59, 999_999, tzinfo=UTC),
)


def charge(i: int, **kw) -> Charge:
    values = dict(
        request_id=str(uuid.UUID(int=i + 1)),
        started_at=T0,
        model_id="org/m",
        revision="abc",
        task="feature-extraction",
        hardware_profile="nvidia-h100",
        compute_ns=10_000_000 * (i + 1) + 123_456,
    )
    values.update(kw)
    return price_in_catalog(UsageRecord(**values), CATALOG)


def test_migrations_use_their_own_version_table_and_are_idempotent(ledger: Ledger) -> None:
    ledger.ensure_schema()
    Ledger(ledger.database_url, engine=ledger.engine).ensure_schema()  # a second start: nothing to do
    inspector = sa.inspect(ledger.engine)
    tables = set(inspector.get_table_names())
    assert {"metering_charges", VERSION_TABLE} <= tables
    assert "alembic_version" not in tables  # billing keeps that name for its own migrations
    indexes = {ix["name"] for ix in inspector.get_indexes("metering_charges")}
    assert {"ix_metering_charges_account_day", "ix_metering_charges_started"} <= indexes
    from alembic.script import ScriptDirectory

    from metering.ledger import MIGRATIONS_DIR

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() == head


def test_a_replayed_charge_is_a_no_op(ledger: Ledger) -> None:
    first = [charge(i) for i in range(5)]
    assert len(ledger.insert(first)) == 5
    again = ledger.insert([*first, charge(5)])
    assert again == [charge(5).request_id]
    assert ledger.count() == 6


def test_the_drains_insert_writes_the_same_rows_once(ledger: Ledger) -> None:
    """insert_new (the spool drain's driver-level executemany) stores what insert does, replays included."""
    cs = [
        charge(0, **EVERY_FIELD),
        charge(1),
        charge(2, started_at=T0.astimezone(dt.timezone(dt.timedelta(hours=5)))),
    ]
    ledger.insert_new(cs[:2])
    ledger.insert_new([*cs, cs[0]])  # a replayed batch, and a duplicate within one batch
    ledger.insert_new([])
    assert ledger.count() == 3
    stored = {c.request_id: c for c in ledger.charges()}
    assert stored[cs[0].request_id] == cs[0]
    assert stored[cs[1].request_id] == cs[1]
    assert stored[cs[2].request_id].usage.started_at == T0  # stored as UTC
    assert ledger.insert([*cs, charge(3)]) == [charge(3).request_id]  # the two paths agree on what is there
    assert ledger.costs([c.request_id for c in cs]) == {c.request_id: c.cost_nanousd for c in cs}
    since = dt.datetime(2026, 3, 1, tzinfo=UTC)
    assert [(r["day"], r["requests"]) for r in ledger.grouped_usage(since, None, account="acme")] == [
        (dt.date(2026, 3, 1), 1)
    ]


def test_round_trip_keeps_every_field(ledger: Ledger) -> None:
    original = charge(1, **EVERY_FIELD)
    ledger.insert([original])
    [stored] = ledger.charges()
    assert stored == original


def test_concurrent_writers_insert_each_request_once(ledger: Ledger, ledger_url: str) -> None:
    charges = [charge(i) for i in range(60)]
    other = Ledger(ledger_url)  # a second ingress replica, its own engine
    errors: list[BaseException] = []

    def write(target: Ledger, part: list[Charge], drain: bool = False) -> None:
        try:
            for k in range(0, len(part), 7):
                (target.insert_new if drain else target.insert)(part[k : k + 7])
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [
        threading.Thread(target=write, args=(ledger, charges)),
        threading.Thread(target=write, args=(other, list(reversed(charges)), True)),
        threading.Thread(target=write, args=(other, charges[20:40], True)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert not errors
    assert ledger.count() == 60


def test_grouped_usage_totals_equal_the_charges(ledger: Ledger) -> None:
    cs = [
        charge(0, billed_account="acme"),
        charge(1, billed_account="acme"),
        charge(2, billed_account="acme", hardware_profile="cpu-basic"),
        charge(3, billed_account="acme", started_at=T0 + dt.timedelta(days=1, hours=3)),
        charge(4, billed_account="bob", model_id="org/other", task="text-to-image"),
        charge(5, billed_account="acme", started_at=T0 + dt.timedelta(days=40)),  # outside the interval
    ]
    ledger.insert(cs)
    since, until = dt.datetime(2026, 3, 1, tzinfo=UTC), dt.datetime(2026, 4, 1, tzinfo=UTC)
    rows = ledger.grouped_usage(since, until)
    got = [
        (r["day"].isoformat(), r["account"], r["model_id"], r["hardware_profile"], r["requests"])
        for r in rows
    ]
    assert got == [
        ("2026-03-01", "acme", "org/m", "cpu-basic", 1),
        ("2026-03-01", "acme", "org/m", "nvidia-h100", 2),
        ("2026-03-01", "bob", "org/other", "nvidia-h100", 1),
        ("2026-03-02", "acme", "org/m", "nvidia-h100", 1),
    ]
    assert sum(r["cost_nanousd"] for r in rows) == sum(c.cost_nanousd for c in cs[:5])
    assert sum(r["compute_ms"] for r in rows) == sum(c.compute_ms for c in cs[:5])
    acme = ledger.grouped_usage(since, until, account="acme")
    assert {r["account"] for r in acme} == {"acme"}
    raw = ledger.charges(since, until, account="acme")
    assert [c.request_id for c in raw] == [c.request_id for c in cs[:4] if c.usage.billed_account == "acme"]


def test_costs_lookup_returns_integers_for_known_ids(ledger: Ledger) -> None:
    cs = [charge(i) for i in range(3)]
    ledger.insert(cs)
    many = [str(uuid.uuid4()) for _ in range(1200)] + [cs[1].request_id]  # more ids than one IN chunk
    assert ledger.costs(many) == {cs[1].request_id: cs[1].cost_nanousd}
    assert ledger.costs([c.request_id for c in cs]) == {c.request_id: c.cost_nanousd for c in cs}


def test_price_change_old_and_new_charges_keep_their_prices(ledger: Ledger) -> None:
    old = charge(0, hardware_profile="gpu-repriced", compute_ns=10**9)
    new = charge(1, hardware_profile="gpu-repriced", compute_ns=10**9, started_at=T0 + dt.timedelta(days=1))
    ledger.insert([old, new])
    stored = {c.request_id: c for c in ledger.charges()}
    assert (stored[old.request_id].price_usd_per_hour, stored[old.request_id].cost_nanousd) == (
        "3.60",
        1_000_000,
    )
    assert (stored[new.request_id].price_usd_per_hour, stored[new.request_id].cost_nanousd) == (
        "7.20",
        2_000_000,
    )


def test_ids_that_no_charge_can_have_are_unknown_not_an_error(ledger: Ledger) -> None:
    """The cost look-up's ids come from outside: one with a NUL (PostgreSQL's text refuses it) or longer than the
    column is in no row, so it is simply not found."""
    cs = [charge(i) for i in range(2)]
    ledger.insert(cs)
    asked = ["a\x00b", "x" * 10_000, "é" * 200, cs[0].request_id, "", " "]
    assert ledger.costs(asked) == {cs[0].request_id: cs[0].cost_nanousd}
