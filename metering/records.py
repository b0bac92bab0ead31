"""What the ingress hands to metering for each request that ran, and the charge metering makes of it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


@dataclass
class UsageRecord:
    """One request that reached compute, as measured: the input to pricing."""

    request_id: str  # the idempotency key of the charge (our Inference-Id, a UUID)
    started_at: dt.datetime  # UTC, when the ingress accepted the request: picks the price and the month
    model_id: str
    revision: str
    task: str
    hardware_profile: str
    compute_ns: int
    queue_ns: int = 0
    total_ns: int = 0
    batch_size: int = 1
    input_characters: int = 0
    input_images: int = 0
    input_audio_seconds: float = 0.0
    user: str = "local"
    billed_account: str = "local"
    status: str = "ok"  # ok | client_disconnected
    client_request_id: str | None = None  # the caller's X-Request-Id, when it sent one
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Charge:
    """A priced usage record: what the ledger stores, one per request id."""

    usage: UsageRecord
    compute_ms: int  # billed compute, whole milliseconds (what x-compute-time shows)
    price_usd_per_hour: str  # the price used, as an exact decimal string
    price_effective_from: dt.date
    cost_nanousd: int

    @property
    def request_id(self) -> str:
        return self.usage.request_id

    @property
    def compute_time_header(self) -> str:
        """x-compute-time: billed seconds, 3 decimals."""
        return f"{self.compute_ms // 1000}.{self.compute_ms % 1000:03d}"

    @property
    def cost_usd_header(self) -> str:
        """The charge in USD as an exact decimal string with 9 places."""
        return f"{self.cost_nanousd // 10**9}.{self.cost_nanousd % 10**9:09d}"
