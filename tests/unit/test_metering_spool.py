"""The durable spool: append before return, per-consumer offsets, orphan replay, torn lines, rotation."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from metering.spool import Spool


def drain(spool: Spool, consumer: str, batch: int = 100) -> list[dict]:
    out = []
    while (b := spool.read(consumer, batch)) is not None:
        out.extend(b.records)
        spool.commit(consumer, b.cursor)
    return out


def records_in(path: Path) -> list[str]:
    """The request ids in a spool file as a reader after a crash sees them (up to the preallocated zeros)."""
    data = path.read_bytes().split(b"\0", 1)[0]
    return [json.loads(x)["request_id"] for x in data.splitlines()]


def test_append_is_in_the_file_before_it_returns(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"])
    spool.append({"request_id": "a", "n": 1})
    assert records_in(spool.active_path) == ["a"]
    spool.close()


def test_the_active_file_is_preallocated_so_an_append_does_not_change_its_length(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"], preallocate_bytes=8192)
    length = spool.active_path.stat().st_size
    assert length == 8192
    spool.append({"request_id": "a"})
    assert spool.active_path.stat().st_size == length  # fdatasync has no length change to journal
    for i in range(200):  # past the end: the file grows by another preallocation, records stay whole
        spool.append({"request_id": f"r{i:03d}", "pad": "x" * 40})
    assert spool.active_path.stat().st_size > length
    assert records_in(spool.active_path) == ["a", *[f"r{i:03d}" for i in range(200)]]
    assert [r["request_id"] for r in drain(spool, "ledger")] == records_in(spool.active_path)
    spool.close()


def test_a_preallocated_orphan_replays_up_to_its_zeros_and_a_torn_line_before_them_is_skipped(
    tmp_path: Path,
) -> None:
    orphan = tmp_path / "deadhost-3-abc.jsonl"
    orphan.write_bytes(b'{"request_id":"z1"}\n{"request_id":"z2"}\n{"request_id":"z' + bytes(4096))
    spool = Spool(tmp_path, ["ledger"])
    assert [r["request_id"] for r in drain(spool, "ledger")] == ["z1", "z2"]
    assert not orphan.exists()
    spool.close()


def test_consumers_read_at_their_own_offsets(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger", "events"])
    for i in range(5):
        spool.append({"request_id": str(i)})
    first = spool.read("ledger", 2)
    assert first is not None
    assert [r["request_id"] for r in first.records] == ["0", "1"]
    # not committed: read again gives the same batch (a retry carries the same ids)
    again = spool.read("ledger", 2)
    assert again is not None
    assert again.records == first.records
    spool.commit("ledger", first.cursor)
    assert [r["request_id"] for r in drain(spool, "ledger")] == ["2", "3", "4"]
    assert [r["request_id"] for r in drain(spool, "events")] == ["0", "1", "2", "3", "4"]
    assert spool.pending("ledger") == spool.pending("events") == 0
    spool.close()
    assert list(tmp_path.glob("*.jsonl")) == []  # fully delivered files are removed on close


def test_undelivered_file_is_replayed_by_the_next_process_from_its_offsets(tmp_path: Path) -> None:
    first = Spool(tmp_path, ["ledger", "events"])
    for i in range(4):
        first.append({"request_id": str(i)})
    batch = first.read("ledger", 3)
    assert batch is not None
    first.commit("ledger", batch.cursor)
    first.close()  # ledger is one behind, events four: the file stays
    second = Spool(tmp_path, ["ledger", "events"])
    assert [r["request_id"] for r in drain(second, "ledger")] == ["3"]
    assert [r["request_id"] for r in drain(second, "events")] == ["0", "1", "2", "3"]
    assert len(second.files()) == 1  # the replayed file is gone, our own remains
    second.close()
    assert list(tmp_path.glob("*.jsonl")) == []


def test_a_live_process_file_is_not_adopted(tmp_path: Path) -> None:
    live = Spool(tmp_path, ["ledger"])
    live.append({"request_id": "mine"})
    other = Spool(tmp_path, ["ledger"])
    assert drain(other, "ledger") == []
    assert [r["request_id"] for r in drain(live, "ledger")] == ["mine"]
    live.close()
    other.close()


def test_orphan_with_a_torn_last_line_replays_the_complete_lines(tmp_path: Path) -> None:
    orphan = tmp_path / "deadhost-1-abc.jsonl"
    orphan.write_bytes(b'{"request_id":"x1"}\n{"request_id":"x2"}\n{"request_id":"x')
    spool = Spool(tmp_path, ["ledger"])
    assert [r["request_id"] for r in drain(spool, "ledger")] == ["x1", "x2"]
    assert not orphan.exists()
    spool.close()


def test_orphan_offsets_beyond_the_file_restart_from_zero(tmp_path: Path) -> None:
    orphan = tmp_path / "deadhost-2-abc.jsonl"
    orphan.write_bytes(b'{"request_id":"y1"}\n')
    (tmp_path / "deadhost-2-abc.jsonl.offsets.json").write_text('{"ledger": 9999}')
    spool = Spool(tmp_path, ["ledger"])
    assert [r["request_id"] for r in drain(spool, "ledger")] == ["y1"]
    spool.close()


def test_rotation_starts_a_new_file_and_deletes_the_old_one_once_delivered(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger", "events"], rotate_bytes=100)
    first = spool.active_path
    for i in range(20):
        spool.append({"request_id": f"id-{i:04d}"})
    assert spool.active_path != first
    files = spool.files()
    assert len(files) > 2  # rotated files stay until every consumer is past their end
    assert [r["request_id"] for r in drain(spool, "ledger")] == [f"id-{i:04d}" for i in range(20)]
    assert all(p.exists() for p in files)  # "events" has not read them yet
    assert len(drain(spool, "events")) == 20
    assert spool.files() == [spool.active_path]
    assert sorted(tmp_path.glob("*.jsonl")) == [spool.active_path]
    assert not list(tmp_path.glob("*.offsets.json")) or all(
        p.name.startswith(spool.active_path.name) for p in tmp_path.glob("*.offsets.json")
    )
    spool.append({"request_id": "after"})
    assert [r["request_id"] for r in drain(spool, "ledger")] == ["after"]
    spool.close()


def test_a_cursor_of_a_deleted_file_is_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger", "events"], rotate_bytes=1)  # every line its own file
    spool.append({"request_id": "a"})
    old = spool.read("events", 10)
    assert old is not None
    drain(spool, "ledger")
    spool.commit("events", old.cursor)  # both consumers are done: the file goes
    assert not old.cursor.path.exists()
    spool.append({"request_id": "b"})
    spool.commit("events", old.cursor)  # again: nothing to find, nothing skipped
    assert [r["request_id"] for r in drain(spool, "events")] == ["b"]
    spool.close()


def test_async_appends_across_rotations_are_all_synced_and_kept(tmp_path: Path) -> None:
    """Each rotation fdatasyncs the old file and retires the sync process of it; callers waiting on that process
    are settled, and the next one syncs the new file."""
    spool = Spool(tmp_path, ["ledger"], rotate_bytes=300)

    async def main() -> None:
        for wave in range(6):
            await asyncio.gather(*(spool.append_async({"request_id": f"w{wave}-{i}"}) for i in range(8)))

    asyncio.run(main())
    assert spool._syncer_failed is False  # retired on purpose at each rotation, never lost
    got = [r["request_id"] for r in drain(spool, "ledger")]
    assert got == [f"w{w}-{i}" for w in range(6) for i in range(8)]
    spool.close()


def test_wait_drained_and_closed_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"], fsync=False)
    spool.append({"request_id": "a"})
    assert spool.wait_drained(["ledger"], 0.01) is False
    drain(spool, "ledger")
    assert spool.wait_drained(["ledger"], 0.01) is True
    spool.close()
    with pytest.raises(RuntimeError):
        spool.append({"request_id": "late"})


def test_long_lines_and_large_backlogs_are_read_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"], fsync=False)
    big = "x" * 200_000  # longer than one read chunk
    spool.append({"request_id": "big", "extra": big})
    for i in range(1500):
        spool.append({"request_id": f"r{i}"})
    got = drain(spool, "ledger", batch=500)
    assert got[0]["extra"] == big
    assert [r["request_id"] for r in got[1:]] == [f"r{i}" for i in range(1500)]
    spool.close()


def test_lines_keep_what_json_can_hold_and_write_other_values_as_text(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"], fsync=False)
    values = {
        "text": 'caf\u00e9 \u2603 "quoted" \n',
        "ints": [0, -1, 2**63 - 1],
        "float": 0.1,
        "none": None,
        "flag": True,
        "nested": {"a": [1, {"b": "c"}]},
        "when": dt.date(2026, 3, 1),
        "exact": Decimal("0.10"),
    }
    spool.append({"request_id": "a", **values, 3: "an integer key"})
    spool.append(
        {"request_id": "huge", "n": 2**80}
    )  # beyond 64 bits: orjson refuses, the json module writes it
    a, huge = drain(spool, "ledger")
    assert a == {
        "request_id": "a",
        **values,
        "when": "2026-03-01",
        "exact": "0.10",
        "3": "an integer key",
    }
    assert huge == {"request_id": "huge", "n": 2**80}
    spool.close()


def test_a_line_only_the_json_module_reads_is_replayed_and_a_corrupt_one_named(tmp_path: Path) -> None:
    orphan = tmp_path / "deadhost-4-abc.jsonl"  # NaN: written by an older version's json.dumps
    orphan.write_bytes(b'{"request_id":"n","x":NaN}\n{"request_id":"bad\xff"\n{"request_id":"ok"}\n')
    spool = Spool(tmp_path, ["ledger"])
    got = drain(spool, "ledger")
    assert [r.get("request_id") for r in got] == ["n", None, "ok"]
    assert math.isnan(got[0]["x"])
    # the corrupt line, whole, for its consumers to dead-letter (not a charge: no request id)
    assert got[1] == {"unreadable_spool_line": '{"request_id":"bad\\xff"', "file": orphan.name, "offset": 27}
    spool.close()


# append_async without the sync process: on the loop while fsyncs are fast, else a writer thread (group commit)


def count_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fdatasync calls of this process from now on (the file descriptor of each)."""
    import os

    calls: list[int] = []
    real_sync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real_sync(fd))[1])
    return calls


