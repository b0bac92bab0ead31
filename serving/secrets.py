"""Secrets come from the environment or a mounted file, never from a settings file.

A settings file (HFI_CONFIG) is plain configuration: it is copied into the Serve deployment args, which `serve
status` and the Ray dashboard show. A secret found in one is refused, with the variable to use instead. Each
secret's variable also has a `_FILE` form naming a file to read it from (a Kubernetes Secret mounted as a
volume, a Docker secret).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _get(data: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(key)  # type: ignore[assignment]
    return data


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
        if _get(data, path) not in (None, ""):
            found.append(
                f"{path}: a secret; set it with {var} (or {var}{FILE_SUFFIX}, a file to read it from)"
            )
    path, var = DATABASE_URL_SETTING
    url = _get(data, path)
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
