"""Spool files removed from under a running process (the spool directory deleted or replaced, a file deleted): what
the consumers had not delivered is written again into the directory, made again, so that a crash afterwards still
leaves every charge on disk for the next start, and a node drainer finds the directory's files and its lock again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from hardware_profiles import load_profiles
from metering import metrics, node_drain
from metering.drain import wait_until
from metering.ledger import Ledger
from metering.service import MeteringService
from metering.spool import DRAINER_LOCK, Spool, drainer_consumers
from tests.unit.test_metering_node_drain import ledger_ids
from tests.unit.test_metering_node_drain import usage as drainer_usage
from tests.unit.test_metering_service import make_settings, usage
from tests.unit.test_metering_spool import drain, records_in

ROOT = Path(__file__).resolve().parents[2]


def removed_count() -> float:
    return metrics.METERING_ERRORS.labels("spool-removed")._value.get()


def look_now(spool: Spool) -> int:
    spool._next_files_check = 0.0  # no wait for the next periodic look
    return spool.keep_in_place()


def on_disk(directory: Path) -> list[str]:
    """The request ids in the directory's spool files, as the next start would find them."""
    return sorted(rid for path in directory.glob("*.jsonl") for rid in records_in(path))


def test_a_removed_directory_is_made_again_with_the_undelivered_lines(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, ["ledger", "events"], direct_io=False)
    try:
        for i in range(4):
            spool.append({"request_id": f"r{i}"})
        batch = spool.read("ledger", 2)  # the ledger delivered r0 and r1, the events consumer nothing
        assert batch is not None
        spool.commit("ledger", batch.cursor)
        old_active = spool.active_path
        before = removed_count()
        shutil.rmtree(directory)
        spool.append({"request_id": "r4"})  # into the removed file (the next look is not due yet)
        assert not directory.exists()

        assert look_now(spool) == 1
        assert spool.recovered_files == 1
        assert removed_count() == before + 1
        # Everything is on disk in the directory again: a crash now loses nothing.
        assert on_disk(directory) == ["r0", "r1", "r2", "r3", "r4"]
        assert spool.active_path != old_active and spool.active_path.parent == directory
        spool.append({"request_id": "r5"})
        assert "r5" in records_in(spool.active_path)
        # Each consumer gets all it had not delivered (the ledger, ahead, gets r0 and r1 again: idempotent).
        assert [r["request_id"] for r in drain(spool, "ledger")] == ["r0", "r1", "r2", "r3", "r4", "r5"]
        assert [r["request_id"] for r in drain(spool, "events")] == ["r0", "r1", "r2", "r3", "r4", "r5"]
        assert look_now(spool) == 0  # in place now
    finally:
        spool.close()
    assert on_disk(directory) == []  # all delivered: the files are deleted at close


def test_a_write_looks_by_itself_once_a_second(tmp_path: Path, monkeypatch) -> None:
    import metering.spool as spool_module

    monkeypatch.setattr(spool_module, "FILES_CHECK_S", 0.0)
    directory = tmp_path / "spool"
    spool = Spool(directory, ["ledger"], direct_io=False)
    try:
        spool.append({"request_id": "a"})
        shutil.rmtree(directory)
        spool.append({"request_id": "b"})  # finds the file gone before writing: a new one takes both
        assert spool.recovered_files == 1
        assert on_disk(directory) == ["a", "b"]
    finally:
        spool.close()


