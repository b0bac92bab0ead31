"""Exactly once through failures: the database stopped mid-run, and a process killed with unsent charges."""

from __future__ import annotations

import datetime as dt
import json
import os
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
from metering.errors import LedgerUnavailable
from metering.ledger import Ledger
from metering.records import Charge, UsageRecord
from metering.service import MeteringService

UTC = dt.timezone.utc
CATALOG = load_profiles()


def usage(i: int) -> UsageRecord:
    return UsageRecord(
        str(uuid.uuid4()),
        dt.datetime.now(UTC),
        "org/m",
        "abc",
        "feature-extraction",
        "nvidia-a10g",
        1_000_000 * (i % 97 + 1) + i,
        billed_account=f"acct-{i % 3}",
    )


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


def test_database_outage_mid_run_every_charge_arrives_once(
    postgres_server: PostgresServer, postgres_db_url: str, tmp_path: Path
) -> None:
    svc = MeteringService(settings(postgres_db_url, tmp_path / "spool"), CATALOG)
    recorded: list[Charge] = []
    try:
        recorded += [svc.record(usage(i)) for i in range(40)]
        assert svc.flush(15)
        postgres_server.stop()
        try:
            recorded += [svc.record(usage(i)) for i in range(40, 120)]  # requests keep succeeding
            assert not svc.flush(0.3)  # they wait in the spool
            with pytest.raises(LedgerUnavailable) as info:
                svc.usage_report()
            assert info.value.status_code == 503
        finally:
            postgres_server.start()
        recorded += [svc.record(usage(i)) for i in range(120, 140)]
        assert svc.flush(30)
        stored = {c.request_id: c for c in svc.charges()}
    finally:
        svc.close()
    assert len(stored) == len(recorded) == 140
    assert {rid: c.cost_nanousd for rid, c in stored.items()} == {
        c.request_id: c.cost_nanousd for c in recorded
    }


CHILD = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    from hardware_profiles import load_profiles
    from metering.config import MeteringSettings
    from metering.records import UsageRecord
    from metering.service import MeteringService
    import datetime as dt

    spool_dir, n, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # an unreachable database: nothing leaves the spool before the crash
    # record_async: synced by the event loop itself (any disk counts as quick)
    # (with direct I/O where the disk has it), by write + fdatasync on the loop, or by the sync process
    inline = {"record_async_child": 0.0}.get(how, 10.0)
    s = MeteringSettings(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none", spool_dir=spool_dir,
                         retry_initial_s=60, retry_max_s=60, spool_inline_sync_below_s=inline,
                         spool_direct_io=how != "record_async_fdatasync")
    svc = MeteringService(s, load_profiles())
    usages = [UsageRecord(f"crash-{i:04d}", dt.datetime.now(dt.timezone.utc), "org/m", "abc", "text-to-image",
                          "nvidia-h100", 1_000_000 * (i + 1)) for i in range(n)]
    syncer = None
    if how == "record":
        out = [svc.record(u).to_dict() for u in usages]
    else:  # the ingress's way: an event loop, batches of concurrent callers, one fdatasync per batch

        async def main():
            done = []
            for k in range(0, n, 7):
                done += await asyncio.gather(*(svc.record_async(u) for u in usages[k : k + 7]))
            if how == "record_async_child":
                assert svc.spool._syncer is not None and svc.spool._syncer.alive
            else:
                assert svc.spool.inline_syncs == (n + 6) // 7
                direct = svc.spool.direct_io and how == "record_async"
                assert svc.spool.direct_writes == ((n + 6) // 7 if direct else 0)
            return done

        out = [c.to_dict() for c in asyncio.run(main())]
        if svc.spool._syncer is not None:
            syncer = svc.spool._syncer.process.pid
    sys.stdout.write(json.dumps({"charges": out, "syncer": syncer}))
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no close(), no flush, no atexit
    """
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("postgres_db_url")


@pytest.mark.parametrize("how", ["record", "record_async", "record_async_fdatasync", "record_async_child"])
def test_spool_left_by_a_crash_replays_on_start_without_duplicates(
    db_url: str, tmp_path: Path, how: str
) -> None:
    spool_dir = tmp_path / "spool"
    n = 30
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(spool_dir), str(n), how],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == -9, proc.stderr
    child = json.loads(proc.stdout)
    promised = [Charge.from_dict(d) for d in child["charges"]]
    if child["syncer"] is not None:  # the sync process saw its pipe close and ended with its parent
        assert wait_until(lambda: not _running(child["syncer"]), 10)
    assert len(list(spool_dir.glob("*.jsonl"))) == 1
    # Some of them had reached the ledger before the crash (drained, offset not saved): they must not double.
    ledger = Ledger(db_url)
    ledger.insert(promised[::3])
    svc = MeteringService(settings(db_url, spool_dir), CATALOG)
    try:
        assert svc.flush(30)
        stored = {c.request_id: c for c in svc.charges()}
    finally:
        svc.close()
    assert stored == {c.request_id: c for c in promised}
    assert list(spool_dir.glob("*.jsonl")) == []  # replayed and removed
    # a second start has nothing left to replay
    again = MeteringService(settings(db_url, spool_dir), CATALOG)
    try:
        assert again.flush(10)
    finally:
        again.close()
    assert ledger.count() == n
    ledger.close()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended (its parent, the killed child, is gone too: init reaps it)
