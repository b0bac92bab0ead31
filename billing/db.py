"""The billing database: engine set-up (SQLite or PostgreSQL) and migrations to the latest revision."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from billing.schema import VERSION_TABLE

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant: serialises concurrent migrations of several ingress replicas on PostgreSQL.
_PG_MIGRATION_LOCK = 0x6266_6962_696C


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


def as_utc(value: dt.datetime) -> dt.datetime:
    """A datetime read back from the database (SQLite drops the zone) or given by a caller, in aware UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def normalize_url(database_url: str) -> str:
    """Expand `~` in a SQLite path and create its directory; other URLs pass through."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = Path(url.database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return url.set(database=str(path)).render_as_string(hide_password=False)
    return database_url


def make_engine(database_url: str) -> Engine:
    """An engine whose write transactions serialise per account on both SQLite and PostgreSQL."""
    url = make_url(normalize_url(database_url))
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    kwargs: dict = {"connect_args": {"timeout": 60, "check_same_thread": False}}
    if not url.database or url.database == ":memory:":
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # A write transaction takes the write lock up front: a deferred one that reads first can fail with
        # "database is locked" when it upgrades while another writer holds the lock.
        if conn.get_execution_options().get("billing_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A short read transaction."""
    with engine.connect() as conn, Session(bind=conn) as session, session.begin():
        yield session


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A write transaction, committed on success, rolled back on error."""
    with engine.connect() as conn:
        conn.execution_options(billing_write=True)
        with Session(bind=conn) as session, session.begin():
            yield session


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring billing's tables to `revision` with Alembic (its own version table), under a lock."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.connect() as conn:
        conn.execution_options(billing_write=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    """Billing's applied revision, or None before the first migration."""
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()
