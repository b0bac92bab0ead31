"""What the ingress hands to metering for each request that ran, and the charge metering makes of it.

Both are plain dataclasses (picklable, JSON round-trippable): the charge is what the spool, the ledger, the
usage events and the response headers all carry. Money is an integer number of nano-USD; nothing here is a
binary float except the audio length, which is a measurement and not money.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any

from core.money import usd_str
from core.utc import as_utc
from metering.errors import InvalidUsage

NS_PER_SECOND = 10**9

STATUS_OK = "ok"
STATUS_CLIENT_DISCONNECTED = "client_disconnected"
STATUS_DEADLINE_EXCEEDED = (
    "deadline_exceeded"  # stopped at the model's compute limit (504): what ran is charged
)
STATUSES = (STATUS_OK, STATUS_CLIENT_DISCONNECTED, STATUS_DEADLINE_EXCEEDED)


@dataclass
class UsageRecord:
    """One request that reached compute, as measured: the input to pricing.

    Times are integer nanoseconds on a monotonic clock. `compute_ns` is the billed phase (for a batched
    request, its share of the batch, see `core.timing.split_batch_ns`); `queue_ns` and `total_ns` are
    recorded for transparency and are never billed.
    """

    request_id: str  # the idempotency key of the charge (our Inference-Id, a UUID)
    started_at: dt.datetime  # when the ingress accepted the request (UTC): picks the price and the day
    model_id: str
    revision: str
    task: str
    hardware_profile: str
    compute_ns: int
    queue_ns: int = 0
    total_ns: int = 0
    batch_size: int = 1
    batch_id: str | None = None  # the batch this request ran in (None: it ran alone)
    batch_compute_ns: int | None = None  # the whole batch's compute time, of which compute_ns is a share
    batch_offset_ns: int = 0  # where this share starts in the batch's time (the shares before it, summed)
    input_characters: int = 0
    input_images: int = 0
    input_audio_seconds: float = 0.0
    user: str = "local"
    billed_account: str = "local"
    status: str = STATUS_OK  # ok | client_disconnected (a 5xx is never charged: do not record it)
    client_request_id: str | None = None  # the caller's X-Request-Id, when it sent one
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable details (tokens, steps, ...)

    def validate(self) -> None:
        """Raise InvalidUsage when the record cannot be priced (a bug in the caller, never a client error)."""
        if not self.request_id or len(self.request_id) > 128:
            raise InvalidUsage("request_id must be 1..128 characters")
        if not isinstance(self.started_at, dt.datetime):
            raise InvalidUsage("started_at must be a datetime")
        for name in (
            "compute_ns",
            "queue_ns",
            "total_ns",
            "batch_offset_ns",
            "input_characters",
            "input_images",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidUsage(f"{name} must be a non-negative integer, got {value!r}")
        if self.batch_size < 1:
            raise InvalidUsage("batch_size must be at least 1")
        if self.batch_id is not None and not 1 <= len(self.batch_id) <= 64:
            raise InvalidUsage("batch_id must be 1..64 characters")
        if self.batch_compute_ns is not None:
            bc = self.batch_compute_ns
            if not isinstance(bc, int) or isinstance(bc, bool) or bc < self.batch_offset_ns + self.compute_ns:
                raise InvalidUsage(
                    f"batch_compute_ns must be an integer >= batch_offset_ns + compute_ns, got {bc!r}"
                )
        elif self.batch_offset_ns:
            raise InvalidUsage("batch_offset_ns needs batch_compute_ns")
        if self.input_audio_seconds < 0:
            raise InvalidUsage("input_audio_seconds cannot be negative")
        if self.status not in STATUSES:
            raise InvalidUsage(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def started_at_utc(self) -> dt.datetime:
        """`started_at` as an aware UTC datetime (a naive one is taken to be UTC already)."""
        return as_utc(self.started_at)


def seconds_str(ns: int, places: int = 9) -> str:
    """Nanoseconds as an exact decimal string of seconds with `places` decimals (truncated)."""
    scaled = ns // 10 ** (9 - places)
    whole, frac = divmod(scaled, 10**places)
    return f"{whole}.{frac:0{places}d}" if places else str(whole)


_USAGE_FIELDS = fields(UsageRecord)
_USAGE_NAMES = frozenset(f.name for f in _USAGE_FIELDS)


@dataclass(frozen=True)
class Charge:
    """A priced usage record: what the ledger stores, one per request id."""

    usage: UsageRecord
    compute_ms: int  # compute in whole milliseconds, half-up: display only (x-compute-time); billed from ns
    price_usd_per_hour: str  # the price used, as an exact decimal string
    price_effective_from: dt.date  # the price point used (the profile's price in force at started_at)
    cost_nanousd: int  # the charge: integer nano-USD (10^-9 USD)

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
        return usd_str(self.cost_nanousd)

    @property
    def cost_usd(self) -> Decimal:
        """The charge in USD, exact."""
        return Decimal(self.cost_nanousd).scaleb(-9)

    @property
    def compute_seconds(self) -> Decimal:
        """Billed compute seconds, exact (from the nanoseconds)."""
        return Decimal(self.usage.compute_ns).scaleb(-9)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready dict: every usage field, the price used and the cost (spool, events)."""
        # A shallow copy (dataclasses.asdict deep-copies every field: a third of record()'s CPU); `extra` is the
        # only mutable field and is copied on its own.
        data = {f.name: getattr(self.usage, f.name) for f in _USAGE_FIELDS}
        data["extra"] = dict(self.usage.extra)
        data["started_at"] = self.usage.started_at_utc.isoformat().replace("+00:00", "Z")
        data.update(
            compute_ms=self.compute_ms,
            compute_seconds=self.compute_time_header,
            queue_seconds=seconds_str(self.usage.queue_ns, 6),
            total_seconds=seconds_str(self.usage.total_ns, 6),
            price_usd_per_hour=self.price_usd_per_hour,
            price_effective_from=self.price_effective_from.isoformat(),
            cost_nanousd=self.cost_nanousd,
            cost_usd=self.cost_usd_header,
        )
        return data

    def spool_record(self) -> dict[str, Any]:
        """What the spool keeps of this charge: every usage field, the price used and the cost, without the fields
        `to_dict` derives from them (`with_derived` adds those back where they are read: the usage events).

        The serving replica's half of a charge's CPU, on every request's path: the usage's own dict (not a copy of
        each field; the spool encodes it at once), its datetime and date left for the encoder (orjson writes them
        in C), no decimal strings."""
        data = self.usage.__dict__.copy()
        data["compute_ms"] = self.compute_ms
        data["price_usd_per_hour"] = self.price_usd_per_hour
        data["price_effective_from"] = self.price_effective_from
        data["cost_nanousd"] = self.cost_nanousd
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Charge:
        """The inverse of `to_dict` (derived fields are recomputed, not trusted)."""
        usage_data = {k: v for k, v in data.items() if k in _USAGE_NAMES}
        started = str(usage_data["started_at"]).replace("Z", "+00:00")
        usage_data["started_at"] = dt.datetime.fromisoformat(started)
        return cls(
            usage=UsageRecord(**usage_data),
            compute_ms=int(data["compute_ms"]),
            price_usd_per_hour=str(data["price_usd_per_hour"]),
            price_effective_from=dt.date.fromisoformat(str(data["price_effective_from"])),
            cost_nanousd=int(data["cost_nanousd"]),
        )


def with_derived(record: dict[str, Any]) -> dict[str, Any]:
    """A charge record in `Charge.to_dict`'s shape: a spooled one (`Charge.spool_record`) with the derived fields
    added back, normalised by `Charge.from_dict`; one that has them (an older spool's line) as it is. Raises
    KeyError, TypeError or ValueError for a record that is not a charge."""
    if not isinstance(record, dict):
        raise TypeError(f"a charge record is an object, not {type(record).__name__}")
    if "cost_usd" in record:
        return record
    return Charge.from_dict(record).to_dict()
