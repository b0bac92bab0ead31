"""Service settings, declared once, loaded from YAML and the environment at start-up (never at import).

Every environment variable the service reads is listed in ENV_VARS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from billing.config import BillingSettings
from hardware_profiles import ProfileCatalog, load_profiles
from hardware_profiles.loader import ProfileError
from metering.config import MeteringSettings
from models.catalog import CatalogError, ModelCatalog, load_catalog, parse_catalog
from models.loading import LoadOptions
from serving.secrets import SecretInSettingsFile, refuse_secrets, with_secret_files
from serving.security import SecuritySettings

# name -> (settings path, description)
ENV_VARS: dict[str, tuple[str, str]] = {
    "HFI_CONFIG": ("", "a YAML settings file"),
    "HFI_HOST": ("host", "address the HTTP server binds"),
    "HFI_PORT": ("port", "port of the HTTP server"),
    "HFI_CATALOG": ("catalog_file", "the model catalog YAML"),
    "HFI_PROFILES_DIR": ("profiles_dir", "a directory of hardware profile YAML files"),
    "HFI_MODEL_STORE": ("model_store", "where local model directories live"),
    "HFI_DATABASE_URL": ("metering.database_url", "the ledger database (SQLite or PostgreSQL URL)"),
    "HFI_SPOOL_DIR": ("metering.spool_dir", "the durable charge spool directory"),
    "HFI_EVENTS_FILE": ("metering.events_file", "a CloudEvents JSON-lines file of charges"),
    "HFI_COLLECTOR_URL": ("metering.collector_url", "a usage-event collector (OpenMeter's ingest API)"),
    "HFI_COLLECTOR_TOKEN": ("metering.collector_token", "bearer token for the collector"),
    "HFI_PROVIDER_SECRET": ("metering.provider_secret", "secret of the Hugging Face billing endpoint"),
    "HFI_BILLING_MODE": ("billing.mode", "open (one local account) or tokens"),
    "HFI_ADMIN_TOKEN": ("billing.admin_token", "the operator's admin token"),
    "HFI_HUB_URL": ("billing.hub_url", "the Hugging Face Hub (whoami, partner API)"),
    "HFI_ACCEPT_HF_TOKENS": ("billing.accept_hf_tokens", "1: accept routed Hugging Face tokens"),
    "HF_TOKEN": ("hf_token", "Hugging Face token for gated or private models"),
    "HF_HUB_CACHE": ("hf_cache_dir", "the Hugging Face cache directory"),
    "HF_HUB_OFFLINE": ("offline", "1: load models from the cache only"),
}


BOOLEAN_ENV_VARS = {"HF_HUB_OFFLINE", "HFI_ACCEPT_HF_TOKENS"}


class SettingsError(ValueError):
    pass


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
    model_wait_timeout_s: float = Field(default=300, gt=0)
    # Where the service is mounted: "/" (the default), or a path such as "/blue" to run a second copy beside
    # another on one Serve instance (routes then live under it: /blue/models/{id}, /blue/v1/...).
    route_prefix: str = Field(default="/", pattern=r"^/([A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*)?$")
    # Local runs (`hfi serve`): Serve's HAProxy ingress, one hop from the socket to the model replica, where it can
    # run (Linux); False, or elsewhere: Serve's Python proxy. On a cluster the Helm chart sets it on every node.
    haproxy: bool = True
    ingress_num_cpus: float = Field(default=0.25, ge=0)
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
        try:  # secrets: from the environment or a mounted file (HFI_ADMIN_TOKEN_FILE, ...), never the YAML
            env = with_secret_files(dict(os.environ if env is None else env))
            merged: dict[str, Any] = {}
            if env.get("HFI_CONFIG"):
                merged = _read_yaml(Path(env["HFI_CONFIG"]))
                refuse_secrets(merged, env["HFI_CONFIG"])
        except SecretInSettingsFile as err:
            raise SettingsError(str(err)) from None
        from_env: set[str] = set()
        data = data or {}
        for name, (path, _) in ENV_VARS.items():
            if path and env.get(name):
                value: Any = env[name]
                if name in BOOLEAN_ENV_VARS:
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                _set_path(merged, path, value)
                if not _has_path(data, path):
                    from_env.add(path)
        _deep_update(merged, data)
        try:
            settings = cls.model_validate(merged)
        except ValidationError as err:
            lines = [f"settings: field {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
            raise SettingsError("\n".join(lines)) from None
        settings._from_env = from_env
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

    def load_options(self) -> LoadOptions:
        return LoadOptions(
            model_store=Path(self.model_store).expanduser(),
            hf_token=self.hf_token,
            hf_cache_dir=self.hf_cache_dir,
            offline=self.offline,
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SettingsError(f"{path}: cannot read settings: {err}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: settings must be a mapping")
    return data


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        target = target.setdefault(key, {})
    target[leaf] = value


def _has_path(data: dict[str, Any], dotted: str) -> bool:
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _deep_update(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value
