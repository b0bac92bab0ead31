"""Metering migration scripts, oldest first."""
