"""The metering facade the ingress calls: price a usage record and record the charge exactly once.

This first version prices only; the durable spool, ledger, events and metrics plug in behind `record()`.
"""

from __future__ import annotations

from hardware_profiles import ProfileCatalog
from metering.config import MeteringSettings
from metering.pricing import price
from metering.records import Charge, UsageRecord


class MeteringService:
    def __init__(self, settings: MeteringSettings, profiles: ProfileCatalog) -> None:
        self.settings = settings
        self.profiles = profiles

    def record(self, usage: UsageRecord) -> Charge:
        """Price `usage` and record the charge durably before returning it. Never raises for a valid record."""
        return price(usage, self.profiles.get(usage.hardware_profile))

    def close(self) -> None:
        pass
