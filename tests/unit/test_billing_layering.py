"""billing/ is plain Python: importing every module pulls in no Ray, torch, FastAPI or serving."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "billing.accounts",
    "billing.cli",
    "billing.config",
    "billing.db",
    "billing.errors",
    "billing.hub",
    "billing.hub_sync",
    "billing.reconcile",
    "billing.reports",
    "billing.schema",
    "billing.service",
    "billing.spend",
    "billing.tokens",
]


def test_billing_imports_no_heavy_layers():
    code = (
        f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch', 'fastapi', 'serving'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""
