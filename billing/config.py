"""Billing settings. Part of the service settings (serving/config.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class BillingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # "open": no tokens needed, everything is billed to one local account (a laptop);
    # "tokens": callers need a token issued by `hfi accounts` (or a Hugging Face token, when routed).
    mode: Literal["open", "tokens"] = "open"
    local_account: str = "local"
