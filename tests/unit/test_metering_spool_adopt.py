"""Periodic adoption: a running spool takes over the files of processes that went away after it started.

A second `Spool` in the same directory stands for a second process: flock locks belong to the open file, so two
spools of one process exclude each other exactly as two processes do.
"""

from __future__ import annotations

import threading
from pathlib import Path

from metering.drain import SpoolConsumer, wait_until
from metering.spool import Spool


def drain(spool: Spool, consumer: str = "ledger", batch: int = 100) -> list[str]:
    out = []
    while (b := spool.read(consumer, batch)) is not None:
        out.extend(r["request_id"] for r in b.records)
        spool.commit(consumer, b.cursor)
    return out


def orphan_of(directory: Path, ids: list[str], consumers: tuple[str, ...] = ("ledger",)) -> Path:
    """A spool file left by a process that went away with `ids` undelivered (its spool closed = its lock gone)."""
    gone = Spool(directory, list(consumers), preallocate_bytes=4096)
    for rid in ids:
        gone.append({"request_id": rid})
    path = gone.active_path
    gone.close()  # undelivered: the file stays, unlocked, as after a kill
    assert path.exists()
    return path


def test_a_running_spool_adopts_a_file_orphaned_after_it_started_and_deletes_it_once_delivered(
    tmp_path: Path,
) -> None:
    running = Spool(tmp_path, ["ledger"])
    running.append({"request_id": "mine"})
    orphan = orphan_of(tmp_path, ["o1", "o2", "o3"])
    assert drain(running) == ["mine"]  # not seen before a re-scan
    assert running.adopt_orphans() == 1
    assert orphan in running.files()
    assert drain(running) == ["o1", "o2", "o3"]
    assert not orphan.exists()
    assert not orphan.with_name(orphan.name + ".offsets.json").exists()
    assert running.adopt_orphans() == 0  # nothing left to take
    running.close()
    assert list(tmp_path.glob("*.jsonl")) == []


def test_a_file_of_a_live_process_is_never_adopted(tmp_path: Path) -> None:
    running = Spool(tmp_path, ["ledger"])
    live = Spool(tmp_path, ["ledger"])
    live.append({"request_id": "theirs"})
    assert running.adopt_orphans() == 0
    assert drain(running) == []
    assert drain(live) == ["theirs"]
    live.close()
    running.close()


def test_an_adopted_file_replays_from_its_saved_offsets_for_each_consumer(tmp_path: Path) -> None:
    running = Spool(tmp_path, ["ledger", "events"])
    gone = Spool(tmp_path, ["ledger", "events"], preallocate_bytes=4096)
    for i in range(4):
        gone.append({"request_id": f"r{i}"})
    batch = gone.read("ledger", 3)
    assert batch is not None
    gone.commit("ledger", batch.cursor)  # the ledger had three of them, the events none
    gone.close()
    assert running.adopt_orphans() == 1
    assert drain(running, "ledger") == ["r3"]
    assert len(running.files()) == 2  # not deleted while the events consumer is behind
    assert drain(running, "events") == ["r0", "r1", "r2", "r3"]
    assert len(running.files()) == 1
    running.close()


def test_a_fully_delivered_orphan_is_deleted_at_once(tmp_path: Path) -> None:
    running = Spool(tmp_path, ["ledger"])
    empty = tmp_path / "deadhost-7-abc.jsonl"  # a process that recorded nothing: preallocated zeros only
    empty.write_bytes(bytes(4096))
    delivered = (
        tmp_path / "deadhost-8-abc.jsonl"
    )  # one killed after its last commit, before it deleted the file
    delivered.write_bytes(b'{"request_id":"done"}\n' + bytes(4096))
    (tmp_path / "deadhost-8-abc.jsonl.offsets.json").write_text('{"ledger": 22}')
    assert running.adopt_orphans() == 2
    assert not empty.exists() and not delivered.exists()
    assert list(tmp_path.glob("deadhost-*")) == []
    assert running.files() == [running.active_path]
    assert drain(running) == []
    running.close()


def test_two_live_spools_never_adopt_the_same_file(tmp_path: Path) -> None:
    first, second = Spool(tmp_path, ["ledger"]), Spool(tmp_path, ["ledger"])
    orphans = {f"o{n:02d}": orphan_of(tmp_path, [f"o{n:02d}-{i}" for i in range(3)]) for n in range(24)}
    counts: dict[str, int] = {}
    barrier = threading.Barrier(2)

    def adopt(name: str, spool: Spool) -> None:
        barrier.wait()
        counts[name] = sum(spool.adopt_orphans() for _ in range(5))

    threads = [threading.Thread(target=adopt, args=a) for a in (("first", first), ("second", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts["first"] + counts["second"] == len(orphans)
    got_first, got_second = drain(first), drain(second)
    assert not set(got_first) & set(got_second)
    assert sorted(got_first + got_second) == sorted(f"{o}-{i}" for o in orphans for i in range(3))
    assert not any(p.exists() for p in orphans.values())
    first.close()
    second.close()


def test_a_closed_spool_adopts_nothing(tmp_path: Path) -> None:
    running = Spool(tmp_path, ["ledger"])
    running.close()
    orphan = orphan_of(tmp_path, ["late"])
    assert running.adopt_orphans() == 0
    assert orphan.exists()
    later = Spool(tmp_path, ["ledger"])  # still there for the next process
    assert drain(later) == ["late"]
    later.close()


def test_the_ledger_consumer_adopts_orphans_periodically(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"])
    delivered: list[str] = []
    consumer = SpoolConsumer(
        "ledger",
        spool,
        lambda records: delivered.extend(r["request_id"] for r in records),
        batch_size=10,
        interval_s=0.01,
        retry_initial_s=0.01,
        retry_max_s=0.05,
        adopt_interval_s=0.02,
    ).start()
    try:
        spool.append({"request_id": "mine"})
        orphan = orphan_of(tmp_path, ["p1", "p2"])
        assert wait_until(lambda: not orphan.exists(), 30)
        assert sorted(delivered) == ["mine", "p1", "p2"]
    finally:
        consumer.stop()
        spool.close()
    assert list(tmp_path.glob("*.jsonl")) == []
