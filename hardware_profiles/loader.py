"""Load and validate the profile catalog: a directory of YAML files, one profile per file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hardware_profiles.schema import HardwareProfile, ProfileCatalog


class ProfileError(ValueError):
    """A profile file is invalid; the message names the file and the field."""


def default_catalog_dir() -> Path:
    return Path(__file__).parent / "catalog"


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"{source}: field {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_profile(data: Any, source: str) -> HardwareProfile:
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(_format_validation_error(source, err)) from None


def load_profiles(
    directory: Path | str | None = None, extra: list[dict[str, Any]] | None = None
) -> ProfileCatalog:
    """Load every `*.yaml` in `directory` (the packaged catalog by default), then `extra` inline profiles.

    An inline profile replaces a file profile of the same name.
    """
    directory = Path(directory) if directory else default_catalog_dir()
    profiles: dict[str, HardwareProfile] = {}
    for path in sorted(directory.glob("*.yaml")):
        with path.open() as f:
            profile = parse_profile(yaml.safe_load(f), str(path))
        if profile.name in profiles:
            raise ProfileError(f"{path}: profile {profile.name!r} is defined twice")
        profiles[profile.name] = profile
    for i, data in enumerate(extra or []):
        profile = parse_profile(data, f"profiles[{i}]")
        profiles[profile.name] = profile
    if not profiles:
        raise ProfileError(f"no hardware profiles found in {directory}")
    return ProfileCatalog(profiles=profiles)
