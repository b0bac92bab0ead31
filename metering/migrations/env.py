"""Alembic environment of the metering tables: runs on the connection core.migrations.upgrade() passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from metering.ledger import MIGRATIONS, Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=MIGRATIONS.version_table,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:  # core.migrations.upgrade: its transaction holds the advisory lock already
    _run(connection)
else:  # the alembic command line: `alembic -x url=... upgrade head` with script_location pointing here
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    with create_engine(url).connect() as conn:
        if conn.dialect.name == "postgresql":
            # Several ingress replicas may start at once: one migrates, the others wait for it here.
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATIONS.pg_lock_key})")
        _run(conn)
        conn.commit()
