"""The billing database: engine set-up (SQLite or PostgreSQL) and migrations to the latest revision."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from billing.schema import VERSION_TABLE

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant: serialises concurrent migrations of several ingress replicas on PostgreSQL.
_PG_MIGRATION_LOCK = 0x6266_6962_696C
# A PostgreSQL host that drops packets would otherwise hold a connect (and the request waiting on it) for the
# operating system's TCP timeout, minutes; a `connect_timeout` in the URL wins.
PG_CONNECT_TIMEOUT_S = 10


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
        connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        return create_engine(
            url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args
        )
    kwargs: dict = {"connect_args": {"timeout": 60, "check_same_thread": False}}
    memory = not url.database or url.database == ":memory:"
    if memory:
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        if not memory:
            # The ledger's mode (metering sets it too): readers never block the writers. Set by the first
            # connection, before billing's background writer runs: switching a file to WAL needs it to itself,
            # and fails at once beside a writer, where asking for WAL when it is on already costs nothing.
            cur.execute("PRAGMA journal_mode=WAL")
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

    # Alembic's `context` is process-global: never migrate while metering migrates in its drain thread. The
    # lock is taken once connected, so a database that does not answer never holds it.
    from metering.ledger import _MIGRATE_LOCK as alembic_lock

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.connect() as conn, alembic_lock:
        conn.execution_options(billing_write=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)


class DatabaseDown(Exception):
    """The database could not be reached to migrate; `retry_after_s`: when the next attempt will be made."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the database cannot be reached; next attempt in {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class LazyMigrations:
    """Billing's migrations, run once by the first operation that needs the tables (not at construction).

    Thread-safe: concurrent callers wait for the one that migrates. After a failure to reach the database the
    next attempt is made no sooner than a back-off (doubling from `backoff_initial_s` up to `backoff_max_s`);
    calls before then raise DatabaseDown at once, without touching the database, so an outage is not hammered
    by every request. Once migrated, `ensure()` is one attribute read.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 5.0,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._clock_s = clock_s
        self._lock = threading.Lock()
        self._done = False
        self._backoff_s = backoff_initial_s
        self._next_attempt_s = 0.0

    @property
    def done(self) -> bool:
        """Whether the migrations have run in this process."""
        return self._done

    def ensure(self) -> None:
        """Run the migrations unless done; DatabaseDown when the database cannot be reached (or is backing off)."""
        if self._done:
            return
        with self._lock:
            if self._done:
                return
            wait_s = self._next_attempt_s - self._clock_s()
            if wait_s > 0:
                raise DatabaseDown(wait_s)
            try:
                upgrade(self.engine)
            except OperationalError as err:
                wait_s = self._backoff_s
                self._next_attempt_s = self._clock_s() + wait_s
                self._backoff_s = min(self._backoff_s * 2, self.backoff_max_s)
                raise DatabaseDown(wait_s) from err
            self._done = True
            self._backoff_s = self.backoff_initial_s


def ping(engine: Engine) -> None:
    """One round trip to the database (`SELECT 1`); raises what the driver raises when it cannot."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


def current_revision(engine: Engine) -> str | None:
    """Billing's applied revision, or None before the first migration."""
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()
