"""The core's plumbing: the engine factory's roles, one migrations runner for both schemas, the settings loader."""

from __future__ import annotations

import datetime as dt
import pickle
import sqlite3

import pytest
from sqlalchemy import event, inspect

from core.db import BILLING, LEDGER, WRITE_OPTION, expand_sqlite_url, make_engine
from core.errors import ServiceError
from core.migrations import current_revision, upgrade
from core.money import usd_str
from core.settings import SettingsError, setting, settings_data
from core.utc import as_utc, to_utc


class _Stop(Exception):
    pass


def _connect_params(engine) -> dict:
    """The parameters the engine passes to the driver's connect (caught before it connects)."""
    seen: dict = {}

    @event.listens_for(engine, "do_connect")
    def _catch(dialect, conn_rec, cargs, cparams):
        seen.update(cparams)
        raise _Stop

    with pytest.raises(_Stop):
        engine.connect()
    return seen


@pytest.mark.parametrize(
    ("role", "kept", "overflow", "timeout"), [(LEDGER, 2, 4, None), (BILLING, 10, 20, 10)]
)
def test_postgres_pools_are_sized_per_role(role, kept, overflow, timeout):
    engine = make_engine("postgresql+psycopg://hfi@db.invalid/hfi", role)
    try:
        assert (engine.pool.size(), engine.pool._max_overflow, engine.pool._pre_ping) == (
            kept,
            overflow,
            True,
        )
        assert _connect_params(engine).get("connect_timeout") == timeout
    finally:
        engine.dispose()


def test_a_connect_timeout_in_the_url_wins():
    engine = make_engine("postgresql+psycopg://hfi@db.invalid/hfi?connect_timeout=3", BILLING)
    try:
        assert _connect_params(engine)["connect_timeout"] == "3"
    finally:
        engine.dispose()


@pytest.mark.parametrize(("role", "busy_ms"), [(LEDGER, 30000), (BILLING, 60000)])
def test_sqlite_home_directory_wal_and_busy_wait(tmp_path, monkeypatch, role, busy_ms):
    monkeypatch.setenv("HOME", str(tmp_path))
    url = "sqlite:///~/deep/er/hfi.db"
    assert expand_sqlite_url(url) == f"sqlite:///{tmp_path}/deep/er/hfi.db"
    assert expand_sqlite_url("sqlite+pysqlite:///~/x.db") == f"sqlite+pysqlite:///{tmp_path}/x.db"
    assert expand_sqlite_url("postgresql://u@h/~db") == "postgresql://u@h/~db"
    engine = make_engine(url, role)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == busy_ms
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert (tmp_path / "deep" / "er" / "hfi.db").is_file()
    finally:
        engine.dispose()


def test_billing_write_transactions_take_the_sqlite_write_lock_up_front(tmp_path):
    """A write transaction holds the write lock from BEGIN: another writer cannot start one meanwhile."""
    path = tmp_path / "b.db"
    engine = make_engine(f"sqlite:///{path}", BILLING)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            conn.commit()
        other = sqlite3.connect(path, timeout=0)
        with engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                conn.exec_driver_sql("SELECT 1")  # no write yet, but the lock is taken
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
        with engine.connect() as conn, conn.begin():  # a read transaction takes no lock
            conn.exec_driver_sql("SELECT 1")
            other.execute("BEGIN IMMEDIATE")
            other.rollback()
        other.close()
    finally:
        engine.dispose()


@pytest.mark.parametrize("role", [LEDGER, BILLING], ids=lambda r: r.name)
def test_a_migration_that_dies_part_way_leaves_nothing_behind_on_sqlite(tmp_path, monkeypatch, role):
    """A migrator killed between two CREATEs (here: an error after the table, before its indexes) must not
    leave a table without the version stamp: every later start would fail on it ("already exists")."""
    from alembic.operations import Operations

    from metering.ledger import MIGRATIONS

    url = f"sqlite:///{tmp_path}/ledger.db"
    engine = make_engine(url, role)
    try:
        created = Operations.create_index

        def die(*args, **kwargs):
            raise RuntimeError("killed part-way")

        monkeypatch.setattr(Operations, "create_index", die)
        with pytest.raises(RuntimeError, match="part-way"):
            upgrade(engine, MIGRATIONS)
        assert "metering_charges" not in inspect(engine).get_table_names()
        monkeypatch.setattr(Operations, "create_index", created)
        upgrade(engine, MIGRATIONS)  # the next start migrates from scratch
        assert "metering_charges" in inspect(engine).get_table_names()
        assert current_revision(engine, MIGRATIONS) is not None
    finally:
        engine.dispose()


def test_one_runner_migrates_both_schemas_into_one_database(tmp_path):
    from billing.schema import MIGRATIONS as BILLING_MIGRATIONS
    from metering.ledger import MIGRATIONS as METERING_MIGRATIONS

    url = f"sqlite:///{tmp_path}/one.db"
    ledger, billing = make_engine(url, LEDGER), make_engine(url, BILLING)
    try:
        assert current_revision(ledger, METERING_MIGRATIONS) is None
        upgrade(ledger, METERING_MIGRATIONS)
        upgrade(billing, BILLING_MIGRATIONS)
        upgrade(ledger, METERING_MIGRATIONS)  # again: nothing to do
        tables = set(inspect(ledger).get_table_names())
        assert {
            "metering_charges",
            "metering_alembic_version",
            "billing_users",
            "billing_alembic_version",
        } <= tables
        assert "alembic_version" not in tables
        assert current_revision(ledger, METERING_MIGRATIONS) != current_revision(billing, BILLING_MIGRATIONS)
        assert current_revision(billing, BILLING_MIGRATIONS) is not None
    finally:
        ledger.dispose()
        billing.dispose()


