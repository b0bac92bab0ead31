"""Alembic environment for billing's tables: run through core.migrations.upgrade with a connection given."""

from __future__ import annotations

from alembic import context

from billing.schema import VERSION_TABLE, Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # `alembic` on the command line: build one from sqlalchemy.url
    from core.db import BILLING, make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url"), BILLING)
    connection = engine.connect()


def _ours(obj, name, type_, reflected, compare_to) -> bool:
    # The database also holds metering's tables: autogenerate looks only at billing's.
    return type_ != "table" or name.startswith("billing_")


context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    include_object=_ours,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
