"""The model catalog: which models are served, from where, on which hardware profile, with which limits.

Declared once as pydantic models, loaded from YAML and validated at start-up; an error names the bad field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# A model id: NAME or ORG/NAME, as on the Hub (letters, digits, ".", "_", "-").
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"


class CatalogError(ValueError):
    """The catalog is invalid; the message names the entry and the field."""


class ModelSource(BaseModel):
    """Where the weights come from: a local directory, or a Hub repo id at a revision."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        default=None, description="a local directory; relative paths are under model_store"
    )
    repo_id: str | None = None
    revision: str = "main"
    prepare: str | None = Field(
        default=None, description="a built-in builder that creates `path` when it is missing (tiny defaults)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.path is None) == (self.repo_id is None):
            raise ValueError("give exactly one of source.path or source.repo_id")
        if self.prepare and not self.path:
            raise ValueError("source.prepare needs source.path")
        return self


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2, gt=0)
    # Scale to zero (min_replicas: 0): see serving/replicas.py for how requests are answered meanwhile.
    idle_timeout_s: float = Field(
        default=300,
        gt=0,
        description="with min_replicas 0: how long the last replica stays after its last request",
    )
    estimated_load_s: float = Field(
        default=30,
        gt=0,
        description="the `estimated_time` answered while no replica is up, until a start has been measured",
    )
    max_waiting_requests: int = Field(
        default=32,
        ge=0,
        description="requests held (x-wait-for-model) while the model loads; past it, 503 at once",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas is below min_replicas")
        return self


class Batching(BaseModel):
    """Dynamic batching of concurrent requests into one forward pass (serving/batching.py): the ingress sends a
    batched model's requests in batches of up to `max_batch_size`, and the replica merges what every ingress
    sends. A request that would run alone waits up to `batch_wait_timeout_s` for company, and so do a few stragglers
    (at most half the largest recent batch) for the rest of such a batch; once lone waits find no company (one
    caller at a time), lone requests run at once, with one probe a second to see whether company comes back."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    # The replica runs a batch on its event loop (as Ray Serve's @serve.batch does: no hand-over to a thread, no
    # second thread contending for the interpreter) while its batches take less than this, on average; a worker
    # thread runs longer ones, so that the loop never stops for long. 0: always a thread.
    on_loop_below_s: float = Field(default=0.1, ge=0)


class Limits(BaseModel):
    """Per-model limits; a request past one gets a 400 naming the field."""

    model_config = ConfigDict(extra="forbid")

    max_pixels: int = Field(default=1024 * 1024, ge=1)
    max_steps: int = Field(default=50, ge=1)
    max_new_tokens: int = Field(default=512, ge=1)
    max_batch_inputs: int = Field(default=64, ge=1)
    max_input_chars: int = Field(default=100_000, ge=1)
    # The compute one request may use on its replica (None: the task's default, models/deadline.py); past it
    # the work stops, the request is answered 504 naming this limit and charged for what ran.
    max_compute_s: float | None = Field(default=None, gt=0)
    # An image model's speed on its hardware profile, in megapixel-steps per second (applied linearly): an image
    # request estimated past max_compute_s is refused before it runs (models/compute_estimate.py). Wins over what
    # the replica measures at start-up; with neither, only max_pixels and max_steps apply.
    image_megapixel_steps_per_s: float | None = Field(default=None, gt=0)
    max_table_cells: int = Field(default=10_000, ge=1)
    max_input_pixels: int = Field(default=4096 * 4096, ge=1, description="pixels of an input image")
    max_audio_seconds: float = Field(default=600, gt=0, description="seconds of input audio")


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ModelSpec(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=MODEL_ID_PATTERN)
    task: str = Field(description="the Hub pipeline tag; selects the runner")
    tasks: list[str] | None = Field(
        default=None, description="operations served (default: all the runner supports)"
    )
    source: ModelSource
    hardware_profile: str = "cpu-basic"
    dtype: Dtype = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    replicas: int | None = Field(default=1, ge=0)
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(default=8, ge=1)
    batching: Batching | None = None
    limits: Limits = Field(default_factory=Limits)
    defaults: dict[str, Any] = Field(default_factory=dict, description="default task parameters")
    options: dict[str, Any] = Field(default_factory=dict, description="runner-specific load options")
    pool: str | None = Field(
        default=None,
        description="a pool (catalog `pools`) whose shared replicas load this model on first use, instead of "
        "replicas of its own; replicas, autoscaling and max_ongoing_requests are then the pool's",
    )

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> ModelSpec:
        if self.autoscaling is not None:
            self.replicas = None
        elif self.replicas is None:
            raise ValueError("give replicas or autoscaling")
        return self

    @property
    def deployment_name(self) -> str:
        """A Serve deployment name derived from the id (Serve names may not contain '/')."""
        return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.id.replace("/", "--"))

    @property
    def scales_to_zero(self) -> bool:
        """Whether the model may have no replica (autoscaling.min_replicas 0): it is loaded on demand."""
        return self.pool is None and self.autoscaling is not None and self.autoscaling.min_replicas == 0


class PoolSpec(BaseModel):
    """Shared replicas for many small models (serving/pool.py): each replica loads a pooled model on its first
    request and evicts the least recently used idle one past `max_models` or `max_memory_mb`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    hardware_profile: str = "cpu-basic"
    replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_models: int = Field(default=8, ge=1, description="models loaded at once on one replica")
    max_memory_mb: int = Field(
        default=2048, ge=1, description="weights loaded at once on one replica (their files' size)"
    )

    @property
    def deployment_name(self) -> str:
        return f"pool-{self.name}"


class ModelCatalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    pools: list[PoolSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ModelCatalog:
        seen: set[str] = set()
        for m in self.models:
            if m.id.lower() in seen:
                raise ValueError(f"model {m.id} is listed twice")
            seen.add(m.id.lower())
        pools = {p.name: p for p in self.pools}
        if len(pools) != len(self.pools):
            raise ValueError("a pool name is listed twice")
        for m in self.models:
            if m.pool is None:
                continue
            pool = pools.get(m.pool)
            if pool is None:
                known = ", ".join(pools) or "none"
                raise ValueError(
                    f"model {m.id}: pool {m.pool!r} is not declared under pools (declared: {known})"
                )
            if m.hardware_profile != pool.hardware_profile:
                # metering prices a request by its model's profile: it must be where the pool runs it
                raise ValueError(
                    f"model {m.id}: hardware_profile {m.hardware_profile!r} differs from its pool's "
                    f"({pool.name}: {pool.hardware_profile!r})"
                )
        return self

    def pool(self, name: str) -> PoolSpec:
        return next(p for p in self.pools if p.name == name)

    def pooled(self, name: str) -> list[ModelSpec]:
        """The models of one pool."""
        return [m for m in self.models if m.pool == name]

    def get(self, model_id: str) -> ModelSpec | None:
        wanted = model_id.lower()
        for m in self.models:
            if m.id.lower() == wanted:
                return m
        return None


def default_catalog_path() -> Path:
    return Path(__file__).parent / "catalog" / "default.yaml"


def _describe(err: ValidationError, data: Any, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        where = ".".join(str(p) for p in loc) or "(root)"
        # Name the model by id rather than by list index where we can.
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            try:
                model_id = data["models"][loc[1]].get("id", f"#{loc[1]}")
            except (KeyError, IndexError, TypeError, AttributeError):
                model_id = f"#{loc[1]}"
            where = f"models[{model_id}]." + ".".join(str(p) for p in loc[2:])
        lines.append(f"{source}: field {where}: {e['msg']}")
    return "\n".join(lines)


def parse_catalog(data: Any, source: str = "catalog") -> ModelCatalog:
    if isinstance(data, list):
        data = {"models": data}
    try:
        return ModelCatalog.model_validate(data)
    except ValidationError as err:
        raise CatalogError(_describe(err, data, source)) from None


def packaged_catalog_path(name: str) -> Path:
    """A catalog shipped with the package, by name (`all-tasks`: models/catalog/all-tasks.yaml)."""
    return Path(__file__).parent / "catalog" / f"{name}.yaml"


def load_catalog(path: Path | str | None = None) -> ModelCatalog:
    path = Path(path) if path else default_catalog_path()
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:
        path = packaged_catalog_path(path.name)  # a packaged catalog by name: `--catalog all-tasks`
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CatalogError(f"{path}: cannot read the catalog: {err}") from None
    return parse_catalog(data, str(path))
