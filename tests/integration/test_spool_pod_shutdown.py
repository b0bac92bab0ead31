"""A pod going away with charges in its spool and the database down: nothing lost, nothing doubled.

A real child process records charges through MeteringService while the ledger cannot be reached, then gets
SIGTERM (Python's default: it dies on the spot, no close(), no flush), as a Ray worker does when its pod stops.
Its spool file is then delivered by a service already running on the same directory (periodic adoption: a
replica on the same node's hostPath) or by `hfi metering drain` (the pod's preStop hook).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from fixtures.postgres import PostgresServer

from hardware_profiles import load_profiles
from metering.config import MeteringSettings
from metering.drain import wait_until
from metering.ledger import Ledger
from metering.records import Charge, UsageRecord
from metering.service import MeteringService

UTC = dt.timezone.utc
CATALOG = load_profiles()
HFI = str(Path(sys.executable).parent / "hfi")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

CHILD = textwrap.dedent(
    """
    import datetime as dt, json, signal, sys
    from hardware_profiles import load_profiles
    from metering.config import MeteringSettings
    from metering.records import UsageRecord
    from metering.service import MeteringService

    spool_dir, db_url, n, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    s = MeteringSettings(database_url=db_url, spool_dir=spool_dir, retry_initial_s=0.05, retry_max_s=0.2)
    svc = MeteringService(s, load_profiles())
    usages = [UsageRecord(f"{prefix}-{i:04d}", dt.datetime.now(dt.timezone.utc), "org/m", "abc", "text-to-image",
                          "nvidia-h100", 1_000_000 * (i + 1) + i, billed_account="acme") for i in range(n)]
    charges = [svc.record(u).to_dict() for u in usages]  # each fsync'd before record() returns
    sys.stdout.write(json.dumps({"charges": charges, "spool": [str(p) for p in svc.spool.files()]}) + "\\n")
    sys.stdout.flush()
    signal.pause()  # serving on, the database still down, until SIGTERM ends it where it stands
    """
)


def start_child(spool_dir: Path, db_url: str, n: int) -> tuple[subprocess.Popen, list[Charge], list[Path]]:
    """A process that recorded `n` charges (none of which reached the ledger) and is still running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(spool_dir), db_url, str(n), uuid.uuid4().hex[:8]],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line, f"the child ended early ({proc.wait()})"
    data = json.loads(line)
    return proc, [Charge.from_dict(c) for c in data["charges"]], [Path(p) for p in data["spool"]]


