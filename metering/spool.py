"""The durable spool: charges are appended here (JSON lines, fsync'd) before record() returns.

One file per process, `<host>-<pid>-<random>.jsonl` in the spool directory, held under an exclusive `flock`
for the life of the process. Named consumers (the ledger, each event sink) read it at their own offsets, kept
beside the file in `<file>.offsets.json`, and commit an offset only after they delivered what they read.
Delivery is therefore at-least-once, and every consumer is idempotent by request id (the ledger's unique key,
the event id).

- Start-up: files of other processes whose lock can be taken (their process is gone) are adopted and replayed
  first, from their saved offsets; once every consumer is past their end they are deleted.
- Compaction: when every consumer has read the whole active file and it is at least `compact_bytes` long, it
  is truncated to zero (offsets saved first, so a crash in between only replays: never skips).
- A torn last line (a crash mid-append, before record() returned) is skipped with a warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"


@dataclass
class _Segment:
    path: Path
    fd: int  # held open (and flock'ed) for the life of the segment
    active: bool
    size: int
    offsets: dict[str, int] = field(default_factory=dict)
    generation: int = 0

    @property
    def offsets_path(self) -> Path:
        return self.path.with_name(self.path.name + ".offsets.json")


@dataclass(frozen=True)
class Cursor:
    """Where a consumer will be once it commits the batch it read."""

    path: Path
    generation: int
    offset: int


@dataclass
class Batch:
    """Records read by one consumer, and the cursor to commit once they are delivered."""

    records: list[dict[str, Any]]
    cursor: Cursor


class Spool:
    """An append-only, fsync'd JSON-lines spool with per-consumer offsets (see the module docstring)."""

    def __init__(
        self,
        directory: Path | str,
        consumers: list[str],
        *,
        fsync: bool = True,
        compact_bytes: int = 1024 * 1024,
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.consumers = list(consumers)
        self.fsync = fsync
        self.compact_bytes = compact_bytes
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sync_lock = threading.Lock()
        self._write_seq = 0
        self._synced_seq = 0
        self._closed = False
        self._segments: list[_Segment] = self._adopt_orphans()
        self._active = self._create_active()
        self._segments.append(self._active)

    # Set-up

    def _create_active(self) -> _Segment:
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.directory / (name + ".creating")
        fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked before it gets a name others would adopt
        path = self.directory / (name + SUFFIX)
        os.rename(tmp, path)
        _fsync_dir(self.directory)
        return _Segment(path, fd, True, 0, dict.fromkeys(self.consumers, 0))

    def _adopt_orphans(self) -> list[_Segment]:
        adopted = []
        for path in sorted(self.directory.glob("*" + SUFFIX), key=_mtime):
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # a live process owns it
                continue
            if not path.exists():  # deleted by its adopter between our open and our lock
                os.close(fd)
                continue
            size = os.fstat(fd).st_size
            seg = _Segment(path, fd, False, size)
            saved = _read_offsets(seg.offsets_path)
            seg.offsets = {c: saved.get(c, 0) if saved.get(c, 0) <= size else 0 for c in self.consumers}
            log.info("metering spool: replaying %s (%d bytes) left by a previous process", path.name, size)
            adopted.append(seg)
        return adopted

    # Writing

    def append(self, record: dict[str, Any]) -> None:
        """Append one record; with fsync on, it is on disk on return (concurrent callers share fsyncs)."""
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            if self._closed:
                raise RuntimeError("spool is closed")
            fd = self._active.fd
            try:
                _write_all(fd, line)
            except OSError:
                os.ftruncate(fd, self._active.size)  # no torn fragment for the next line to be glued to
                raise
            self._active.size += len(line)
            self._write_seq += 1
            seq = self._write_seq
        if self.fsync:
            with self._sync_lock:
                if self._synced_seq < seq:
                    target = self._write_seq  # every write numbered up to here is in the file already
                    os.fsync(fd)
                    self._synced_seq = target

    # Reading

    def read(self, consumer: str, max_records: int) -> Batch | None:
        """The next records for `consumer` (at most `max_records`), or None when it has read everything."""
        with self._lock:
            for seg in self._segments:
                start = seg.offsets[consumer]
                if start >= seg.size:
                    continue
                records, end = _read_lines(seg, start, max_records)
                return Batch(records, Cursor(seg.path, seg.generation, end))
        return None

    def commit(self, consumer: str, cursor: Cursor) -> None:
        """Record that `consumer` delivered everything up to `cursor`; deletes or compacts finished files."""
        with self._lock:
            seg = next((s for s in self._segments if s.path == cursor.path), None)
            if seg is None or seg.generation != cursor.generation:
                return
            seg.offsets[consumer] = max(seg.offsets[consumer], cursor.offset)
            _write_offsets(seg)
            if all(seg.offsets[c] >= seg.size for c in self.consumers):
                if not seg.active:
                    self._remove(seg)
                elif seg.size >= self.compact_bytes:
                    self._compact(seg)
            self._changed.notify_all()

    def _remove(self, seg: _Segment) -> None:
        seg.path.unlink(missing_ok=True)
        seg.offsets_path.unlink(missing_ok=True)
        os.close(seg.fd)
        self._segments.remove(seg)

    def _compact(self, seg: _Segment) -> None:
        seg.offsets = dict.fromkeys(self.consumers, 0)
        _write_offsets(seg)  # first: a crash before the truncation replays (never skips)
        os.ftruncate(seg.fd, 0)
        seg.size = 0
        seg.generation += 1

    def pending(self, consumer: str) -> int:
        """Bytes `consumer` has not delivered yet."""
        with self._lock:
            return sum(max(0, s.size - s.offsets[consumer]) for s in self._segments)

    def wait_drained(self, consumers: list[str], timeout_s: float) -> bool:
        """Wait until every named consumer has delivered everything appended so far; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            targets = {id(s): s.size for s in self._segments}
            while True:
                behind = [
                    s
                    for s in self._segments
                    for c in consumers
                    if id(s) in targets and s.offsets[c] < min(targets[id(s)], s.size)
                ]
                if not behind:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)

    def files(self) -> list[Path]:
        """The spool files this process holds (adopted ones first)."""
        with self._lock:
            return [s.path for s in self._segments]

    @property
    def active_path(self) -> Path:
        return self._active.path

    def close(self) -> None:
        """Release the files: fully delivered ones are deleted, the rest stay for the next start to replay."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for seg in list(self._segments):
                if all(seg.offsets[c] >= seg.size for c in self.consumers):
                    self._remove(seg)
                else:
                    os.close(seg.fd)
            self._segments.clear()
            self._changed.notify_all()


def _read_lines(seg: _Segment, start: int, max_records: int) -> tuple[list[dict[str, Any]], int]:
    # about 1 KiB a record; a line longer than the chunk doubles it until the line fits
    chunk = max(64 * 1024, max_records * 1024)
    while True:
        data = os.pread(seg.fd, min(chunk, seg.size - start), start)
        if b"\n" in data or start + len(data) >= seg.size:
            break
        chunk *= 2
    records: list[dict[str, Any]] = []
    pos = 0
    while len(records) < max_records:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl]
        pos = nl + 1
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            log.error("metering spool: skipping a corrupt line in %s at byte %d", seg.path.name, start + pos)
    end = start + pos
    if not records and pos == 0 and start + len(data) >= seg.size and not seg.active:
        # a torn last line left by a crash mid-append: that record() never returned, so nothing was promised
        log.warning(
            "metering spool: skipping a torn last line of %d bytes in %s", seg.size - start, seg.path.name
        )
        end = seg.size
    return records, end


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_offsets(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
        return {str(k): int(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_offsets(seg: _Segment) -> None:
    tmp = seg.offsets_path.with_name(seg.offsets_path.name + ".tmp")
    tmp.write_text(json.dumps(seg.offsets))
    os.replace(tmp, seg.offsets_path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
