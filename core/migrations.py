"""One Alembic runner for every schema that lives in the database: metering's ledger and billing's tables.

Each schema keeps its own migrations (its script directory, with its env.py and versions) and its own version
table, so that each can be upgraded on its own in the one database; `Migrations` names them, and `upgrade` runs
them. It is safe to call from every process at every start:

- in a process, one migration at a time (Alembic's `context` is process-global): billing's may start on a
  request thread while metering's runs in its drain thread;
- across processes on PostgreSQL, the schema's advisory lock, taken in the migration's transaction: several
  replicas starting at once migrate one after another, and the later ones find nothing left to do;
- on SQLite, the migration is one transaction that takes the write lock up front (BEGIN IMMEDIATE, whichever
  engine role issues BEGIN): several processes migrate one after another, and a migrator killed part-way leaves
  nothing behind (SQLite's DDL is transactional). `race_attempts` > 1 still tries again after a lost race.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from core.db import WRITE_OPTION

log = logging.getLogger(__name__)

MIGRATE_LOCK = threading.Lock()  # Alembic's `context` is process-global: one migration at a time
# What a process that lost a migration race to another one sees (SQLite): it retries and finds the work done.
_RACE_MESSAGES = ("already exists", "duplicate column name", "database is locked")


@dataclass(frozen=True)
class Migrations:
    """One schema's migrations."""

    name: str  # for the log
    directory: Path  # Alembic's script location: env.py, script.py.mako, versions/
    version_table: str  # each schema its own, so that they never meet in the one database
    pg_lock_key: int  # the PostgreSQL advisory lock that serialises its migrators
    race_attempts: int = 1  # SQLite: how many times to try when another process raced us (see above)


def upgrade(engine: Engine, migrations: Migrations, revision: str = "head") -> None:
    """Bring `migrations`' tables to `revision` (idempotent). The lock is taken once connected, so a database that
    does not answer never holds it."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations.directory))
    for attempt in range(migrations.race_attempts):
        try:
            with engine.connect() as conn, MIGRATE_LOCK:
                conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": migrations.pg_lock_key})
                    elif (
                        conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction
                    ):
                        # Where the driver begins, it does so before DML only: the CREATE TABLEs would each commit
                        # on their own, and a migrator killed between them would leave tables without the version
                        # stamp, which every later start then fails on ("already exists"). One transaction, the
                        # write lock taken up front: all or nothing, and concurrent migrators wait for each other.
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, revision)
            return
        except DBAPIError as err:
            raced = any(m in str(err.orig) for m in _RACE_MESSAGES)
            if attempt == migrations.race_attempts - 1 or err.connection_invalidated or not raced:
                raise
            log.info("%s: another process is migrating its tables; trying again", migrations.name)


def current_revision(engine: Engine, migrations: Migrations) -> str | None:
    """The applied revision of `migrations`, or None before the first migration."""
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": migrations.version_table})
        return ctx.get_current_revision()
