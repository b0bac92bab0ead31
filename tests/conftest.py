"""Test configuration shared by every tier. The folder is the tier: markers are applied from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # so fixture modules import as `fixtures.*`

# Shared fixtures live in tests/fixtures/, one module per service the tests start.
pytest_plugins = [
    f"fixtures.{p.stem}" for p in sorted((TESTS / "fixtures").glob("*.py")) if p.stem != "__init__"
]

_TIERS = ("unit", "integration", "e2e", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(TESTS).parts
        if parts and parts[0] in _TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