def test_layers_file_then_environment_then_arguments(tmp_path):
    config = tmp_path / "hfi.yaml"
    config.write_text(
        "port: 1\nmetering: {spool_dir: /file/spool, database_url: sqlite:////file.db}\nbilling:\n"
    )
    env = {"HFI_CONFIG": str(config), "HFI_DATABASE_URL": "sqlite:////env.db", "HFI_BILLING_MODE": "tokens"}
    data = settings_data({"metering": {"spool_dir": "/arg/spool"}}, env=env)
    assert data.get("port") == 1
    assert data.get("metering.database_url") == "sqlite:////env.db"
    assert data.get("metering.spool_dir") == "/arg/spool"
    assert data.get("billing.mode") == "tokens"  # `billing:` left empty in the file
    assert data.from_env == {"metering.database_url", "billing.mode"}
    only = settings_data(env=env, variables=["HFI_BILLING_MODE"])
    assert only.get("metering.database_url") == "sqlite:////file.db" and only.get("billing.mode") == "tokens"
    assert settings_data(env=env, config_file=False).get("metering.spool_dir") is None


def test_one_setting_as_a_command_reads_it(tmp_path):
    config = tmp_path / "hfi.yaml"
    config.write_text("metering: {database_url: sqlite:////file.db}\n")
    env = {"HFI_CONFIG": str(config)}
    path = "metering.database_url"
    assert setting(path, "sqlite:////option.db", default="d", env=env) == "sqlite:////option.db"
    assert (
        setting(path, None, default="d", env={**env, "HFI_DATABASE_URL": "sqlite:////env.db"})
        == "sqlite:////env.db"
    )
    assert setting(path, None, default="d", env={**env, "HFI_DATABASE_URL": ""}) == "sqlite:////file.db"
    assert setting(path, None, default="d", env=env, config_file=False) == "d"


def test_the_service_refuses_secrets_in_the_file_the_commands_do_not_read_them(tmp_path):
    config = tmp_path / "hfi.yaml"
    config.write_text("billing: {admin_token: s3cret}\n")
    env = {"HFI_CONFIG": str(config)}
    with pytest.raises(SettingsError, match="HFI_ADMIN_TOKEN"):
        settings_data(env=env)
    assert settings_data(env=env, secret_files=False).get("billing.admin_token") == "s3cret"
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert settings_data(env={"HFI_ADMIN_TOKEN_FILE": str(secret)}).get("billing.admin_token") == "from-file"


def test_a_settings_file_that_is_not_a_mapping_is_named(tmp_path):
    config = tmp_path / "hfi.yaml"
    config.write_text("- a list\n")
    with pytest.raises(SettingsError, match="settings must be a mapping"):
        settings_data(env={"HFI_CONFIG": str(config)})


def test_money_and_time():
    assert usd_str(1_250_000) == "0.001250000" and usd_str(-2_000_000_001) == "-2.000000001"
    naive = dt.datetime(2026, 1, 2, 3, 4)
    assert as_utc(naive) == naive.replace(tzinfo=dt.timezone.utc)
    plus_two = dt.datetime(2026, 1, 2, 5, 4, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert as_utc(plus_two).hour == 3 and as_utc(plus_two).tzinfo is dt.timezone.utc
    assert to_utc(dt.date(2026, 1, 2)) == dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    assert to_utc(None) is None


def test_service_errors_pickle_with_their_subclass_and_fields():
    from billing.errors import PaymentRequired
    from models.errors import ModelLoading

    for err in (ModelLoading("loading", estimated_time=3.0), PaymentRequired("no credits")):
        back = pickle.loads(pickle.dumps(err))
        assert isinstance(back, ServiceError) and type(back) is type(err)
        assert (back.message, back.extra, back.status_code) == (err.message, err.extra, err.status_code)


def test_uuid7_is_a_version_7_uuid_unique_time_ordered_and_fresh_in_a_forked_child():
    import os
    import time
    import uuid

    from core.ids import uuid7

    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(2000)]  # several draws of the buffer
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    millis = [u.int >> 80 for u in ids]  # RFC 9562: the first 48 bits are the Unix time in milliseconds
    assert before <= millis[0] and millis == sorted(millis) and millis[-1] <= after
    time.sleep(0.002)
    later = uuid7()
    assert all(str(u) < str(later) for u in ids)  # as text too: the ledger's index orders the strings
    # the random bits differ within a millisecond
    assert len({u.int & ((1 << 74) - 1) for u in ids}) == len(ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child must not hand out the random bits its parent's buffer holds next
        os.write(write, uuid7().bytes)
        os._exit(0)
    os.waitpid(pid, 0)
    child = uuid.UUID(bytes=os.read(read, 16))
    os.close(read), os.close(write)
    random_bits = (1 << 62) - 1
    assert child.int & random_bits not in {u.int & random_bits for u in (uuid7() for _ in range(500))}
