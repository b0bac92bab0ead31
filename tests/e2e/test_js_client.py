"""The unmodified JS client, @huggingface/inference (from the npm registry), against the service on Ray Serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def js_client_dir() -> Path:
    """The client installed once into a cache directory (npm install of package.json, kept between runs)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the JS client conformance test")
    target = Path(os.environ.get("HFI_JS_CACHE", Path.home() / ".cache" / "hfi" / "js-client"))
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(JS / "package.json", target / "package.json")
    shutil.copy(JS / "conformance.mjs", target / "conformance.mjs")
    if not (target / "node_modules" / "@huggingface" / "inference").exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=target, check=True, timeout=300
        )
    return target


def test_js_client_every_default_task(hfi_service, js_client_dir):
    done = subprocess.run(
        ["node", "conformance.mjs"],
        cwd=js_client_dir,
        env={**os.environ, "BASE": hfi_service.url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["image"]["type"] == "image/jpeg" and out["image"]["size"] > 100  # JS sends Accept: */*
    assert out["chat"] and out["chatStream"]
    assert out["fe"] == 384
    assert out["ss"][0] == pytest.approx(1.0, abs=1e-3) and len(out["ss"]) == 2
    assert {e["label"] for e in out["tc"]} == {"NEGATIVE", "POSITIVE"}
    assert out["tg"]["generated_text"]
    assert "parameters.width must be a multiple of 2" in out["err"]  # the server's message, as a string
