"""The plumbing every layer shares, and nothing else.

- `core.db`: the SQLAlchemy engine factory for the one database (SQLite or PostgreSQL), pools sized per role.
- `core.migrations`: the Alembic runner for every schema in that database (metering's, billing's).
- `core.settings`: the settings loader (HFI_CONFIG, then the environment, then arguments) that the service and
  every `hfi` command use (secrets come from the environment or a mounted file only).
- `core.money`, `core.utc`: nano-USD and UTC helpers.
- `core.timing`: what a replica measures (Timings, Stopwatch, split_batch_ns).
- `core.errors`: ServiceError, the typed error a client is told about.

It imports none of serving, models, metering, billing or bench: they import it (tests/unit/test_layering.py).
"""
