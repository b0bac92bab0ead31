"""Layering: metering never imports Ray, torch, FastAPI or serving, and keeps its CLI imports lazy."""

from __future__ import annotations

import subprocess
import sys


def test_metering_imports_no_framework_and_no_serving() -> None:
    code = (
        "import sys, metering.service, metering.cli, metering.metrics, metering.reports, metering.events;"
        "print(' '.join(m for m in ('ray', 'torch', 'fastapi', 'serving', 'typer', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == []
