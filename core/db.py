"""The engine factory for the one database (SQLite or PostgreSQL) that metering's ledger and billing share.

Each part of the service opens its own engine on that database with `make_engine(url, role)`. The role sizes
the PostgreSQL pool for what that part does, and says how it uses SQLite:

- `LEDGER`, metering's ledger: the spool drain's one writer thread, usage reports and cost look-ups, the
  `hfi usage` and `hfi metering` commands, bench's reconciliation. PostgreSQL: 2 connections kept, 4 more under
  load, the driver's connect timeout. SQLite: a statement waits 30 s for another writer; the driver begins
  the transactions.
- `BILLING`, billing: admission's look-ups on cache misses, the settlement writer, housekeeping, the admin and
  usage API under concurrent requests, the `hfi accounts` commands. PostgreSQL: 10 kept, 20 more under load,
  a 10 s connect timeout. SQLite: a statement waits 60 s; we begin the transactions (IMMEDIATE for writes).

A pool opens connections only when they are asked for: a command that runs one query holds one, whatever its
role. "Kept" connections stay open between uses; the others are opened under load and closed after.

Every engine: `pool_pre_ping` on PostgreSQL (a connection the server dropped is replaced, not handed out), and a
`connect_timeout` in the URL wins over the role's. On SQLite: `~` expanded in the path and its directory
created, WAL (readers never block the writer), foreign keys enforced, and an in-memory database is one
connection that every thread shares.

"We begin the transactions": SQLAlchemy issues BEGIN itself, and BEGIN IMMEDIATE on a connection whose
execution options carry `WRITE_OPTION`, so that a read-modify-write transaction takes the write lock up front
instead of failing with "database is locked" when it upgrades while another writer holds the lock (billing
serialises its per-account writes so). "The driver begins": Python's sqlite3 begins a transaction before the
first write (the ledger's write transactions start with their write).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

# A write transaction: conn.execution_options(**{WRITE_OPTION: True}) (see the module docstring).
WRITE_OPTION = "write_transaction"


@dataclass(frozen=True)
class EngineRole:
    """How one part of the service uses the database (see the module docstring)."""

    name: str
    pool_size: int  # PostgreSQL: connections kept open
    max_overflow: int  # PostgreSQL: more, opened under load and closed after
    # PostgreSQL: seconds to wait for a connection unless the URL sets `connect_timeout` (None: the driver's, which
    # is the operating system's TCP timeout, minutes, on a host that drops packets).
    connect_timeout_s: int | None
    sqlite_busy_timeout_s: int  # SQLite: how long a statement waits for another process's lock
    sqlite_explicit_begin: bool  # SQLite: we issue BEGIN (IMMEDIATE for WRITE_OPTION); else the driver does


LEDGER = EngineRole(
    "ledger",
    pool_size=2,
    max_overflow=4,
    connect_timeout_s=None,
    sqlite_busy_timeout_s=30,
    sqlite_explicit_begin=False,
)
BILLING = EngineRole(
    "billing",
    pool_size=10,
    max_overflow=20,
    connect_timeout_s=10,
    sqlite_busy_timeout_s=60,
    sqlite_explicit_begin=True,
)

_SQLITE_HOME = re.compile(r"^(sqlite(?:\+\w+)?:///)(~.*)$")


def expand_sqlite_url(url: str) -> str:
    """Expand `~` in the file path of a SQLite URL; other URLs are returned unchanged."""
    m = _SQLITE_HOME.match(url)
    return url if m is None else m.group(1) + str(Path(m.group(2)).expanduser())


def make_engine(database_url: str, role: EngineRole) -> Engine:
    """An engine on `database_url` for `role` (see the module docstring)."""
    url = make_url(expand_sqlite_url(database_url))
    if url.get_backend_name() != "sqlite":
        kwargs: dict[str, Any] = {}
        if role.connect_timeout_s is not None and "connect_timeout" not in url.query:
            kwargs["connect_args"] = {"connect_timeout": role.connect_timeout_s}
        return create_engine(
            url, pool_pre_ping=True, pool_size=role.pool_size, max_overflow=role.max_overflow, **kwargs
        )
    memory = not url.database or url.database == ":memory:"
    sqlite_kwargs: dict[str, Any] = {
        "connect_args": {"timeout": role.sqlite_busy_timeout_s, "check_same_thread": False}
    }
    if memory:
        sqlite_kwargs["poolclass"] = StaticPool
    else:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    engine = create_engine(url, **sqlite_kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        if role.sqlite_explicit_begin:
            dbapi_conn.isolation_level = None  # the "begin" hook below issues BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={role.sqlite_busy_timeout_s * 1000}")
        if not memory:
            # Readers never block the writer. Set by the first connection, before any background writer runs:
            # switching a file to WAL needs it to itself and fails at once beside a writer, where asking for WAL
            # when it is on already costs nothing.
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    if role.sqlite_explicit_begin:

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            if conn.get_execution_options().get(WRITE_OPTION):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql("BEGIN")

    return engine
