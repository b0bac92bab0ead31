"""Service settings, declared once, loaded from YAML and the environment at start-up (never at import).

core.settings loads them (HFI_CONFIG, then the environment, then the builder's args); every environment variable
the service reads is listed in core.settings.ENV_VARS.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from billing.config import BillingSettings
from core.settings import SettingsError, settings_data
from hardware_profiles import ProfileCatalog, load_profiles, off_gpu_nodes
from hardware_profiles.loader import ProfileError
from metering.config import MeteringSettings
from models.catalog import CatalogError, ModelCatalog, load_catalog, parse_catalog
from models.loading import LoadOptions
from serving.security import SecuritySettings

if TYPE_CHECKING:
    from serving.warmup import CalibrationCache

CALIBRATION_DIR = ".calibration"  # in the model store


class Settings(BaseModel):
    """Everything the service needs to start. Plain data: it is passed to every replica."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    catalog_file: str | None = Field(default=None, description="None: the packaged default catalog")
    models: list[dict[str, Any]] | None = Field(
        default=None, description="an inline catalog; wins over the file"
    )
    pools: list[dict[str, Any]] = Field(default_factory=list, description="the inline catalog's pools")
    profiles_dir: str | None = Field(default=None, description="None: the packaged profile catalog")
    profiles: list[dict[str, Any]] = Field(default_factory=list, description="inline profiles, added last")
    model_store: str = "~/.cache/hfi/models"
    hf_token: str | None = None
    hf_cache_dir: str | None = None
    offline: bool = False
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # How long a request waits for a model's replica: one that is starting, or (x-wait-for-model: true) one of a
    # model that scales to zero; then 503 with estimated_time.
    model_wait_timeout_s: float = Field(default=300, gt=0)
    # Each replica runs one internal request on a model it loaded before it takes traffic (serving/warmup.py).
    warmup: bool = True
    # An image model's measured seconds a denoising step (the warm-up's calibration) are kept in the model store
    # for this many days and reused by a later replica of the same model on the same hardware; 0: measure at
    # every start.
    calibration_cache_days: float = Field(default=7, ge=0)
    # Where the service is mounted: "/" (the default), or a path such as "/blue" to run a second copy beside
    # another on one Serve instance (routes then live under it: /blue/models/{id}, /blue/v1/...).
    route_prefix: str = Field(default="/", pattern=r"^/([A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*)?$")
    # Local runs (`hfi serve`): Serve's HAProxy ingress, one hop from the socket to the model replica, where it can
    # run (Linux); False, or elsewhere: Serve's Python proxy. On a cluster the Helm chart sets it on every node.
    haproxy: bool = True
    ingress_num_cpus: float = Field(default=0.25, ge=0)
    # Replicas whose profile has no GPU, and the router: "fallback" keeps them off nodes with a GPU of the profiles
    # while another node has room, else lets them run there (one GPU machine running everything); "never" keeps
    # them off such nodes always (a cluster with CPU nodes: the Helm chart's setting). Ray's node label
    # ray.io/accelerator-type says which nodes have one.
    cpu_replicas_on_gpu_nodes: Literal["fallback", "never"] = "fallback"
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_max_ongoing_requests: int = Field(default=256, ge=1)
    metering: MeteringSettings = Field(default_factory=MeteringSettings)
    billing: BillingSettings = Field(default_factory=BillingSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    # Settings that came from the environment: never copied into Serve deployment args (they may be secrets,
    # and every replica reads its own environment).
    _from_env: set[str] = PrivateAttr(default_factory=set)

    # Loading

    @classmethod
    def load(cls, data: dict[str, Any] | None = None, *, env: dict[str, str] | None = None) -> Settings:
        """Settings from HFI_CONFIG (if set), then the environment, then `data` (the builder's args)."""
        # secrets: from the environment or a mounted file (HFI_ADMIN_TOKEN_FILE, ...), never the YAML
        layers = settings_data(data, env=env)
        try:
            settings = cls.model_validate(layers.values)
        except ValidationError as err:
            lines = [f"settings: field {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
            raise SettingsError("\n".join(lines)) from None
        settings._from_env = layers.from_env
        return settings

    def replica_args(self) -> dict[str, Any]:
        """The settings as plain data for Serve deployment args: without the token and without anything that
        came from the environment (secrets such as the database URL stay in each replica's own environment)."""
        exclude: dict[str, Any] = {"hf_token": True}
        for path in self._from_env:
            head, _, leaf = path.partition(".")
            if leaf:
                exclude.setdefault(head, {})[leaf] = True
            else:
                exclude[head] = True
        return self.model_dump(mode="json", exclude=exclude)

    # Derived, validated views

    def catalog(self) -> ModelCatalog:
        if self.models is not None:
            return parse_catalog({"models": self.models, "pools": self.pools}, "settings.models")
        return load_catalog(self.catalog_file)

    def profile_catalog(self) -> ProfileCatalog:
        return load_profiles(self.profiles_dir, self.profiles)

    def validated(self) -> tuple[ModelCatalog, ProfileCatalog]:
        """The catalog and profiles, checked against each other; raises with the bad field named."""
        try:
            catalog = self.catalog()
            profiles = self.profile_catalog()
        except (CatalogError, ProfileError) as err:
            raise SettingsError(str(err)) from None
        for spec in catalog.models:
            if spec.hardware_profile not in profiles:
                raise SettingsError(
                    f"models[{spec.id}].hardware_profile: unknown profile {spec.hardware_profile!r}"
                    f" (known: {', '.join(profiles.names())})"
                )
        return catalog, profiles

    def actor_options(self, profiles: ProfileCatalog, profile: str | None) -> dict[str, Any]:
        """The Ray actor options of a replica of this profile (None: the router, settings.ingress_num_cpus)."""
        strict = self.cpu_replicas_on_gpu_nodes == "never"
        if profile is not None:
            return profiles.ray_actor_options(profile, strict_cpu_placement=strict)
        return {"num_cpus": self.ingress_num_cpus, **off_gpu_nodes(profiles.gpu_types(), strict=strict)}

    def calibration_cache(self) -> CalibrationCache | None:
        """Where replicas keep and find their image models' step calibrations; None when turned off."""
        if self.calibration_cache_days <= 0:
            return None
        from serving.warmup import CalibrationCache

        directory = Path(self.model_store).expanduser() / CALIBRATION_DIR
        return CalibrationCache(directory, self.calibration_cache_days * 86400)

    def load_options(self) -> LoadOptions:
        return LoadOptions(
            model_store=Path(self.model_store).expanduser(),
            hf_token=self.hf_token,
            hf_cache_dir=self.hf_cache_dir,
            offline=self.offline,
        )
