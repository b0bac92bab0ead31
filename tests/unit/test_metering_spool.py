"""The durable spool: append before return, per-consumer offsets, orphan replay, torn lines, compaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metering.spool import Spool


def drain(spool: Spool, consumer: str, batch: int = 100) -> list[dict]:
    out = []
    while (b := spool.read(consumer, batch)) is not None:
        out.extend(b.records)
        spool.commit(consumer, b.cursor)
    return out


def test_append_is_in_the_file_before_it_returns(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"])
    spool.append({"request_id": "a", "n": 1})
    lines = spool.active_path.read_text().splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == ["a"]
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


def test_compaction_truncates_a_fully_delivered_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger"], compact_bytes=100)
    for i in range(20):
        spool.append({"request_id": f"id-{i:04d}"})
    assert spool.active_path.stat().st_size > 100
    assert len(drain(spool, "ledger")) == 20
    assert spool.active_path.stat().st_size == 0
    spool.append({"request_id": "after"})
    assert [r["request_id"] for r in drain(spool, "ledger")] == ["after"]
    spool.close()


def test_a_stale_cursor_after_compaction_is_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["ledger", "events"], compact_bytes=1)
    spool.append({"request_id": "a"})
    old = spool.read("events", 10)
    assert old is not None
    drain(spool, "ledger")
    spool.commit("events", old.cursor)  # compacts: both consumers are done
    spool.append({"request_id": "b"})
    spool.commit("events", old.cursor)  # stale: must not skip "b"
    assert [r["request_id"] for r in drain(spool, "events")] == ["b"]
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
