"""The settings loader that the service and every `hfi` command use, and the environment variables it reads.

Settings come in layers, each over the one before: the YAML file named by HFI_CONFIG, then the environment
variables of ENV_VARS (each sets one dotted settings path), then what the caller passes (a builder's args, a
command's options). The service (serving.config.Settings.load) reads every layer, and the secrets rule below
(a secret comes from its variable or its `_FILE`, never from the file). A command reads the part it needs with
`settings_data(variables=..., ...)` or `setting(path, option, ...)`, the layers it has always read.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_VAR = "HFI_CONFIG"

# name -> (settings path, description): every environment variable the service reads
ENV_VARS: dict[str, tuple[str, str]] = {
    CONFIG_VAR: ("", "a YAML settings file"),
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


# Secrets come from the environment or a mounted file, never from a settings file.
#
# A settings file (HFI_CONFIG) is plain configuration: it is copied into the Serve deployment args, which `serve
# status` and the Ray dashboard show. A secret found in one is refused, with the variable to use instead. Each
# secret's variable also has a `_FILE` form naming a file to read it from (a Kubernetes Secret mounted as a
# volume, a Docker secret).

# settings path -> the environment variable that carries it
SECRET_SETTINGS: dict[str, str] = {
    "billing.admin_token": "HFI_ADMIN_TOKEN",
    "metering.provider_secret": "HFI_PROVIDER_SECRET",
    "metering.collector_token": "HFI_COLLECTOR_TOKEN",
    "hf_token": "HF_TOKEN",
}
DATABASE_URL_SETTING = ("metering.database_url", "HFI_DATABASE_URL")
FILE_SUFFIX = "_FILE"


class SecretInSettingsFile(ValueError):
    """A secret was written in a settings file."""


def url_has_password(url: str) -> bool:
    """Whether a database URL carries a password (`scheme://user:password@host/...`)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return bool(make_url(url).password)
    except (ArgumentError, ValueError):
        _, _, rest = url.partition("://")
        userinfo = rest.split("@", 1)[0] if "@" in rest else ""
        return ":" in userinfo


def refuse_secrets(data: dict[str, Any], source: str) -> None:
    """Raise SecretInSettingsFile naming every secret in `data` (a settings file's contents) and the variable
    (or mounted file) to give it with instead."""
    found: list[str] = []
    for path, var in SECRET_SETTINGS.items():
        if _get_path(data, path) not in (None, ""):
            found.append(
                f"{path}: a secret; set it with {var} (or {var}{FILE_SUFFIX}, a file to read it from)"
            )
    path, var = DATABASE_URL_SETTING
    url = _get_path(data, path)
    if isinstance(url, str) and url_has_password(url):
        found.append(
            f"{path}: this URL carries a password; set the whole URL with {var} (or {var}{FILE_SUFFIX})"
        )
    if found:
        lines = "\n".join(f"  {line}" for line in found)
        raise SecretInSettingsFile(
            f"{source}: secrets are not read from a settings file (it is copied into the Serve deployment "
            f"args, shown by `serve status` and the Ray dashboard):\n{lines}"
        )


def with_secret_files(env: dict[str, str]) -> dict[str, str]:
    """`env` with each secret variable that is unset read from its `_FILE` variable's file (trailing newline
    dropped). A `_FILE` that cannot be read is an error naming it."""
    out = dict(env)
    for var in [*SECRET_SETTINGS.values(), DATABASE_URL_SETTING[1]]:
        file_var = var + FILE_SUFFIX
        if out.get(var) or not out.get(file_var):
            continue
        try:
            out[var] = Path(out[file_var]).read_text().rstrip("\r\n")
        except OSError as err:
            raise SecretInSettingsFile(f"{file_var}: cannot read {out[file_var]}: {err.strerror}") from None
    return out


@dataclass
class SettingsData:
    """The layers merged into plain data, not validated yet; `from_env`: the paths whose value came from the
    environment (not overridden by the caller's data)."""

    values: dict[str, Any]
    from_env: set[str] = field(default_factory=set)

    def get(self, dotted: str) -> Any:
        """The value at a dotted path, or None."""
        return _get_path(self.values, dotted)


def settings_data(
    data: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    variables: Collection[str] | None = None,
    config_file: bool = True,
    secret_files: bool = True,
) -> SettingsData:
    """HFI_CONFIG's file (with `config_file`), then the environment variables (`variables`, names from ENV_VARS;
    None: all of them; an empty value is no value), then `data`. With `secret_files` (the service), each secret
    variable that is unset is read from its `_FILE`, and a secret written in the file is refused.
    Raises SettingsError naming the file or the variable."""
    try:
        env = dict(os.environ if env is None else env)
        if secret_files:
            env = with_secret_files(env)
        merged: dict[str, Any] = {}
        if config_file and env.get(CONFIG_VAR):
            merged = read_settings_file(Path(env[CONFIG_VAR]))
            if secret_files:
                refuse_secrets(merged, env[CONFIG_VAR])
    except SecretInSettingsFile as err:
        raise SettingsError(str(err)) from None
    from_env: set[str] = set()
    data = dict(data or {})
    for name, (path, _) in ENV_VARS.items():
        if path and env.get(name) and (variables is None or name in variables):
            value: Any = env[name]
            if name in BOOLEAN_ENV_VARS:
                value = value.strip().lower() in ("1", "true", "yes", "on")
            _set_path(merged, path, value)
            if not _has_path(data, path):
                from_env.add(path)
    _deep_update(merged, data)
    return SettingsData(merged, from_env)


def setting(
    path: str,
    option: Any = None,
    *,
    default: Any = None,
    env: Mapping[str, str] | None = None,
    config_file: bool = True,
) -> Any:
    """One setting as a command reads it: `option` (given on its command line), else its environment variable,
    else (with `config_file`) HFI_CONFIG's file, else `default`."""
    if option:
        return option
    names = [name for name, (p, _) in ENV_VARS.items() if p == path]
    value = settings_data(env=env, variables=names, config_file=config_file, secret_files=False).get(path)
    return value or default


def read_settings_file(path: Path) -> dict[str, Any]:
    """A YAML settings file as a mapping; SettingsError naming the file when it cannot be read or is not one."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SettingsError(f"{path}: cannot read settings: {err}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: settings must be a mapping")
    return data


def _get_path(data: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(target.get(key), dict):
            target[key] = {}  # absent, or empty in the file (`billing:`)
        target = target[key]
    target[leaf] = value


def _has_path(data: Mapping[str, Any], dotted: str) -> bool:
    for key in dotted.split("."):
        if not isinstance(data, Mapping) or key not in data:
            return False
        data = data[key]
    return True


def _deep_update(target: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value
