"""benchmarks/cold_start.py's CPU account of a start: every process under the root, the gone ones included."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "cold_start.py"
_spec = importlib.util.spec_from_file_location("cold_start", _PATH)
cold_start = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cold_start)

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_the_account_counts_live_children_and_the_ones_already_gone() -> None:
    root = subprocess.Popen(  # a root whose child burns CPU and is gone, then a live child that burned some too
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"subprocess.run([sys.executable, '-c', {BURN.format(s=0.4)!r}])\n"
            f"live = subprocess.Popen([sys.executable, '-c', {(BURN.format(s=0.3) + 'time.sleep(30)')!r}])\n"
            "time.sleep(30)\n",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        account = cold_start.cpu_account(root.pid)
        while account["total_cpu_s"] < 0.7 and time.monotonic() < deadline:
            time.sleep(0.1)
            account = cold_start.cpu_account(root.pid)
        assert account["total_cpu_s"] >= 0.7  # 0.4 s gone with its process, 0.3 s in the live one
        assert account["cores"] == (os.cpu_count() or 1)
        assert account["least_wall_s"] == round(account["total_cpu_s"] / account["cores"], 1)
        assert sum(account["by_process"].values()) <= account["total_cpu_s"] + 0.1 * len(
            account["by_process"]
        )
    finally:
        for pid in cold_start.descendants(root.pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        root.kill()
        root.wait()


def test_processes_are_named_by_what_they_run() -> None:
    assert cold_start._label(os.getpid()).startswith(("python", "pytest"))
    assert cold_start._label(10**9) == "?"  # gone


def test_replicas_are_named_by_their_application() -> None:
    assert cold_start.name_of(["ray::ServeReplica:model-local--tiny-flux:model-local--tiny-flux"]) == (
        "replica model-local--tiny-flux"
    )
    assert cold_start.name_of(["ray::ServeController"]) == "ray::ServeController"
    assert cold_start.name_of(["/x/python3", "-m", "metering.node_drain"]) == "metering.node_drain"
    assert cold_start.name_of([]) == "?"