def test_a_deleted_rotated_file_is_written_again_and_the_active_one_stays(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"], rotate_bytes=200, direct_io=False)
    try:
        for i in range(6):
            spool.append({"request_id": f"r{i}", "pad": "x" * 60})
        files = sorted(tmp_path.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
        assert len(files) >= 2
        active = spool.active_path
        rotated = next(p for p in files if p != active)
        lost = records_in(rotated)
        rotated.unlink()
        assert look_now(spool) == 1
        assert spool.active_path == active
        assert on_disk(tmp_path) == [f"r{i}" for i in range(6)]
        assert sorted(r["request_id"] for r in drain(spool, "ledger")) == [f"r{i}" for i in range(6)]
        assert lost
    finally:
        spool.close()


def test_a_file_its_writer_deleted_once_delivered_is_no_loss_for_a_drainer(tmp_path: Path) -> None:
    # A writer that drains its own files (its consumers are not all the drainer's) deletes each rotated file once it
    # delivered it; the drainer, which reads it too, must not take that for a removal and write it again.
    writer = Spool(tmp_path, ["ledger"], rotate_bytes=200, hand_off=False, direct_io=False)
    drainer = Spool(tmp_path, ["ledger"], writer=False)
    try:
        for i in range(6):
            writer.append({"request_id": f"r{i}", "pad": "x" * 60})
        drainer.adopt_orphans()  # it reads the writer's files, the rotated ones too
        assert len(drainer._segments) >= 2
        drain(writer, "ledger")  # the writer's rotated files are delivered, then deleted
        before = sorted(tmp_path.glob("*.jsonl"))
        assert look_now(drainer) == 0
        assert drainer.recovered_files == 0
        assert sorted(tmp_path.glob("*.jsonl")) == before
    finally:
        drainer.close()
        writer.close()


def test_close_writes_again_what_a_removed_directory_held(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, ["ledger"], direct_io=False)
    spool.append({"request_id": "a"})
    shutil.rmtree(directory)
    spool.close()  # nothing delivered: left for the next start, in the directory made again
    assert on_disk(directory) == ["a"]
    again = Spool(directory, ["ledger"])
    try:
        assert [r["request_id"] for r in drain(again, "ledger")] == ["a"]
    finally:
        again.close()


CRASH_AFTER_REMOVAL = """
import os, shutil, sys, time
from hardware_profiles import load_profiles
from metering.service import MeteringService
from tests.unit.test_metering_service import make_settings, usage
from pathlib import Path
tmp = Path(sys.argv[1])
(tmp / "db").write_text("not a directory: the ledger cannot open")
svc = MeteringService(make_settings(tmp), load_profiles())
for i in range(3):
    svc.record(usage(i))
shutil.rmtree(tmp / "spool")
for i in range(3, 6):
    svc.record(usage(i))
deadline = time.monotonic() + 5
while getattr(svc.spool, "recovered_files", 0) < 1 and time.monotonic() < deadline:
    time.sleep(0.05)
print(getattr(svc.spool, "recovered_files", 0), flush=True)
os._exit(0)  # a crash: no close, no drain
"""


def test_charges_of_a_removed_directory_survive_a_crash_and_reach_the_ledger(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    child = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_REMOVAL, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    (tmp_path / "db").unlink()  # the database is back
    svc = MeteringService(make_settings(tmp_path), load_profiles())
    try:
        assert svc.flush(10)
        ledger = Ledger(svc.settings.resolved_database_url())
        try:
            assert len(ledger.costs([usage(i).request_id for i in range(6)])) == 6
        finally:
            ledger.close()
    finally:
        svc.close()
    assert child.stdout.strip() == "1"  # found gone by the consumers' loop (no write came after the removal)


def test_the_node_drainer_makes_its_lock_again_and_delivers_everything(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, drain_interval_s=0.05)
    spool_dir = settings.resolved_spool_dir()
    stop = threading.Event()
    result: list[bool] = []
    thread = threading.Thread(
        target=lambda: result.append(node_drain.run(settings, stop, finish_timeout_s=5))
    )
    thread.start()
    writer = MeteringService(settings, load_profiles())
    try:
        assert wait_until(lambda: writer.spool.handed_off_now(), 10)
        before = [writer.record(drainer_usage(str(uuid.uuid4()))).request_id for _ in range(10)]
        shutil.rmtree(spool_dir)  # the drainer's lock file with it
        during = [writer.record(drainer_usage(str(uuid.uuid4()))).request_id for _ in range(10)]
        # The drainer's lock is in the directory again, and the writer hands its files to it again.
        assert wait_until(lambda: drainer_consumers(spool_dir) is not None, 10)
        assert (spool_dir / DRAINER_LOCK).exists()
        assert wait_until(lambda: writer.spool.handed_off_now(), 10)
        after = [writer.record(drainer_usage(str(uuid.uuid4()))).request_id for _ in range(10)]
        assert wait_until(lambda: ledger_ids(settings) == sorted(before + during + after), 15)
    finally:
        writer.close()
        stop.set()
        thread.join(15)
    assert result == [True]


def test_keep_lock_gives_way_to_a_drainer_that_took_the_new_lock_first(tmp_path: Path) -> None:
    from metering.spool import take_drainer_lock

    directory = tmp_path / "spool"
    directory.mkdir()
    ours = take_drainer_lock(directory, ["ledger"])
    assert ours is not None
    assert node_drain.keep_lock(directory, ours, ["ledger"]) == ours  # in place: kept
    shutil.rmtree(directory)
    directory.mkdir()
    theirs = take_drainer_lock(directory, ["ledger"])  # another drainer made the directory's lock first
    try:
        assert node_drain.keep_lock(directory, ours, ["ledger"]) is None
    finally:
        os.close(theirs)  # type: ignore[arg-type]
