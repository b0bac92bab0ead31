"""Billing settings. Part of the service settings (serving/config.py).

Money is integer nano-USD (10^-9 USD) everywhere, like the metering ledger: $1.00 is core.money.NANOUSD_PER_USD.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from billing.ratelimit import TierRateLimits, default_rate_limits
from core.money import NANOUSD_PER_USD


class TierPolicy(BaseModel):
    """What one user tier or organization plan gets each calendar month (UTC)."""

    model_config = ConfigDict(extra="forbid")

    included_nanousd: int = Field(ge=0, description="monthly included credits (per seat for a per-seat plan)")
    pay_as_you_go: bool = Field(description="may keep spending once the included credits are used")
    per_seat: bool = Field(default=False, description="organizations: included credits x seats, pooled")
    billable: bool = Field(default=True, description="organizations: may be billed with X-HF-Bill-To")


def _default_user_tiers() -> dict[str, TierPolicy]:
    # Hugging Face's published figures: free a few cents ("subject to change"), PRO $2.00 and pay-as-you-go.
    return {
        "free": TierPolicy(included_nanousd=100_000_000, pay_as_you_go=False),
        "pro": TierPolicy(included_nanousd=2 * NANOUSD_PER_USD, pay_as_you_go=True),
    }


def _default_org_plans() -> dict[str, TierPolicy]:
    # An organization without a paid plan cannot be billed; enterprise gets $2.00 per seat, pooled.
    return {
        "free": TierPolicy(included_nanousd=0, pay_as_you_go=False, billable=False),
        "enterprise": TierPolicy(
            included_nanousd=2 * NANOUSD_PER_USD, pay_as_you_go=True, per_seat=True, billable=True
        ),
    }


class BillingSettings(BaseModel):
    """Accounts, tiers, admission and the Hugging Face Hub integration."""

    model_config = ConfigDict(extra="forbid")

    # "open": no tokens needed, everything is billed to one local account (a laptop);
    # "tokens": callers need a token issued by `hfi accounts` (or a Hugging Face token, when routed).
    mode: Literal["open", "tokens"] = "open"
    local_account: str = "local"

    user_tiers: dict[str, TierPolicy] = Field(default_factory=_default_user_tiers)
    org_plans: dict[str, TierPolicy] = Field(default_factory=_default_org_plans)
    default_user_tier: str = "free"

    # Admission. A request is admitted while (settled + what is held for running requests and leases + its
    # estimate) stays within the cap plus this allowance, so a month's spend stays within cap + allowance as long
    # as each true cost is within its estimate (a request that ran is always charged in full; any excess over
    # its estimate adds to it). See billing/spend.py for the whole statement.
    overshoot_allowance_nanousd: int = Field(default=0, ge=0)
    min_estimate_nanousd: int = Field(default=1, ge=1, description="floor of a reservation")
    estimate_compute_s: float = Field(
        default=5.0, gt=0, description="compute seconds reserved per request (x the profile's price)"
    )
    # Admission without a database round trip per request (billing/spend.py, billing/leases.py). Tokens and the
    # billed account's policy (tier, limit, membership, disabled models) are cached this long: a revoked token, a
    # lowered limit or a disabled model takes effect on the other replicas within it (at once on the replica that
    # made the change). 0: no cache.
    token_cache_ttl_s: float = Field(default=5, ge=0, description="how long tokens and policies are cached")
    # A capped account's month is spent in memory from a lease: a slice of `lease_slice_estimates` estimates (or
    # what is left under the cap, if less) taken by one conditional UPDATE, returned when it expires or runs out.
    lease_ttl_s: float = Field(default=5, gt=0, description="how long a replica admits from one budget lease")
    lease_slice_estimates: int = Field(
        default=10, ge=1, description="a lease takes this many estimates of the request that asks for it"
    )
    settle_flush_interval_s: float = Field(
        default=0.5, gt=0, description="how often settlements and reservation rows are written, in batches"
    )
    # Housekeeping of reservations (billing/spend.py), run in the background at most every sweep_interval_s
    # (resp. prune_interval_s) per process. The metering ledger's charges are the truth: a reservation whose
    # settlement was lost (a client cut off, a crash) is settled from its charge after settle_grace_s, and only
    # one with no charge is expired after reservation_ttl_s (a lost release, or a request that never ran).
    reservation_ttl_s: float = Field(
        default=600,
        gt=0,
        description="an open reservation this old with no charge in the ledger is expired (its estimate given "
        "back); a request running longer than this no longer holds its estimate",
    )
    settle_grace_s: float = Field(
        default=60, gt=0, description="an open reservation this old whose charge is in the ledger is settled"
    )
    sweep_interval_s: float = Field(
        default=30, gt=0, description="how often each process sweeps reservations"
    )
    late_charge_window_s: float = Field(
        default=86400,
        ge=0,
        description="an expired reservation this recent is still settled when its charge reaches the ledger",
    )
    reservation_retention_days: int = Field(
        default=70,
        ge=62,
        description="settled, released and expired reservations older than this are pruned; at least 62 days, "
        "so the previous calendar month is always whole (reconciliation, reports)",
    )
    prune_interval_s: float = Field(
        default=3600,
        ge=0,
        description="how often each process prunes old reservations (0: only `hfi billing prune`)",
    )

    token_prefix: str = Field(default="hfi_", min_length=2, max_length=16)
    # The admin API also accepts this secret (set it from a secret store, not in a committed file).
    admin_token: str | None = None

    # Routed Hugging Face traffic: tokens that are not ours are checked with the Hub's whoami endpoint.
    accept_hf_tokens: bool = False
    hub_url: str = "https://huggingface.co"
    hub_timeout_s: float = Field(default=10, gt=0)
    hub_whoami_cache_s: float = Field(default=60, ge=0)
    hub_whoami_negative_cache_s: float = Field(default=10, ge=0)
    # whoami look-ups run on their own small thread pool, one per token at a time (single-flight); past
    # hub_whoami_max_pending look-ups waiting, a new token is answered 503 at once (the Hub is not flooded).
    hub_whoami_max_concurrency: int = Field(default=4, ge=1)
    hub_whoami_max_pending: int = Field(default=64, ge=1)
    # Rate limits by tier (a user's tier; `hf-routed` for Hugging Face tokens, `open` for open mode's local
    # account, `default` for a tier not listed): see billing/ratelimit.py. Enforced per serving process.
    rate_limits: dict[str, TierRateLimits] = Field(default_factory=default_rate_limits)
    routed_account_prefix: str = "hf:"
    # The Hub's partner API (hfi hub sync).
    hub_provider: str = "hf-inference-selfhosted"
    hub_sync_exclude: list[str] = Field(
        default_factory=lambda: ["local/*"], description="catalog ids (glob) never registered on the Hub"
    )

    @model_validator(mode="after")
    def _consistent(self) -> BillingSettings:
        if self.default_user_tier not in self.user_tiers:
            raise ValueError(f"default_user_tier {self.default_user_tier!r} is not one of user_tiers")
        if not self.token_prefix.endswith("_"):
            raise ValueError("token_prefix must end with '_'")
        return self
