"""The node drainer: one process per spool directory delivers every file there, live ones too, and the writers
hand their files over to it while it runs and take them back when it is gone; nothing skipped, nothing lost."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from hardware_profiles import load_profiles
from metering import metrics, node_drain
from metering.cli import drain_spool
from metering.config import MeteringSettings
from metering.drain import wait_until
from metering.ledger import Ledger
from metering.records import UsageRecord
from metering.service import MeteringService
from metering.spool import DRAINER_LOCK, Spool, drainer_consumers, take_drainer_lock
from tests.unit.test_metering_service import make_settings
from tests.unit.test_metering_service import usage as service_usage
from tests.unit.test_metering_spool import drain


def ids(records: list[dict]) -> list[str]:
    return [r["request_id"] for r in records]


def check_now(spool: Spool) -> bool:
    spool._next_drainer_check = 0.0  # no wait for the next periodic look
    return spool.handed_off_now()


def test_a_drainer_reads_a_live_file_up_to_its_last_complete_line(tmp_path: Path) -> None:
    writer = Spool(tmp_path, ["ledger"], fsync=False)
    writer.append({"request_id": "a"})
    drainer = Spool(tmp_path, ["ledger"], writer=False)
    assert ids(drain(drainer, "ledger")) == ["a"]
    writer.append({"request_id": "b"})
    writer.append({"request_id": "c"})
    # half a line, as a reader may see a write in progress: not read until its newline is there
    seg = writer._active
    os.pwrite(seg.fd, b'{"request_id":"d"', seg.size)
    assert ids(drain(drainer, "ledger")) == ["b", "c"]
    os.pwrite(seg.fd, b"}\n", seg.size + len(b'{"request_id":"d"'))
    assert ids(drain(drainer, "ledger")) == ["d"]
    assert writer.active_path.exists()  # live: never the drainer's to delete
    drainer.close()
    assert writer.active_path.exists()
    writer.close()


def test_a_drainer_spool_takes_no_records(tmp_path: Path) -> None:
    drainer = Spool(tmp_path, ["ledger"], writer=False)
    with pytest.raises(RuntimeError, match="drainer"):
        drainer.append({"request_id": "x"})
    drainer.close()


def test_writers_hand_over_to_a_drainer_and_take_back_without_a_gap(tmp_path: Path) -> None:
    writer = Spool(tmp_path, ["ledger"], fsync=False, rotate_bytes=200)
    for i in range(5):
        writer.append({"request_id": f"own-{i}"})
    got = drain(writer, "ledger")  # drained by itself while no drainer runs
    assert not check_now(writer)

    lock = take_drainer_lock(tmp_path, ["ledger"])
    assert lock is not None
    assert drainer_consumers(tmp_path) == ["ledger"]
    assert take_drainer_lock(tmp_path, ["ledger"]) is None  # one drainer per directory
    assert check_now(writer)
    for i in range(30):  # rotates: the files it stops writing are let go at once
        writer.append({"request_id": f"handed-{i}"})
    assert writer.files() == [writer.active_path]
    drainer = Spool(tmp_path, ["ledger"], writer=False)
    got += drain(drainer, "ledger")
    drainer.adopt_orphans()  # the let-go files are locked and, delivered, deleted
    assert sorted(tmp_path.glob("*.jsonl")) == [writer.active_path]
    writer.append({"request_id": "late"})
    got += drain(drainer, "ledger")
    drainer.close()
    os.close(lock)

    assert not check_now(writer)  # takes back from the drainer's saved offsets
    writer.append({"request_id": "mine-again"})
    got += drain(writer, "ledger")
    expected = [f"own-{i}" for i in range(5)] + [f"handed-{i}" for i in range(30)] + ["late", "mine-again"]
    assert sorted(ids(got)) == sorted(expected)  # each once (the order across files is the files' mtimes')
    writer.close()


def test_a_writer_with_consumers_the_drainer_lacks_keeps_draining(tmp_path: Path, caplog) -> None:
    writer = Spool(tmp_path, ["ledger", "events"], fsync=False)
    lock = take_drainer_lock(tmp_path, ["ledger"])
    assert lock is not None
    assert not check_now(writer)
    assert "keeps draining its own files" in caplog.text
    os.close(lock)
    writer.close()


def test_no_lock_file_means_no_drainer(tmp_path: Path) -> None:
    assert drainer_consumers(tmp_path) is None
    lock = take_drainer_lock(tmp_path, ["ledger", "events-file"])
    assert lock is not None
    os.close(lock)
    assert (tmp_path / DRAINER_LOCK).exists()
    assert drainer_consumers(tmp_path) is None  # the file stays; its lock went with the process


def usage(rid: str) -> UsageRecord:
    """100 ms on nvidia-h100 (test_metering_service's charge), under request id `rid`."""
    return service_usage(0, request_id=rid)


def ledger_ids(settings: MeteringSettings) -> list[str]:
    ledger = Ledger(settings.resolved_database_url())
    try:
        return sorted(c.request_id for c in ledger.charges())
    finally:
        ledger.close()


def test_services_leave_delivery_to_the_node_drainer_and_resume_when_it_stops(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    writers = [MeteringService(settings, load_profiles()) for _ in range(2)]
    before = [w.record(usage(f"before-{i}")).request_id for i, w in enumerate(writers)]
    for w in writers:
        assert w.flush(10)
    stop = threading.Event()
    result: list[bool] = []
    thread = threading.Thread(
        target=lambda: result.append(node_drain.run(settings, stop, finish_timeout_s=5))
    )
    thread.start()
    try:
        assert wait_until(lambda: all(w.spool.handed_off for w in writers), 10)
        during = [
            w.record(usage(f"during-{i}-{j}")).request_id for i, w in enumerate(writers) for j in range(50)
        ]
        for w in writers:
            assert w.flush(10)  # waits on the drainer's progress, saved beside each file
            assert w.consumers[0].delivered_records == 1  # only `before`: the drainer delivered the rest
            assert w.backlog()["pending_charges"] == 0
        assert ledger_ids(settings) == sorted(before + during)
        assert writers[0].cost_lookup([during[0]])[0]["costNanoUsd"] == 125_000
        assert writers[0]._pending == {}  # nothing kept for the look-up: the ledger has them
    finally:
        stop.set()
        thread.join(10)
    assert result == [True]
    assert wait_until(lambda: not any(w.spool.handed_off_now() for w in writers), 10)
    after = [w.record(usage(f"after-{i}")).request_id for i, w in enumerate(writers)]
    for w in writers:
        assert w.flush(10)
        w.close()
    assert ledger_ids(settings) == sorted(before + during + after)


def test_the_drainer_takes_over_the_files_of_closed_writers(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, drain_interval_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=node_drain.run, args=(settings, stop), kwargs={"finish_timeout_s": 5})
    thread.start()
    try:
        writer = MeteringService(settings, load_profiles())
        assert wait_until(lambda: writer.spool.handed_off_now(), 10)
        rids = [writer.record(usage(str(uuid.uuid4()))).request_id for _ in range(20)]
        writer.close()  # no wait: the drainer delivers, then deletes the file
        spool_dir = settings.resolved_spool_dir()
        assert wait_until(lambda: not list(spool_dir.glob("*.jsonl")), 10)
        assert ledger_ids(settings) == sorted(rids)
    finally:
        stop.set()
        thread.join(10)


def test_one_shot_drain_waits_for_a_running_drainer(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    spool_dir = settings.resolved_spool_dir()
    spool_dir.mkdir(parents=True)
    lock = take_drainer_lock(spool_dir, ["ledger"])
    assert lock is not None
    import socket

    held = spool_dir / f"{socket.gethostname()}-1-abc.jsonl"
    held.write_bytes(b'{"request_id":"x"}\n')
    started = time.monotonic()
    result = drain_spool(settings, 0.3, poll_s=0.05)
    assert result.held_files == [held.name] and not result.complete
    assert time.monotonic() - started < 5
    threading.Timer(0.2, held.unlink).start()  # the drainer delivers it
    assert drain_spool(settings, 5, poll_s=0.05).complete
    os.close(lock)


def _niceness(pid: int) -> int:
    """A process's nice value, from /proc (field 19 of its stat line)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_a_spawned_drainer_delivers_and_stops_when_told(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    proc = node_drain.spawn(settings, finish_timeout_s=2)
    try:
        spool_dir = settings.resolved_spool_dir()
        assert wait_until(lambda: spool_dir.is_dir() and drainer_consumers(spool_dir) == ["ledger"], 30)
        writer = MeteringService(settings, load_profiles())
        assert wait_until(lambda: writer.spool.handed_off_now(), 10)
        # it yields the CPU to the serving processes (their charges are on disk already); this one stays as it was
        assert _niceness(proc.pid) == max(os.nice(0), settings.drainer_nice)
        rids = [writer.record(usage(str(uuid.uuid4()))).request_id for _ in range(10)]
        assert writer.flush(20)
        assert ledger_ids(settings) == sorted(rids)
        writer.close()
    finally:
        started = time.monotonic()
        node_drain.finish(proc, 10)
    assert proc.returncode == 0
    assert time.monotonic() - started < 8
    assert drainer_consumers(settings.resolved_spool_dir()) is None


def test_a_killed_drainer_loses_nothing_the_writers_take_back_and_adopt(tmp_path: Path) -> None:
    """SIGKILL the drainer (a real child process) while it delivers files that writers rotate and let go: the
    writers take their files back from its saved offsets, adopt the ones it held, and every charge lands once."""
    import signal

    settings = make_settings(tmp_path, spool_rotate_bytes=4096, drain_interval_s=0.05, adopt_interval_s=0.2)
    proc = node_drain.spawn(settings, finish_timeout_s=2)
    writers: list[MeteringService] = []
    try:
        spool_dir = settings.resolved_spool_dir()
        assert wait_until(lambda: spool_dir.is_dir() and drainer_consumers(spool_dir) == ["ledger"], 30)
        writers = [MeteringService(settings, load_profiles()) for _ in range(2)]
        assert wait_until(lambda: all(w.spool.handed_off_now() for w in writers), 10)
        rids = []
        for i in range(300):  # about 800 bytes a charge: each writer rotates many times, letting files go
            w = writers[i % 2]
            rids.append(w.record(usage(str(uuid.uuid4()))).request_id)
            if i == 150:
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: not any(w.spool.handed_off_now() for w in writers), 10)
        for w in writers:
            assert w.flush(20)
        assert wait_until(
            lambda: ledger_ids(settings) == sorted(rids), 20
        )  # adopted files: within adopt_interval_s
    finally:
        if proc.poll() is None:
            node_drain.finish(proc, 5)
        for w in writers:
            w.close()
    assert ledger_ids(settings) == sorted(rids)
    assert sorted(p.name for p in settings.resolved_spool_dir().glob("*.jsonl")) == []


def test_the_follow_command_drains_until_sigterm_then_exits(tmp_path: Path) -> None:
    """`hfi metering drain --follow`, the chart's sidecar: it takes the lock, delivers a writer's charges, and
    exits 0 on SIGTERM (the kubelet's stop) within its --timeout-s."""
    import signal
    import subprocess
    import sys

    settings = make_settings(tmp_path)
    spool_dir = settings.resolved_spool_dir()
    env = {**os.environ, "HFI_SPOOL_DIR": str(spool_dir), "HFI_DATABASE_URL": settings.database_url}
    hfi = Path(sys.executable).parent / "hfi"
    proc = subprocess.Popen([str(hfi), "metering", "drain", "--follow", "--timeout-s", "5"], env=env)
    try:
        assert wait_until(lambda: spool_dir.is_dir() and drainer_consumers(spool_dir) == ["ledger"], 60)
        writer = MeteringService(settings.model_copy(update={"drain_interval_s": 1.0}), load_profiles())
        assert wait_until(lambda: writer.spool.handed_off_now(), 10)
        rids = [writer.record(usage(str(uuid.uuid4()))).request_id for _ in range(5)]
        assert writer.flush(30)  # the sidecar delivered them (at its default 1 s interval)
        assert ledger_ids(settings) == sorted(rids)
        writer.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert drainer_consumers(spool_dir) is None


def test_a_handed_off_backlog_counts_what_the_drainer_has_not_delivered_and_how_long_it_waited(
    tmp_path: Path,
) -> None:
    """`hfi status` while a node drainer delivers: the charges past its saved offsets, and the drain lag as the
    wait of the oldest of them, so a drainer that is stuck (the database down) or gone shows."""
    import datetime as dt
    import json

    settings = make_settings(tmp_path)
    spool_dir = settings.resolved_spool_dir()
    spool_dir.mkdir(parents=True)
    lock = take_drainer_lock(spool_dir, ["ledger"])  # a drainer that delivers nothing
    assert lock is not None
    writer = MeteringService(settings, load_profiles())
    try:
        assert wait_until(lambda: writer.spool.handed_off_now(), 10)
        assert writer.backlog() == {
            "pending_charges": 0,
            "pending_bytes": 0,
            "drain_lag_s": 0.0,
            "node_drainer": True,
            "unspooled_charges": 0,
        }
        started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
        for i in range(3):
            writer.record(
                service_usage(0, request_id=str(uuid.uuid4()), started_at=started + dt.timedelta(seconds=i))
            )
        backlog = writer.backlog()
        assert backlog["pending_charges"] == 3 and backlog["pending_bytes"] > 0
        assert 5.0 <= backlog["drain_lag_s"] < 60
        # Prometheus sees the same bytes (the replica's consumer reads the drainer's progress every interval)
        gauge = metrics.SPOOL_PENDING_BYTES.labels("ledger")
        assert wait_until(lambda: gauge._value.get() == backlog["pending_bytes"], 10), gauge._value.get()
        # the drainer saves its progress past them: nothing waits
        active = writer.spool.active_path
        size = writer.spool._active.size
        active.with_name(active.name + ".offsets.json").write_text(json.dumps({"ledger": size}))
        assert writer.backlog()["pending_charges"] == 0 and writer.backlog()["drain_lag_s"] == 0.0
        assert wait_until(lambda: gauge._value.get() == 0, 10)
    finally:
        writer.close()
        os.close(lock)
