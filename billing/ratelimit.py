"""Rate limits per token and per account: requests per minute and requests at once, from the caller's tier.

Plain Python (no web framework): `RateLimiter.acquire` either refuses (`RateLimited`, a 429 with the seconds to
wait and the IETF RateLimit fields) or returns a `Ticket`, released when the request ends (its concurrent slot
comes back). Requests per minute are a token bucket per key: `requests_per_minute` of burst, refilled evenly over
the minute. The state is this process's: each serving process (the router's replicas and each model's replicas)
counts its own requests, which is what bounds the work one caller can make a process do.

Fields: draft-ietf-httpapi-ratelimit-headers: `RateLimit-Policy: "token";q=60;w=60` (the quota and its window)
and `RateLimit: "token";r=59;t=1` (what remains, and the seconds until the quota is whole again).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from pydantic import BaseModel, ConfigDict, Field

from billing.errors import BillingError

WINDOW_S = 60
MAX_TRACKED_KEYS = 100_000


class RateLimitPolicy(BaseModel):
    """One quota: requests per minute and requests at once; None: no limit of that kind."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=1)
    concurrent_requests: int | None = Field(default=None, ge=1)


class TierRateLimits(BaseModel):
    """What a tier may do: per token (each of a user's tokens) and per account (all of them together)."""

    model_config = ConfigDict(extra="forbid")

    per_token: RateLimitPolicy = Field(default_factory=RateLimitPolicy)
    per_account: RateLimitPolicy = Field(default_factory=RateLimitPolicy)


def default_rate_limits() -> dict[str, TierRateLimits]:
    """Defaults by tier: the free tier, and traffic of Hugging Face tokens (`hf-routed`). Other tiers (pro, an
    admin's) and `open` (the local account of open mode: a laptop) have none until settings give them some;
    `default` applies to a tier not listed."""

    def tier(rpm: int, at_once: int, account_rpm: int, account_at_once: int) -> TierRateLimits:
        return TierRateLimits(
            per_token=RateLimitPolicy(requests_per_minute=rpm, concurrent_requests=at_once),
            per_account=RateLimitPolicy(requests_per_minute=account_rpm, concurrent_requests=account_at_once),
        )

    return {
        "free": tier(60, 4, 120, 8),
        "hf-routed": tier(600, 16, 1200, 32),
    }


class RateLimited(BillingError):
    """429: past a rate limit; `retry_after_s` and `headers` (Retry-After, RateLimit, RateLimit-Policy) say more."""

    status_code = 429
    error_type = "rate_limit"

    @property
    def retry_after_s(self) -> int:
        return int(self.extra.get("retry_after_s", 1))  # type: ignore[call-overload]

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.extra.get("headers") or {})  # type: ignore[call-overload]


@dataclass(frozen=True)
class Check:
    """One quota to check for a request: `name` (token or account), the key it counts under, the policy."""

    name: str
    key: str
    policy: RateLimitPolicy


@dataclass
class _Bucket:
    tokens: float
    updated_s: float
    in_flight: int = 0


@dataclass
class Ticket:
    """An admitted request's hold on its concurrent slots; `headers` are the RateLimit fields to answer with."""

    limiter: RateLimiter | None
    keys: list[str]
    headers: dict[str, str] = field(default_factory=dict)
    released: bool = False

    def release(self) -> None:
        """Give the concurrent slots back (idempotent)."""
        if not self.released and self.limiter is not None:
            self.released = True
            self.limiter._release(self.keys)


class RateLimiter:
    """Token buckets and in-flight counts by key, thread-safe; the least recently used keys are forgotten past
    MAX_TRACKED_KEYS (a forgotten key starts with a full bucket; its in-flight count is kept while it has any)."""

    def __init__(
        self, clock_s: Callable[[], float] = time.monotonic, max_keys: int = MAX_TRACKED_KEYS
    ) -> None:
        self.clock_s = clock_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, key: str, policy: RateLimitPolicy, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        capacity = float(policy.requests_per_minute or 0)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=capacity, updated_s=now)
        elif policy.requests_per_minute:
            rate = capacity / WINDOW_S
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated_s) * rate)
            bucket.updated_s = now
        self._buckets.move_to_end(key)
        return bucket

    def acquire(self, checks: list[Check]) -> Ticket:
        """Count one request against every check, or refuse it (RateLimited) and count it against none."""
        checks = [c for c in checks if c.policy.requests_per_minute or c.policy.concurrent_requests]
        if not checks:
            return Ticket(None, [])
        with self._lock:
            now = self.clock_s()
            buckets = [(c, self._bucket(c.key, c.policy, now)) for c in checks]
            refusals: list[tuple[float, str]] = []
            for check, bucket in buckets:
                rpm, at_once = check.policy.requests_per_minute, check.policy.concurrent_requests
                if rpm and bucket.tokens < 1:
                    wait = (1 - bucket.tokens) / (rpm / WINDOW_S)
                    refusals.append((wait, f"{rpm} requests per minute per {check.name}"))
                if at_once and bucket.in_flight >= at_once:
                    refusals.append((1.0, f"{at_once} requests at once per {check.name}"))
            if refusals:
                wait_s, what = max(refusals)
                headers = self._headers(buckets)
                retry = max(1, math.ceil(wait_s))
                headers["retry-after"] = str(retry)
                raise RateLimited(
                    f"Rate limit reached: at most {what}. Retry after {retry} s.",
                    retry_after_s=retry,
                    headers=headers,
                )
            for check, bucket in buckets:
                if check.policy.requests_per_minute:
                    bucket.tokens -= 1
                bucket.in_flight += 1
            headers = self._headers(buckets)
            self._forget_old()
        return Ticket(self, [c.key for c in checks], headers)

    @staticmethod
    def _headers(buckets: list[tuple[Check, _Bucket]]) -> dict[str, str]:
        policies, remaining = [], []
        for check, bucket in buckets:
            rpm = check.policy.requests_per_minute
            if not rpm:
                continue
            left = max(0, math.floor(bucket.tokens))
            full_in = math.ceil(max(0.0, rpm - bucket.tokens) / (rpm / WINDOW_S))
            policies.append(f'"{check.name}";q={rpm};w={WINDOW_S}')
            remaining.append(f'"{check.name}";r={left};t={full_in}')
        if not policies:
            return {}
        return {"ratelimit-policy": ", ".join(policies), "ratelimit": ", ".join(remaining)}

    def _release(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                bucket = self._buckets.get(key)
                if bucket is not None and bucket.in_flight > 0:
                    bucket.in_flight -= 1

    def _forget_old(self) -> None:
        excess = len(self._buckets) - self.max_keys
        if excess <= 0:
            return
        idle = [k for k, b in islice(self._buckets.items(), 4 * excess) if not b.in_flight][:excess]
        for key in idle:  # a key with requests in flight is kept: its slots must come back
            del self._buckets[key]

    def in_flight(self, key: str) -> int:
        """Requests counted under `key` that have not ended (for tests and metrics)."""
        with self._lock:
            bucket = self._buckets.get(key)
            return bucket.in_flight if bucket else 0


_NO_LIMITS = TierRateLimits()  # shared, never changed: one per admitted request cost a model validation each


def limits_for(tier: str, tiers: dict[str, TierRateLimits]) -> TierRateLimits:
    """The limits of `tier`: its own, else `default`, else none."""
    return tiers.get(tier) or tiers.get("default") or _NO_LIMITS