def test_append_async_lines_are_on_disk_when_it_returns_and_share_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_syncs(monkeypatch)
    spool = Spool(tmp_path, ["ledger"], sync_process=False)  # synced by a worker thread

    async def one(i: int) -> None:
        await spool.append_async({"request_id": f"r{i}"})
        assert f"r{i}" in records_in(spool.active_path)  # written and fsync'd before the await returned

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(200)))

    calls.clear()
    asyncio.run(main())
    assert sorted(r["request_id"] for r in drain(spool, "ledger")) == sorted(f"r{i}" for i in range(200))
    assert 1 <= len(calls) < 50  # 200 concurrent appends went to disk in a few groups, not one fsync each
    spool.close()


def test_append_async_of_a_cancelled_caller_is_still_written_and_close_writes_what_is_queued(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, ["ledger"], sync_process=False)
    path = spool.active_path

    async def main() -> None:
        task = asyncio.ensure_future(spool.append_async({"request_id": "left"}))
        await asyncio.sleep(0)  # queued
        task.cancel()
        queued = asyncio.ensure_future(spool.append_async({"request_id": "queued"}))
        await asyncio.sleep(0)
        spool.close()  # everything appended is in the file, synced
        await asyncio.gather(queued, return_exceptions=True)

    asyncio.run(main())
    assert records_in(path) == ["left", "queued"]
    with pytest.raises(RuntimeError):
        asyncio.run(spool.append_async({"request_id": "late"}))


