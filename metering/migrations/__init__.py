"""Alembic migrations of the metering tables (version table: metering_alembic_version)."""
