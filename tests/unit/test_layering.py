"""The layering: each package imports only the packages below it, so the imports are one-way and acyclic.

core (the shared plumbing) is at the bottom and imports none of the others; models (the runners) know nothing of
money (metering, billing); serving puts them together; bench drives the service from outside. Every import
counts, also one inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Bottom first: a package may import the ones before it, never one after it.
LAYERS = ["core", "hardware_profiles", "models", "metering", "billing", "serving", "bench"]


def _imported_packages(path: Path) -> set[str]:
    """The top-level packages of the project that a file imports (absolute imports, anywhere in the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in LAYERS)
    return found


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> the files of the importer that import it."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in _imported_packages(path) - {package}:
                edges.setdefault((package, imported), []).append(str(path.relative_to(ROOT)))
    return edges


def test_every_package_is_in_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages - {"benchmarks", "tests"} <= set(LAYERS), "a new package: give it its place in LAYERS"
    assert set(LAYERS) <= packages


def test_imports_go_down_the_layers_only():
    upward = {f"{a} -> {b}": files for (a, b), files in _edges().items() if LAYERS.index(b) > LAYERS.index(a)}
    assert upward == {}


def test_the_core_imports_no_other_package_and_no_framework():
    modules = sorted(f"core.{p.stem}" for p in (ROOT / "core").glob("*.py") if p.stem != "__init__")
    assert {"core.db", "core.migrations", "core.settings", "core.errors", "core.timing"} <= set(modules)
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        f"layers = {LAYERS[1:]!r} + ['ray', 'torch', 'fastapi', 'typer', 'alembic']\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in layers)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == ""


def test_runners_know_nothing_of_money_and_billing_nothing_of_runners_errors():
    edges = _edges()
    assert ("models", "metering") not in edges and ("models", "billing") not in edges
    # billing reads the model catalog (hub sync), nothing else of models: its errors are core's ServiceError.
    billing_models = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "billing").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module
        and node.module.startswith("models")
        and node.module != "models.catalog"
    }
    assert billing_models == set()
