"""The billing database: sessions, and its migrations run lazily (the engine and the runner are core's)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from billing.schema import MIGRATIONS
from core.db import WRITE_OPTION
from core.migrations import upgrade


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A short read transaction."""
    with engine.connect() as conn, Session(bind=conn) as session, session.begin():
        yield session


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A write transaction, committed on success, rolled back on error."""
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE (core.db)
        with Session(bind=conn) as session, session.begin():
            yield session


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
                upgrade(self.engine, MIGRATIONS)
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
