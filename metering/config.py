"""Metering settings: where charges go. Part of the service settings (serving/config.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class MeteringSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # SQLite by default (nothing to set up); postgresql+psycopg://... for a cluster.
    database_url: str = "sqlite:///~/.local/share/hfi/ledger.db"
    spool_dir: str = "~/.local/share/hfi/spool"