def sigterm(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM


def settings(db_url: str, spool_dir: Path, **kw) -> MeteringSettings:
    values = dict(
        database_url=db_url,
        spool_dir=str(spool_dir),
        drain_interval_s=0.02,
        retry_initial_s=0.02,
        retry_max_s=0.2,
        drain_batch_size=25,
    )
    return MeteringSettings(**{**values, **kw})


def usage(i: int) -> UsageRecord:
    return UsageRecord(
        str(uuid.uuid4()),
        dt.datetime.now(UTC),
        "org/m",
        "abc",
        "feature-extraction",
        "nvidia-a10g",
        7_000 + i,
    )


def assert_exactly_once(ledger: Ledger, promised: list[Charge]) -> None:
    stored = {c.request_id: c for c in ledger.charges(None, None)}
    assert ledger.count() == len(promised) == len(stored)
    assert stored == {c.request_id: c for c in promised}
    assert sum(c.cost_nanousd for c in stored.values()) == sum(c.cost_nanousd for c in promised)


def unreachable_sqlite(tmp_path: Path) -> tuple[str, Path]:
    """A SQLite URL whose directory is a regular file (nothing can open it) until that file is removed."""
    blocker = tmp_path / "db"
    blocker.write_text("")
    return f"sqlite:///{blocker}/ledger.db", blocker


def test_a_running_replica_adopts_the_spool_of_a_sigtermed_pod_once_the_database_is_back(
    postgres_server: PostgresServer, postgres_db_url: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"  # one node's hostPath, shared by both
    running = MeteringService(settings(postgres_db_url, spool_dir, adopt_interval_s=0.05), CATALOG)
    ledger = Ledger(postgres_db_url)
    promised: list[Charge] = []
    try:
        promised += [running.record(usage(i)) for i in range(10)]
        assert running.flush(30)
        postgres_server.stop()
        try:
            proc, theirs, their_files = start_child(spool_dir, postgres_db_url, 40)
            promised += theirs
            promised += [running.record(usage(i)) for i in range(10, 20)]
            assert not running.flush(0.2)  # everything waits in the spools
            assert running.spool.adopt_orphans() == 0  # the child is alive: its file is not ours to take
            sigterm(proc)  # the pod goes away, its charges still in its spool
        finally:
            postgres_server.start()
        assert wait_until(lambda: not any(p.exists() for p in their_files), 60)
        assert running.flush(30)
        assert_exactly_once(ledger, promised)
    finally:
        running.close()
        ledger.close()
    assert list(spool_dir.glob("*.jsonl")) == []


def test_hfi_metering_drain_delivers_a_sigtermed_process_spool(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    db_url, blocker = unreachable_sqlite(tmp_path)
    proc, promised, _ = start_child(spool_dir, db_url, 30)
    sigterm(proc)
    blocker.unlink()  # the database is back
    drained = subprocess.run(
        [
            HFI,
            "metering",
            "drain",
            "--spool-dir",
            str(spool_dir),
            "--database-url",
            db_url,
            "--timeout-s",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "metering drain: 30 charges delivered from 1 spool files" in drained.stdout
    ledger = Ledger(db_url)
    try:
        assert_exactly_once(ledger, promised)
    finally:
        ledger.close()
    assert list(spool_dir.glob("*.jsonl")) == []
    assert list(spool_dir.glob("*.offsets.json")) == []


def test_drain_with_the_database_down_leaves_the_spool_whole_for_the_next_process(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    db_url, blocker = unreachable_sqlite(tmp_path)
    proc, promised, files = start_child(spool_dir, db_url, 12)
    sigterm(proc)
    drained = subprocess.run(
        [HFI, "metering", "drain", "--timeout-s", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "HFI_SPOOL_DIR": str(spool_dir), "HFI_DATABASE_URL": db_url},
    )
    assert drained.returncode == 1, drained.stdout + drained.stderr
    assert "bytes undelivered, left in the spool for the next process to adopt" in drained.stdout
    assert [p for p in files if p.exists()] == files  # released, unlocked, for a later adopter
    blocker.unlink()
    later = MeteringService(settings(db_url, spool_dir), CATALOG)  # the next pod on this node's hostPath
    try:
        assert later.flush(30)
        assert_exactly_once(later.ledger, promised)
    finally:
        later.close()
    assert list(spool_dir.glob("*.jsonl")) == []


def test_drain_waits_for_this_hosts_processes_to_stop_and_then_delivers_their_spool(tmp_path: Path) -> None:
    # preStop runs `ray stop` first, but a worker (or its sync child) may still hold its file for a moment.
    spool_dir = tmp_path / "spool"
    db_url = f"sqlite:///{tmp_path}/ledger.db"
    proc, promised, _ = start_child(spool_dir, "postgresql+psycopg://nobody@127.0.0.1:1/none", 8)
    drain = subprocess.Popen(
        [
            HFI,
            "metering",
            "drain",
            "--spool-dir",
            str(spool_dir),
            "--database-url",
            db_url,
            "--timeout-s",
            "120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        # The drain's own file appears once it is running: then it has seen the child's, still locked.
        assert wait_until(lambda: len(list(spool_dir.glob("*.jsonl"))) == 2 or drain.poll() is not None, 60)
        assert drain.poll() is None, drain.communicate()
        sigterm(proc)
        out, err = drain.communicate(timeout=150)
    finally:
        if drain.poll() is None:
            drain.kill()
    assert drain.returncode == 0, out + err
    ledger = Ledger(db_url)
    try:
        assert_exactly_once(ledger, promised)
    finally:
        ledger.close()
    assert list(spool_dir.glob("*.jsonl")) == []


@pytest.mark.parametrize("events", [False, True])
def test_drain_settings_read_the_service_environment_and_config(tmp_path: Path, events: bool) -> None:
    from core.settings import ENV_VARS
    from metering.cli import METERING_ENV_VARS, drain_settings

    # the drain reads the metering settings the way the service does, so it feeds the same ledger and sinks
    for name, key in METERING_ENV_VARS.items():
        assert ENV_VARS[name][0] == f"metering.{key}"
    metering_vars = {n for n, (path, _) in ENV_VARS.items() if path.startswith("metering.")}
    assert metering_vars - {"HFI_PROVIDER_SECRET"} == set(METERING_ENV_VARS)  # a new one: add it to the drain
    config = tmp_path / "hfi.yaml"
    config.write_text("metering: {drain_batch_size: 7, events_file: /from/config.jsonl}\n")
    env = {"HFI_CONFIG": str(config), "HFI_DATABASE_URL": "sqlite:////env.db", "HFI_SPOOL_DIR": "/env/spool"}
    if events:
        env["HFI_EVENTS_FILE"] = "/from/env.jsonl"
    s = drain_settings(None, None, env)
    assert (s.database_url, s.spool_dir, s.drain_batch_size) == ("sqlite:////env.db", "/env/spool", 7)
    assert s.events_file == ("/from/env.jsonl" if events else "/from/config.jsonl")
    s = drain_settings("/opt/spool", "sqlite:////opt.db", env)
    assert (s.spool_dir, s.database_url) == ("/opt/spool", "sqlite:////opt.db")
