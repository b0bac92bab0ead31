"""The hardware profile schema (pydantic), with exact prices that carry an effective date."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from decimal import Decimal
from fractions import Fraction
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SECONDS_PER_HOUR = 3600
# The node label Ray sets on every node where it detects an accelerator: its type, as in accelerator_type (L4, H100).
ACCELERATOR_TYPE_LABEL = "ray.io/accelerator-type"
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def off_gpu_nodes(gpu_types: Iterable[str], *, strict: bool) -> dict[str, Any]:
    """Ray actor options that keep an actor asking for no GPU off the nodes that have a GPU of these types, so that
    it cannot take the CPUs a GPU replica needs there (Serve spreads replicas over every node that fits).

    Strict: only nodes without such a GPU (a cluster with CPU nodes). Otherwise a preference: such a node when one
    has room, else any node (one GPU machine that runs everything). Nodes without the label match either way."""
    types = sorted({t for t in gpu_types if _LABEL_VALUE.fullmatch(t)})
    if not types:
        return {}
    options: dict[str, Any] = {"label_selector": {ACCELERATOR_TYPE_LABEL: f"!in({','.join(types)})"}}
    if not strict:
        options["fallback_strategy"] = [{"label_selector": {}}]
    return options


class Accelerator(BaseModel):
    """The GPU (or other accelerator) a replica of this profile is placed on."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="Ray accelerator_type, e.g. H100, A10G, L4")
    count: float = Field(gt=0, description="GPUs per replica; a fraction means a shared GPU")
    memory_gb: float | None = Field(default=None, gt=0)


class PricePoint(BaseModel):
    """A price in force from `effective_from` (UTC, inclusive) until the next price point."""

    model_config = ConfigDict(extra="forbid")

    effective_from: dt.date
    usd_per_hour: Decimal | None = Field(default=None, ge=0)
    usd_per_second: Decimal | None = Field(default=None, ge=0)

    @field_validator("usd_per_hour", "usd_per_second", mode="before")
    @classmethod
    def _no_binary_floats(cls, value: Any) -> Any:
        # YAML reads 0.50 as a binary float; go through its shortest repr so 0.5 stays exactly 0.5.
        if isinstance(value, float):
            return Decimal(repr(value))
        return value

    @model_validator(mode="after")
    def _exactly_one_price(self) -> PricePoint:
        if (self.usd_per_hour is None) == (self.usd_per_second is None):
            raise ValueError("give exactly one of usd_per_hour or usd_per_second")
        return self

    @property
    def usd_per_second_exact(self) -> Fraction:
        """The price per second as an exact fraction (4.50 $/h is exactly 1/800 $/s)."""
        if self.usd_per_second is not None:
            return Fraction(self.usd_per_second)
        assert self.usd_per_hour is not None
        return Fraction(self.usd_per_hour) / SECONDS_PER_HOUR


class HardwareProfile(BaseModel):
    """What one replica gets and what it costs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str = ""
    accelerator: Accelerator | None = None
    cpus: float = Field(default=1, gt=0, description="Ray logical CPUs reserved per replica")
    memory_gb: float | None = Field(default=None, gt=0)
    torch_threads: int | None = Field(default=None, ge=1, description="intra-op threads on the CPU")
    prices: list[PricePoint] = Field(min_length=1)

    @field_validator("prices")
    @classmethod
    def _sorted_unique_dates(cls, prices: list[PricePoint]) -> list[PricePoint]:
        dates = [p.effective_from for p in prices]
        if len(set(dates)) != len(dates):
            raise ValueError("two prices share one effective_from date")
        return sorted(prices, key=lambda p: p.effective_from)

    @property
    def is_gpu(self) -> bool:
        return self.accelerator is not None

    def price_at(self, when: dt.datetime | dt.date) -> PricePoint:
        """The price in force at `when` (a UTC datetime or a date)."""
        day = when.date() if isinstance(when, dt.datetime) else when
        in_force = [p for p in self.prices if p.effective_from <= day]
        if not in_force:
            raise LookupError(f"profile {self.name} has no price in force on {day.isoformat()}")
        return in_force[-1]

    def ray_actor_options(self) -> dict[str, Any]:
        """The Ray actor options a replica of this profile is started with."""
        options: dict[str, Any] = {"num_cpus": self.cpus}
        if self.accelerator is not None:
            options["num_gpus"] = self.accelerator.count
            options["accelerator_type"] = self.accelerator.type
        return options


class ProfileCatalog(BaseModel):
    """All profiles by name."""

    profiles: dict[str, HardwareProfile]

    def get(self, name: str) -> HardwareProfile:
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            raise KeyError(f"unknown hardware profile {name!r} (known: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self.profiles

    def names(self) -> list[str]:
        return sorted(self.profiles)

    def gpu_types(self) -> list[str]:
        """The accelerator types the profiles ask for."""
        return sorted({p.accelerator.type for p in self.profiles.values() if p.accelerator is not None})

    def ray_actor_options(self, name: str, *, strict_cpu_placement: bool = False) -> dict[str, Any]:
        """A replica's Ray actor options: its profile's, and for a profile without a GPU, off the nodes that
        have a GPU of any profile (see off_gpu_nodes)."""
        profile = self.get(name)
        options = profile.ray_actor_options()
        if profile.accelerator is None:
            options.update(off_gpu_nodes(self.gpu_types(), strict=strict_cpu_placement))
        return options