def test_append_async_write_failure_reaches_the_caller_and_leaves_no_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metering.spool as spool_module

    spool = Spool(tmp_path, ["ledger"], sync_process=False)
    asyncio.run(spool.append_async({"request_id": "a"}))
    real_write_all = spool_module._write_all

    def half_then_fail(fd: int, data: bytes, offset: int) -> None:
        if any(data):  # a record, not the zeros that clear it
            real_write_all(fd, data[:5], offset)
            raise OSError(28, "No space left on device")
        real_write_all(fd, data, offset)

    monkeypatch.setattr(spool_module, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        asyncio.run(spool.append_async({"request_id": "b"}))
    monkeypatch.setattr(spool_module, "_write_all", real_write_all)
    asyncio.run(spool.append_async({"request_id": "c"}))
    assert [r["request_id"] for r in drain(spool, "ledger")] == ["a", "c"]
    spool.close()


def test_append_async_never_makes_the_loop_wait_for_a_slow_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the sync process, a worker thread runs the fdatasync: the loop serves others meanwhile."""
    import os
    import time

    spool = Spool(tmp_path, ["ledger"], sync_process=False)
    real_sync = os.fdatasync
    loop_threads: list[bool] = []

    def slow_sync(fd: int) -> None:
        loop_threads.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.05)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_sync)

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        before = ticks
        await spool.append_async({"request_id": "off-loop"})
        task.cancel()
        return ticks - before

    ran_meanwhile = asyncio.run(main())
    assert loop_threads == [False]  # synced once, not on the loop's thread
    assert ran_meanwhile > 1  # the loop kept running while the thread waited for the slow fsync
    assert [r["request_id"] for r in drain(spool, "ledger")] == ["off-loop"]
    spool.close()


def test_append_async_lines_written_in_one_loop_iteration_share_one_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_syncs(monkeypatch)
    spool = Spool(tmp_path, ["ledger"], sync_process=False)

    async def one(i: int) -> None:
        await spool.append_async({"request_id": f"b{i}"})
        assert f"b{i}" in records_in(spool.active_path)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(10)))  # a batch's requests finishing together
        await one(10)  # alone in its iteration

    asyncio.run(main())
    assert len(calls) == 2
    assert [r["request_id"] for r in drain(spool, "ledger")] == [f"b{i}" for i in range(11)]
    spool.close()


def test_append_async_lines_of_an_unfinished_loop_iteration_are_written_by_close(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"])
    writes = []

    async def main() -> list[BaseException | None]:
        tasks = [asyncio.ensure_future(spool.append_async({"request_id": f"c{i}"})) for i in range(3)]
        await asyncio.sleep(0)  # the appends are waiting for the end of this iteration
        writes.append(records_in(spool.active_path))
        spool.close()  # before the iteration's sync ran: close writes their lines and settles them
        return await asyncio.gather(*tasks, return_exceptions=True)

    assert asyncio.run(main()) == [None, None, None]
    assert writes == [[]]
    again = Spool(tmp_path, ["ledger"])  # the next process replays them
    assert [r["request_id"] for r in drain(again, "ledger")] == ["c0", "c1", "c2"]
    again.close()


# The loop's own fdatasync, while the disk is quick (`inline_sync_below_s`)


def test_append_async_on_a_quick_disk_is_synced_by_the_loop_once_per_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_syncs(monkeypatch)
    spool = Spool(tmp_path, ["ledger"], inline_sync_below_s=10.0, direct_io=False)
    loop_thread: list[bool] = []

    async def one(i: int) -> None:
        await spool.append_async({"request_id": f"q{i}"})
        assert f"q{i}" in records_in(spool.active_path)

    async def main() -> None:
        loop_thread.append(threading.current_thread() is threading.main_thread())
        await asyncio.gather(*(one(i) for i in range(10)))
        await one(10)

    asyncio.run(main())
    assert loop_thread == [True] and len(calls) == 2  # one fdatasync per iteration, in this process
    assert spool.inline_syncs == 2 and spool._syncer is None  # no child was needed
    assert spool.inline_sync_s is not None and spool.inline_sync_s < 10.0
    assert [r["request_id"] for r in drain(spool, "ledger")] == [f"q{i}" for i in range(11)]
    spool.close()


def test_a_slow_disk_moves_the_sync_off_the_loop_and_probes_bring_it_back_once_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Syncs slower than `inline_sync_below_s` on average: the next iterations go to the sync process (the loop
    serves on); one iteration every INLINE_PROBE_S tries the loop's own again, and quick ones bring it back."""
    import os
    import time

    from metering import spool as spool_module

    real_sync = os.fdatasync
    slow = {"on": True}

    def sync(fd: int) -> None:
        if slow["on"]:
            time.sleep(0.03)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", sync)
    monkeypatch.setattr(spool_module, "INLINE_PROBE_S", 0.02)
    spool = Spool(tmp_path, ["ledger"], inline_sync_below_s=0.01, direct_io=False)

    async def main() -> tuple[list[int], int]:
        counts = []
        for i in range(3):  # the first one inline (slow), then the child, well within a probe interval
            await spool.append_async({"request_id": f"s{i}"})
            counts.append(spool.inline_syncs)
        slow["on"] = False
        n = 3
        while spool.inline_sync_s >= 0.01 and n < 100:  # a probe each interval pulls the average down
            await asyncio.sleep(0.03)
            await spool.append_async({"request_id": f"s{n}"})
            n += 1
        before = spool.inline_syncs
        for _ in range(5):  # quick on average again: every iteration on the loop
            await spool.append_async({"request_id": f"s{n}"})
            n += 1
        counts.append(spool.inline_syncs - before)
        return counts, n

    counts, n = asyncio.run(main())
    assert counts[:3] == [1, 1, 1]  # after the slow one, the sync process took over
    assert spool._syncer is not None
    assert n < 100 and counts[3] == 5
    assert [r["request_id"] for r in drain(spool, "ledger")] == [f"s{i}" for i in range(n)]
    spool.close()


# The sync process (metering/syncer.py): the default for an event loop whose disk is slow


def no_fsync_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any fdatasync in this process fails: what still works was synced by the child."""
    import os

    def refuse(fd: int) -> None:
        raise AssertionError("fdatasync on the event loop's process")

    monkeypatch.setattr(os, "fdatasync", refuse)


def test_append_async_is_synced_by_the_child_process_one_request_per_loop_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metering.syncer import SyncProcess

    spool = Spool(tmp_path, ["ledger"])
    requests = []
    real_request = SyncProcess.request
    monkeypatch.setattr(
        SyncProcess, "request", lambda self, seq, w: (requests.append(len(w)), real_request(self, seq, w))
    )
    no_fsync_here(monkeypatch)

    async def one(i: int) -> None:
        await spool.append_async({"request_id": f"p{i}"})
        assert f"p{i}" in records_in(spool.active_path)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(10)))
        await one(10)

    asyncio.run(main())
    assert requests == [10, 1]
    child = spool._syncer.process
    assert child.poll() is None  # it serves the next appends
    monkeypatch.undo()
    spool.close()
    assert child.wait(5) == 0  # the pipe closed: it ended
    assert [r["request_id"] for r in drain(Spool(tmp_path, ["ledger"]), "ledger")] == [
        f"p{i}" for i in range(11)
    ]


def test_a_lost_sync_process_is_replaced_by_syncing_in_this_process(tmp_path: Path) -> None:
    from metering import metrics

    lost = metrics.METERING_ERRORS.labels("spool-sync-process")
    before = lost._value.get()
    spool = Spool(tmp_path, ["ledger"])

    async def main() -> None:
        await spool.append_async({"request_id": "before"})
        spool._syncer.process.kill()
        spool._syncer.process.wait()
        await asyncio.gather(*(spool.append_async({"request_id": f"after{i}"}) for i in range(3)))
        await spool.append_async({"request_id": "later"})

    asyncio.run(main())
    assert spool._syncer_failed and not spool._syncer.alive
    assert (
        lost._value.get() == before + 1
    )  # counted for an alert: hfi_metering_errors{stage="spool-sync-process"}
    assert records_in(spool.active_path) == ["before", "after0", "after1", "after2", "later"]
    spool.close()


def test_close_syncs_what_the_child_has_not_confirmed_and_settles_its_callers(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"])

    async def main() -> list[BaseException | None]:
        await spool.append_async({"request_id": "first"})  # the child runs
        tasks = [asyncio.ensure_future(spool.append_async({"request_id": f"c{i}"})) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the iteration's lines are written and the child asked
        assert len(spool._syncer._pending) == 1
        spool.close()
        return await asyncio.gather(*tasks, return_exceptions=True)

    assert asyncio.run(main()) == [None, None, None]
    assert [r["request_id"] for r in drain(Spool(tmp_path, ["ledger"]), "ledger")] == [
        "first",
        "c0",
        "c1",
        "c2",
    ]


def test_an_fsync_error_of_the_child_reaches_every_waiting_caller() -> None:
    import errno
    import os

    from metering.syncer import SyncProcess

    read_end, write_end = os.pipe()  # fdatasync of a pipe fails: EINVAL

    async def main() -> list[BaseException | None]:
        loop = asyncio.get_running_loop()
        syncer = SyncProcess(read_end, loop, lambda s: None)
        futures = [loop.create_future() for _ in range(3)]
        syncer.request(1, futures[:2])
        syncer.request(2, futures[2:])
        results = await asyncio.gather(*futures, return_exceptions=True)
        syncer.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, OSError) and r.errno == errno.EINVAL for r in results)
    os.close(read_end)
    os.close(write_end)


def test_close_from_another_thread_while_the_loop_runs(tmp_path: Path) -> None:
    import threading

    spool = Spool(tmp_path, ["ledger"])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(spool.append_async({"request_id": "a"}), loop).result(5)
        child = spool._syncer.process
        spool.close()  # this thread, not the loop's
        assert child.wait(5) == 0
        late = asyncio.run_coroutine_threadsafe(spool.append_async({"request_id": "late"}), loop)
        with pytest.raises(RuntimeError, match="closed"):
            late.result(5)
        assert asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "alive"), loop).result(5) == "alive"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    again = Spool(tmp_path, ["ledger"], sync_process=False)  # the next process replays what was promised
    assert [r["request_id"] for r in drain(again, "ledger")] == ["a"]
    again.close()


def test_a_sync_process_started_ahead_serves_the_first_loop_that_appends(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"])
    spool.start_sync_process()
    syncer = spool._syncer
    assert syncer is not None and syncer.loop is None and syncer.alive

    async def main() -> None:
        await asyncio.gather(*(spool.append_async({"request_id": f"r{i}"}) for i in range(5)))
        assert spool._syncer is syncer and syncer.loop is asyncio.get_running_loop()

    asyncio.run(main())
    assert records_in(spool.active_path) == [f"r{i}" for i in range(5)]
    spool.close()
    assert syncer.process.poll() is not None  # ended with the spool


def test_a_sync_process_started_ahead_is_running_and_has_synced_once_on_return(tmp_path: Path) -> None:
    """A replica takes traffic right after its constructor: the child's start (10-20 ms) is paid there, not by
    the first request. On return the child has answered one sync, so it is past its interpreter's start."""
    spool = Spool(tmp_path, ["ledger"])
    spool.start_sync_process()
    syncer = spool._syncer
    assert syncer is not None and syncer.alive and syncer.process.poll() is None
    child = Path(f"/proc/{syncer.process.pid}/io").read_text()
    syscw = int(next(line.split()[1] for line in child.splitlines() if line.startswith("syscw")))
    assert syscw >= 1  # its acknowledgement of the first sync
    spool.close()


def test_waiting_for_a_sync_process_that_died_returns_at_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"])
    syncer = spool._start_syncer(None)
    assert syncer is not None
    syncer.process.kill()
    syncer.process.wait()
    started = time.monotonic()
    assert not syncer.wait_ready(5)
    assert time.monotonic() - started < 2
    spool.close()


def test_a_sync_process_started_ahead_and_never_used_ends_with_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"])
    spool.start_sync_process()
    syncer = spool._syncer
    assert syncer is not None
    spool.append({"request_id": "a"})  # a thread's append syncs on its own
    spool.close()
    assert syncer.process.poll() is not None


def test_one_slow_sync_among_quick_ones_keeps_the_syncs_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy local disk now and then takes far longer for one sync (measured under load here: 1-2 % over 1 ms, up to
    5 ms, the median 0.3 ms). That is no slow disk: the loop keeps syncing its own lines (the median of its last
    syncs decides; a moving average that one spike pulled over the threshold handed them to the child for a while,
    which cost throughput). A disk slow sync after sync still goes to the child."""
    import os

    real_sync = os.fdatasync
    delays = iter([0.0] * 6 + [0.2] + [0.0] * 6 + [0.03] * 20)

    def sync(fd: int) -> None:
        time.sleep(next(delays, 0.03))
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", sync)
    spool = Spool(tmp_path, ["ledger"], inline_sync_below_s=0.01, direct_io=False)

    async def main() -> list[int]:
        inline = []
        for i in range(13):  # six quick, the spike, six quick: each on the loop
            await spool.append_async({"request_id": f"q{i}"})
            inline.append(spool.inline_syncs)
        for i in range(13, 30):  # then slow each time: once the median is slow, the child takes over
            await spool.append_async({"request_id": f"q{i}"})
        return inline

    inline = asyncio.run(main())
    assert inline == list(range(1, 14))  # every one of the first 13 on the loop
    assert spool.inline_sync_s is not None and spool.inline_sync_s >= 0.01
    assert spool.inline_syncs < 30 and spool._syncer is not None
    assert [r["request_id"] for r in drain(spool, "ledger")] == [f"q{i}" for i in range(30)]
    spool.close()


@pytest.mark.parametrize("slow", [False, True])
def test_a_spool_that_syncs_on_its_loop_times_the_disk_at_start_and_starts_a_child_only_for_a_slow_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: bool
) -> None:
    """With `inline_sync_below_s`, `start_sync_process` times one fdatasync that writes a block (as an append's
    does): a quick disk needs no child (the loop syncs), a slow one gets it started ahead as before. Either way the
    file still reads as its records."""
    import os

    spool = Spool(tmp_path, ["ledger"], inline_sync_below_s=0.01, direct_io=False)
    spool.append({"request_id": "before"})
    if slow:
        real_sync = os.fdatasync

        def slow_sync(fd: int) -> None:
            time.sleep(0.03)
            real_sync(fd)

        monkeypatch.setattr(os, "fdatasync", slow_sync)
    spool.start_sync_process()
    assert spool.inline_sync_s is not None and (spool.inline_sync_s >= 0.01) == slow
    assert (spool._syncer is not None) == slow
    assert spool.inline_syncs == 0  # no append was synced by it

    async def main() -> None:
        await spool.append_async({"request_id": "after"})

    asyncio.run(main())
    assert spool.inline_syncs == (0 if slow else 1)
    assert records_in(spool.active_path) == ["before", "after"]
    assert [r["request_id"] for r in drain(spool, "ledger")] == ["before", "after"]
    spool.close()


def test_values_orjson_cannot_write_come_back_exactly(tmp_path: Path) -> None:
    """An integer beyond 64 bits goes through the json module both ways (orjson would read it back as a float);
    datetimes and dates are written the same either way."""
    when = dt.datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=dt.timezone.utc)
    big = {"id": "big", "extra": {"n": -(2**63) - 1}, "at": when, "day": when.date()}
    plain = {"id": "plain", "extra": {"n": 2**63 - 1}, "at": when, "day": when.date()}
    spool = Spool(tmp_path, ["c"])
    try:
        spool.append(big)
        spool.append(plain)
        got = drain(spool, "c")
    finally:
        spool.close()
    assert [r["extra"]["n"] for r in got] == [-(2**63) - 1, 2**63 - 1]
    assert all(type(r["extra"]["n"]) is int for r in got)
    assert {r["at"] for r in got} == {"2026-03-01T12:00:00.000005Z"}
    assert {r["day"] for r in got} == {"2026-03-01"}


# Direct I/O: a durable write is one O_DIRECT | O_DSYNC write of whole blocks


def direct_spool(tmp_path: Path, **kwargs) -> Spool:
    spool = Spool(tmp_path, ["ledger"], inline_sync_below_s=10.0, **kwargs)
    if not spool.direct_io:
        spool.close()
        pytest.skip(f"the filesystem of {tmp_path} takes no O_DIRECT")
    return spool


def test_direct_writes_rewrite_the_last_block_and_keep_every_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Iterations of every size (a part of a block, many blocks, across preallocation and rotation), the loop's
    and a thread's: each is one direct write and needs no fdatasync, and the files read as every record in order, with
    zeros after the last one (the padding of the last block is the preallocated zeros again)."""
    spool = direct_spool(tmp_path, preallocate_bytes=8192, rotate_bytes=16 * 1024)
    calls = count_syncs(monkeypatch)
    rotations = []
    real_rotate = spool._rotate
    monkeypatch.setattr(spool, "_rotate", lambda: (rotations.append(1), real_rotate())[1])
    sizes = [1, 3, 1, 7, 20, 1, 2, 40, 5, 1]
    names: list[str] = []

    async def main() -> None:
        n = 0
        for size in sizes * 3:
            batch = [f"d{n + i:04d}" + "x" * (37 * ((n + i) % 11)) for i in range(size)]
            n += size
            names.extend(batch)
            await asyncio.gather(*(spool.append_async({"request_id": r}) for r in batch))

    asyncio.run(main())
    spool.append({"request_id": "thread-0"})
    names.append("thread-0")
    # no fdatasync but the one of each full file as it is closed (`_rotate`)
    assert spool.direct_writes == len(sizes) * 3 + 1 and rotations and len(calls) == len(rotations)
    active = spool.active_path.read_bytes()
    end = active.rindex(b"\n") + 1
    assert active[end:] == bytes(len(active) - end) and len(active) % 4096 == 0
    assert [r["request_id"] for r in drain(spool, "ledger", 10_000)] == names
    spool.close()


def test_a_direct_write_after_a_buffered_one_in_the_same_block_keeps_both(tmp_path: Path) -> None:
    """The sync process's way (a plain write, fdatasync'd elsewhere) and the loop's (direct) take turns in one
    block: the direct write carries the buffered line's bytes again, unchanged."""
    spool = direct_spool(tmp_path)
    spool._write(b'{"request_id":"buffered"}\n', 1)  # as _sync_tick writes for the sync process
    spool.append({"request_id": "direct"})
    spool._write(b'{"request_id":"buffered-2"}\n', 1)
    spool.append({"request_id": "direct-2"})
    assert spool.direct_writes == 2
    assert records_in(spool.active_path) == ["buffered", "direct", "buffered-2", "direct-2"]
    spool.close()


@pytest.mark.parametrize("where", ["open", "write"])
def test_a_filesystem_without_direct_io_gets_write_and_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """O_DIRECT refused when the file is opened (tmpfs before Linux 6.6) or at the first write (EINVAL: an
    alignment the device does not take): the spool writes and fdatasyncs from then on, nothing lost."""
    import errno
    import os

    from metering import spool as spool_module

    if not spool_module._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    real_open, real_pwrite = os.open, os.pwrite
    direct_fds: set[int] = set()

    def fake_open(path, flags, *args):
        if flags & spool_module._O_DIRECT:
            if where == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, *args)
            direct_fds.add(fd)
            return fd
        return real_open(path, flags, *args)

    def fake_pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    calls = count_syncs(monkeypatch)
    spool = Spool(tmp_path, ["ledger"], inline_sync_below_s=10.0)
    spool.append({"request_id": "a"})

    async def main() -> None:
        await asyncio.gather(*(spool.append_async({"request_id": r}) for r in ("b", "c")))

    asyncio.run(main())
    assert not spool.direct_io and spool.direct_writes == 0 and len(calls) == 2
    assert records_in(spool.active_path) == ["a", "b", "c"]
    spool.close()


@pytest.mark.parametrize("records", [0, 1])
def test_with_direct_io_the_start_up_probe_times_a_direct_write_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, records: int
) -> None:
    """The quick-disk probe of `start_sync_process` times the write the loop will make (direct, no fdatasync):
    the last block again, or a block of zeros at an empty file's start; the file reads as before."""
    spool = direct_spool(tmp_path)
    for i in range(records):
        spool.append({"request_id": f"r{i}"})
    before = spool.active_path.read_bytes()
    writes = spool.direct_writes
    calls = count_syncs(monkeypatch)
    spool.start_sync_process()
    assert calls == [] and spool._syncer is None and spool.inline_sync_s is not None
    assert spool.direct_writes == writes  # a probe, not a record's write
    assert spool.active_path.read_bytes() == before
    assert records_in(spool.active_path) == [f"r{i}" for i in range(records)]
    spool.close()
