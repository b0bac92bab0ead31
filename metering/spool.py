"""The durable spool: charges are appended here (JSON lines, fsync'd) before record() returns.

One file per process, `<host>-<pid>-<random>.jsonl` in the spool directory, held under an exclusive `flock`
for the life of the process. Named consumers (the ledger, each event sink) read it at their own offsets, kept
beside the file in `<file>.offsets.json`, and commit an offset only after they delivered what they read.
Delivery is therefore at-least-once, and every consumer is idempotent by request id (the ledger's unique key,
the event id).

- Start-up: files of other processes whose lock can be taken (their process is gone) are adopted and replayed
  first, from their saved offsets; once every consumer is past their end they are deleted. `adopt_orphans()`
  does the same later, for files whose process went away since (the ledger consumer calls it periodically).
- Rotation: once the active file holds `rotate_bytes` of records, it is fdatasync'd and a new active file takes
  its place; the old one is deleted once every consumer is past its end. A file is only ever appended to, never
  rewritten, so another process can read it while it grows (the node drainer, below).
- Preallocation: the active file is kept ahead of its records by `preallocate_bytes` of written zeros, so an
  append rewrites blocks already on disk and `fdatasync` flushes only them (no change of the file's length for
  the filesystem to journal: measured here about 40 % less time per append than fsync after an O_APPEND write).
  The records end at the first zero byte (JSON escapes control characters).
- A durable append (`append`, and an event loop's appends once per loop iteration) is one write with direct I/O
  (O_DIRECT | O_DSYNC) where the filesystem takes it: the file's last block not yet full is written again in
  front of the new lines, the same bytes (`_write_direct`), so the file is still only appended to; else a
  write and an fdatasync. The loop does it itself while the disk is quick (a local disk), else a small child
  process fdatasyncs a plain write (metering/syncer.py), so that a slow disk never stops the loop
  (`append_async`).
- A torn last line (a crash mid-append, before record() returned) is skipped with a warning. Any other line that
  is not JSON is read as a record that only names it (`unreadable_line`), which each consumer dead-letters.
- Files removed from under it (the directory deleted or replaced, a file deleted, while the process runs): the
  spool looks at most every FILES_CHECK_S (`keep_in_place`, at a write and from the consumers' loops) whether each
  of its files is still at its path, and where one is not, makes the directory again and writes what its consumers
  had not delivered into a new file there (`_recover`), and a new active file for a lost active one; so a crash
  later still leaves every charge on disk for the next start. Counted in `hfi_metering_errors{stage=
  "spool-removed"}`. A consumer ahead of another gets that stretch again (idempotent, as every replay).
- A full disk: appends go on into the active file's preallocated zeros; a new file that cannot be made leaves
  the active one in use (`_rotate`), and an append that needs space the disk lacks fails whole (a write that
  failed is cleared), for the caller to hold the record and offer it again (MeteringService).

The node drainer (metering/node_drain.py): one process per spool directory may take its drainer lock
(`.drainer.lock`) and deliver every file there, the live ones too (read without their lock, up to their last
complete line; their offsets kept in the same `.offsets.json` files). While it holds the lock, a writing process
whose consumers the drainer also has hands its files over (`handed_off`): its consumers stand by, it lets go of
each file it stops writing (rotated, or adopted), and the drainer deletes the file once delivered. The spool's
CPU then stays out of the serving process (its GIL is the event loop's and the model's). When the lock is free
again, the writer picks up its own files from the saved offsets and adopts the ones let go. A hand-over in
either direction may deliver a batch twice, never skip one: every consumer is idempotent by request id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import fcntl
import json
import logging
import mmap
import os
import socket
import statistics
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from core.utc import as_utc
from metering import metrics
from metering.syncer import SyncProcess, settle

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
DRAINER_LOCK = ".drainer.lock"  # held by the node drainer of the directory (metering/node_drain.py)
DRAINER_CHECK_S = 0.5  # how often a writer's consumers look for one
# The loop's own syncs are quick while the median of its last INLINE_WINDOW is: a spike (on the test VM's disk under
# load, 1-2 % of them over 1 ms, up to 5 ms, the median 0.3 ms) is no slow disk, and a moving average that one spike
# pulled over the threshold sent the loop's lines to the sync process for a while each time, which cost 6 % of
# throughput (benchmarks/README).
INLINE_WINDOW = 15
INLINE_PROBE_S = 0.5  # once they are slow, how often the loop tries one again
ROTATE_RETRY_S = 1.0  # a new file could not be made (a full disk): how soon the spool tries again
# How often the spool looks whether its files are still in its directory (`keep_in_place`).
FILES_CHECK_S = 1.0
# A durable write with direct I/O (`Spool._write_direct`) covers whole blocks of this many bytes, at offsets that are
# multiples of it: the logical block size of every disk and filesystem that takes O_DIRECT, and a page.
DIRECT_BLOCK = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere no direct I/O, the spool writes and fdatasyncs
# datetimes as RFC 3339 (UTC with a Z, a naive one taken as UTC), dates as ISO dates: written in C
_ORJSON_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


@dataclass
class _Segment:
    path: Path
    fd: int  # held open (and flock'ed) for the life of the segment
    active: bool  # this process writes it
    size: int  # bytes of records; an active file is longer, zero-filled past this (Spool.preallocate_bytes)
    offsets: dict[str, int] = field(default_factory=dict)
    allocated: int = 0  # file length (active files: written zeros ahead of `size`)
    # Another process writes it (a drainer's view): `size` grows, and it is never this process's to delete.
    live: bool = False
    # The active file opened again with O_DIRECT | O_DSYNC (-1: none), and the bytes of its last block that is not
    # full (from the block's start up to `size`), which a direct write rewrites in front of the new lines.
    direct_fd: int = -1
    tail: bytes = b""

    def close(self) -> None:
        os.close(self.fd)
        self.close_direct()

    def close_direct(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd, self.tail = -1, b""

    @property
    def offsets_path(self) -> Path:
        return self.path.with_name(self.path.name + ".offsets.json")


@dataclass(frozen=True)
class Cursor:
    """Where a consumer will be once it commits the batch it read."""

    path: Path
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
        rotate_bytes: int = 32 * 1024 * 1024,
        preallocate_bytes: int = 1024 * 1024,
        sync_process: bool = True,
        inline_sync_below_s: float = 0.0,
        direct_io: bool = True,
        writer: bool = True,
        hand_off: bool = True,
    ) -> None:
        """`writer` False: a node drainer's spool, which writes nothing and reads every file in the directory,
        the live ones too. `hand_off` False: a writer that drains its own files even while a drainer runs (its
        consumers are not all the drainer's). `inline_sync_below_s` > 0: an event loop's appends are fdatasync'd
        on the loop itself while that typically takes less than this (the median of the last INLINE_WINDOW:
        `append_async`); 0: never. `direct_io`: a write that must be on disk before it returns (`append`, the loop's
        own) is one write with O_DIRECT and O_DSYNC where the filesystem takes them (`_write_direct`), instead of a
        write and an fdatasync."""
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.consumers = list(consumers)
        self.fsync = fsync
        self.rotate_bytes = max(1, rotate_bytes)
        self.writer = writer
        self.hand_off = hand_off and writer
        # True while a node drainer delivers this process's files (the module docstring); checked by the
        # consumers' threads at most every DRAINER_CHECK_S.
        self.handed_off = False
        self._next_drainer_check = 0.0
        self._warned_drainer = False
        self.preallocate_bytes = _blocks(max(DIRECT_BLOCK, preallocate_bytes))
        self.direct_io = bool(direct_io and fsync and _O_DIRECT)
        self.direct_writes = 0  # how many durable writes were direct (for tests and diagnostics)
        self._direct_buffer: mmap.mmap | None = None  # page-aligned, as O_DIRECT wants
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sync_lock = threading.Lock()
        self._write_seq = 0
        self._synced_seq = 0
        self._closed = False
        self._queue_cv = threading.Condition()  # guards the ticks, the sync process and closing
        # append_async: the lines and waiting callers of each loop's current iteration
        self._ticks: dict[asyncio.AbstractEventLoop, tuple[list[bytes], list[asyncio.Future[None]]]] = {}
        # ... whose fdatasync a child process runs, so that the loop never waits for the disk (metering/syncer.py):
        # for the first loop that appends (an ingress has one). Other loops, or all if it is off or fails, hand
        # the fdatasync to a worker thread.
        self.sync_process = sync_process
        # ... unless the disk is quick: then the loop syncs them itself (`_sync_inline`)
        self.inline_sync_below_s = inline_sync_below_s
        self.inline_sync_s: float | None = None  # the median of the loop's last INLINE_WINDOW own syncs
        self._inline_times: deque[float] = deque(maxlen=INLINE_WINDOW)
        self.inline_syncs = 0  # how many (for tests and diagnostics)
        self._inline_probe_at = 0.0
        self._syncer: SyncProcess | None = None
        self._syncer_failed = False
        self._syncer_file = 0  # which active file the sync process syncs (one more at each rotation)
        self._file_number = 0
        self._rotate_retry_at = 0.0  # a new file could not be made: not tried again before this
        self._next_files_check = time.monotonic() + FILES_CHECK_S  # `keep_in_place`
        self._directory_id = _file_id(self.directory)  # ... which tells a directory made again from ours
        self._warned_recover = False
        self.recovered_files = 0  # files written again after theirs was removed (for tests and diagnostics)
        self._segments: list[_Segment] = self._adopt_orphans()
        self._active: _Segment | None = None
        if writer:
            self._active = self._create_active()
            self._segments.append(self._active)

    # Set-up

    def _create_active(self) -> _Segment:
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.directory / (name + ".creating")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked before it gets a name others would adopt
            seg = _Segment(tmp, fd, True, 0, dict.fromkeys(self.consumers, 0))
            self._preallocate(seg, self.preallocate_bytes)  # ENOSPC on a full disk
            seg.path = self.directory / (name + SUFFIX)
            os.rename(tmp, seg.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        if self.direct_io:
            try:
                seg.direct_fd = os.open(seg.path, os.O_WRONLY | _O_DIRECT | os.O_DSYNC)
            except OSError as err:  # a filesystem without direct I/O (tmpfs before Linux 6.6)
                self._no_direct_io(err)
        return seg

    def _no_direct_io(self, err: OSError) -> None:
        log.info("metering spool: no direct I/O in %s (%s); writes are fdatasync'd", self.directory, err)
        self.direct_io = False

    def _preallocate(self, seg: _Segment, length: int) -> None:
        """Make the file `length` bytes (whole blocks) of written zeros (fsync'd), so that appending a record
        rewrites blocks already on disk and fdatasync flushes just them: no file-size change for the filesystem to
        journal (nor for a direct write, which covers the record's last block whole)."""
        length = _blocks(length)
        if length > seg.allocated:
            _write_all(seg.fd, bytes(length - seg.allocated), seg.allocated)
            seg.allocated = length
        if self.fsync:
            os.fsync(seg.fd)

    def _adopt_orphans(self, skip: frozenset[Path] = frozenset()) -> list[_Segment]:
        """Take every spool file in the directory whose lock can be taken (its process is gone), but `skip`;
        a drainer also reads the files of live processes (`live` segments, not locked).

        The exclusive flock makes this safe between live processes: a file is adopted by at most one of them
        (flock locks belong to the open file, so even a second Spool in this process cannot take ours)."""
        adopted = []
        for path in sorted(self.directory.glob("*" + SUFFIX), key=_mtime):
            if path in skip:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            live = not _try_lock(fd)  # a live process owns it
            if live and self.writer:
                os.close(fd)
                continue
            if not path.exists():  # deleted by its adopter (or its writer) between our open and our lock
                os.close(fd)
                continue
            records_end, complete_end = _scan(fd)
            size = complete_end if live else records_end
            seg = _Segment(path, fd, False, size, live=live)
            saved = _read_offsets(seg.offsets_path)
            seg.offsets = {c: saved.get(c, 0) if saved.get(c, 0) <= size else 0 for c in self.consumers}
            if not live:
                log.info(
                    "metering spool: replaying %s (%d bytes) left by a previous process", path.name, size
                )
            adopted.append(seg)
        return adopted

    def adopt_orphans(self) -> int:
        """Adopt the spool files left since start-up by processes that are gone (a pod on the same volume
        deleted, a replica killed): replayed from their saved offsets like the files found at start-up, and
        deleted once every consumer is past their end. Returns how many files were adopted.

        Called periodically by the ledger consumer (`metering.adopt_interval_s`), so that a spool orphaned on a
        shared directory (a node's hostPath, a ReadWriteMany claim) does not wait for a new process to start
        there. A file already fully delivered is deleted at once.

        A drainer also takes up the files of live processes, and takes over (locks) each one whose process has
        let it go: from then on its size is final, and it is deleted once delivered."""
        with self._lock:
            if self._closed:
                return 0
            known = frozenset(s.path for s in self._segments)
            live = [s for s in self._segments if s.live]
        found = self._adopt_orphans(known)  # outside the lock: reading a large orphan must not block appends
        released = [s for s in live if _try_lock(s.fd)]
        with self._lock:
            if self._closed:  # close() ran meanwhile: let the files go (unlocked) for the next adopter
                for seg in found:
                    os.close(seg.fd)
                return 0
            at = self._segments.index(self._active) if self._active is not None else len(self._segments)
            self._segments[at:at] = found  # before our own file: the older charges go first
            for seg in released:
                if seg in self._segments:
                    seg.live = False
                    seg.size = max(seg.size, _scan(seg.fd)[0])  # final: its writer let it go
            for seg in [*found, *released]:
                if (
                    seg in self._segments
                    and not seg.live
                    and all(seg.offsets[c] >= seg.size for c in self.consumers)
                ):
                    self._remove(seg)
            self._changed.notify_all()
        return len(found)

    # Handing over to a node drainer

    def handed_off_now(self) -> bool:
        """Whether a node drainer delivers this process's files now (the module docstring), checked at most every
        DRAINER_CHECK_S; hands them over, or takes them back, when that changed. Called by the consumers."""
        if not self.hand_off:
            return False
        now = time.monotonic()
        if now < self._next_drainer_check:
            return self.handed_off
        self._next_drainer_check = now + DRAINER_CHECK_S
        drainer = drainer_consumers(self.directory)
        present = drainer is not None and set(self.consumers) <= set(drainer)
        if drainer and not present and not self._warned_drainer:  # ([]: its lock file is being written)
            self._warned_drainer = True
            log.warning(
                "metering spool: the node drainer of %s delivers to %s, this process to %s: it keeps draining its "
                "own files",
                self.directory,
                sorted(drainer),
                sorted(self.consumers),
            )
        take_back = False
        with self._lock:
            if self._closed or present == self.handed_off:
                return self.handed_off
            if present:
                for seg in [s for s in self._segments if not s.active]:
                    self._release(seg)
                log.info("metering spool: a node drainer delivers %s from now on", self._active_name())
            else:  # the drainer is gone: on from where it got to
                for seg in self._segments:
                    saved = _read_offsets(seg.offsets_path)
                    for c in self.consumers:
                        seg.offsets[c] = max(seg.offsets[c], min(saved.get(c, 0), seg.size))
                take_back = True
                log.info(
                    "metering spool: no node drainer any more; %s drains its own files", self._active_name()
                )
            self.handed_off = present
        if take_back:
            self.adopt_orphans()  # what this process let go meanwhile and the drainer did not finish
        return present

    def _active_name(self) -> str:
        return self._active.path.name if self._active is not None else str(self.directory)

    def _release(self, seg: _Segment) -> None:
        """Let go of a file this process no longer writes (its lock with it), for the drainer to take over."""
        seg.close()
        self._segments.remove(seg)

    # Files removed from under the spool

    def keep_in_place(self) -> int:
        """Where a file of this spool is no longer at its path (the directory deleted or replaced, the file
        deleted) while the process runs: make the directory again, and write the lines its consumers had not all
        delivered into a new file there (a new active file too, for a lost active one). Until then those lines
        were only in a file nobody else can find: a crash would lose them, and a node drainer cannot see them.
        Looks at most every FILES_CHECK_S (called by each write and by the consumers' loops); returns how many
        files were written again."""
        if time.monotonic() < self._next_files_check:
            return 0
        with self._lock:
            if self._closed:
                return 0
            return self._keep_in_place_locked()

    def _keep_in_place_locked(self) -> int:
        self._next_files_check = time.monotonic() + FILES_CHECK_S
        # Another process's file (a drainer's view) that is gone from a directory still in place was deleted by its
        # writer once it had delivered it (a writer that keeps draining its own files): nothing to write again.
        replaced = _file_id(self.directory) != self._directory_id
        lost = [seg for seg in self._segments if (replaced or not seg.live) and _moved(seg)]
        if not lost:
            return 0
        old = self._active if self._active in lost else None
        recovered = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._directory_id = _file_id(self.directory)
            for seg in lost:
                if seg is not old:
                    recovered += self._recover(seg)
            if old is not None:  # last, so that a failure before leaves it in use
                new = self._create_active()
                try:
                    recovered += self._recover(old)
                except BaseException:
                    new.close()
                    new.path.unlink(missing_ok=True)
                    raise
                # (the sync process of the old one is retired at its next tick, as at a rotation)
                old.close_direct()
                self._active = new
                self._segments.append(new)
                self._file_number += 1
                self._segments.remove(old)
                old.close()
        except OSError as err:  # a full disk, a directory that cannot be made: tried again at the next look
            if not self._warned_recover:
                self._warned_recover = True
                log.error(
                    "metering spool: files of %s were removed and cannot be written again yet: %s",
                    self.directory,
                    err,
                )
        else:
            self._warned_recover = False
        self._changed.notify_all()
        return recovered

    def _recover(self, seg: _Segment) -> int:
        """Write what the consumers of lost `seg` have not all delivered (complete lines) into a new file of the
        directory, in its place in the order of delivery, and let `seg` go (never deleting its path: something
        else may be there now). A file another live process writes is that process's to recover. Under the
        lock; raises OSError when the new file cannot be made."""
        if seg.live:
            if not _try_lock(seg.fd):  # its writer still holds it: it writes it again itself
                seg.close()
                self._segments.remove(seg)
                return 0
            seg.live = False  # its writer let go of it meanwhile: ours now
            seg.size = max(seg.size, _scan(seg.fd)[0])
        start = min((seg.offsets[c] for c in self.consumers), default=seg.size)
        data = os.pread(seg.fd, seg.size - start, start) if seg.size > start else b""
        data = data[: data.rfind(b"\n") + 1]  # (a torn last line: its append never returned)
        at = self._segments.index(seg)
        if data:
            name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp = self.directory / (name + ".creating")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _write_all(fd, data, 0)
                if self.fsync:
                    os.fsync(fd)
                path = self.directory / (name + SUFFIX)
                os.rename(tmp, path)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.directory)
            new = _Segment(path, fd, False, len(data), dict.fromkeys(self.consumers, 0), allocated=len(data))
            self._segments.insert(at, new)
            if self.handed_off:
                self._release(new)  # the node drainer takes it up at its next look at the directory
        metrics.observe_error("spool-removed")
        self.recovered_files += 1
        log.warning(
            "metering spool: %s was removed from %s while in use; %s",
            seg.path.name,
            self.directory,
            f"its {len(data)} undelivered bytes are written again in {path.name}"
            if data
            else "all was delivered",
        )
        if seg is not self._active:  # (the active one is let go by the caller, once a new one is in place)
            seg.close()
            self._segments.remove(seg)
        return 1

    # Writing

    def append(self, record: dict[str, Any]) -> None:
        """Append one record; with fsync on, it is on disk on return (concurrent callers share fsyncs)."""
        self._write_durably(encode_line(record), 1)

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """`append` for several records, with one durable write: all of them are on disk on return, or none is
        (a failed write is cleared)."""
        if records:
            self._write_durably(b"".join(encode_line(r) for r in records), len(records))

    async def append_async(self, record: dict[str, Any]) -> None:
        """`append` for an event loop: the line is on disk (fsync'd) when this returns.

        The lines of one loop iteration (a batch's requests finish together) are written at its end with one
        pwrite and synced together: by the loop itself while the disk's fdatasync is quick (`inline_sync_below_s`:
        a local disk), else by the sync process (`sync_process`, the default: no thread of this process needs the
        GIL for it), else by a worker thread, so that a slow disk (a network volume) never stops the loop. With
        fsync off, the line is written at once.

        Why the loop itself on a quick disk: the hand-over to the sync process and back costs a request more than
        the disk does there, the child's wake-up and its acknowledgement each waiting for a core on a busy machine
        (benchmarks/metering_overhead.py, local/tiny-sentiment at 8 clients, both ways side by side on the same
        disk, 14 rounds: 6.6 % more throughput with the loop's own 0.24 ms fdatasync, 95 % interval 2.5-10.7 %).

        Two write paths in all, each for its callers: `append` blocks its thread for the fsync (threads, the CLI,
        tests); this one blocks the loop it serves only for a quick disk's sync.
        """
        line = encode_line(record)
        if not self.fsync:
            self._write(line, 1)
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._queue_cv:  # close() may run on another thread: it writes the ticks it finds
            if self._closed:
                raise RuntimeError("spool is closed")
            tick = self._ticks.get(loop)
            if tick is None:
                tick = self._ticks[loop] = ([], [])
                loop.call_soon(self._sync_tick, loop)
            tick[0].append(line)
            tick[1].append(future)
        await future

    def _sync_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """At the end of a loop iteration: write its lines with one pwrite, then have them synced off the loop."""
        with self._queue_cv:
            tick = self._ticks.pop(loop, None)
        if tick is None:  # close() wrote it
            return
        lines, waiters = tick
        data = b"".join(lines)
        if self._sync_here():
            settle(waiters, self._write_inline(data, len(lines)))
            return
        try:
            seq = self._write(data, len(lines))
        except Exception as err:
            settle(waiters, err)
            return
        syncer = self._syncer_for(loop)
        if syncer is not None:
            syncer.request(seq, waiters)
            return
        synced = loop.run_in_executor(None, self._sync, seq)
        synced.add_done_callback(lambda f: settle(waiters, None if f.cancelled() else f.exception()))

    def _sync_here(self) -> bool:
        """Whether the loop syncs this iteration's lines itself: while the median of its last syncs is under
        `inline_sync_below_s`; once it is not, one sync every INLINE_PROBE_S (`_timed`) finds out whether the disk is
        quick again."""
        if self.inline_sync_below_s <= 0:
            return False
        if self.inline_sync_s is None or self.inline_sync_s < self.inline_sync_below_s:
            return True
        return time.monotonic() >= self._inline_probe_at

    def _write_inline(self, data: bytes, lines: int) -> BaseException | None:
        """Write and sync on the calling loop (`_write_durably`); the error for its callers. Timed into
        `inline_sync_s`."""
        started = time.perf_counter()
        try:
            self._write_durably(data, lines)
            return None
        except Exception as err:
            return err
        finally:
            self._timed(time.perf_counter() - started)
            self.inline_syncs += 1

    def _timed(self, took: float) -> None:
        """Count one of this process's own syncs into `inline_sync_s`; slow, the next probe is INLINE_PROBE_S
        away."""
        self._inline_times.append(took)
        self.inline_sync_s = statistics.median(self._inline_times)
        if self.inline_sync_s >= self.inline_sync_below_s:
            self._inline_probe_at = time.monotonic() + INLINE_PROBE_S

    def _syncer_for(self, loop: asyncio.AbstractEventLoop) -> SyncProcess | None:
        """The sync process of `loop` (started on first use, or by `start_sync_process`), or None: this loop syncs
        on its own."""
        syncer = self._syncer
        if syncer is not None and syncer.loop is None:
            with self._queue_cv:  # started ahead: the first loop that appends takes it
                syncer.attach(loop)
        if syncer is not None and self._syncer_file != self._file_number and syncer.loop is loop:
            self._retire(syncer)  # it syncs a file rotated away since
            syncer = None
        if syncer is not None:
            return syncer if syncer.alive and syncer.loop is loop else None
        if not self.sync_process or self._syncer_failed:
            return None
        syncer = self._start_syncer(loop)
        return syncer if syncer is not None and syncer.alive and syncer.loop is loop else None

    def start_sync_process(self) -> None:
        """Start the sync process now rather than at the first `append_async`, and wait until it has synced once: a
        child's start takes 10-20 ms, which the first request would otherwise wait for. The first event loop that
        appends takes it. With `inline_sync_below_s`, one timed fdatasync of a block of the file first: on a
        quick disk the loop syncs its lines itself, and no child is started (it starts later if the disk turns
        slow)."""
        if self.inline_sync_below_s > 0 and self.writer and self.fsync and self._disk_is_quick():
            return
        if self.writer and self.fsync and self.sync_process and not self._syncer_failed:
            syncer = self._start_syncer(None)
            if syncer is not None:
                syncer.wait_ready()

    def _disk_is_quick(self) -> bool:
        """Time one durable write of a block the way the loop's appends make theirs (a direct write where the file
        has one, else a write and an fdatasync), with nothing new in it: the last block again (`_write_direct` of
        no data), or a zero byte over the zeros past the records. Into `inline_sync_s`; whether it was below the
        threshold."""
        with self._lock:
            seg = self._active
            if seg is None or self._closed or seg.size >= seg.allocated:
                return False
            started = time.perf_counter()
            try:
                if not (seg.direct_fd >= 0 and self._write_direct(seg, b"")):
                    os.pwrite(seg.fd, b"\0", seg.size)
                    os.fdatasync(seg.fd)
            except OSError:
                return False
            self._timed(time.perf_counter() - started)
        return self.inline_sync_s is not None and self.inline_sync_s < self.inline_sync_below_s

    def _start_syncer(self, loop: asyncio.AbstractEventLoop | None) -> SyncProcess | None:
        """The sync process, started now for `loop` (None: the first loop that appends) unless there is one."""
        with self._queue_cv:
            if self._syncer is None and not self._syncer_failed and not self._closed:
                try:
                    self._syncer = SyncProcess(self._active.fd, loop, self._syncer_lost)  # type: ignore[union-attr]
                    self._syncer_file = self._file_number
                except Exception:
                    log.exception("metering spool: could not start the sync process; syncing in this process")
                    metrics.observe_error("spool-sync-process")
                    self._syncer_failed = True
            return self._syncer

    def _retire(self, syncer: SyncProcess) -> None:
        """End the sync process of a rotated file (on its loop). Its callers' lines are on disk already: the
        rotation fdatasync'd that file before a new one took its place."""
        with self._queue_cv:
            if self._syncer is syncer:
                self._syncer = None
        pending = syncer.take_pending()
        syncer.close()
        for waiters in pending:
            settle(waiters, None)

    def _syncer_lost(self, syncer: SyncProcess) -> None:
        """The sync process went away: sync what it had not confirmed here, and from now on without it."""
        self._syncer_failed = True
        metrics.observe_error("spool-sync-process")
        self._sync_pending(syncer)

    def _sync_pending(self, syncer: SyncProcess) -> None:
        """Sync here what `syncer` had not confirmed, and settle its callers (on their loop)."""
        pending = syncer.take_pending()
        if not pending:
            return
        error: BaseException | None = None
        try:
            self._sync(self._write_seq)
        except Exception as err:
            error = err
        for waiters in pending:
            _settle_on(syncer.loop, waiters, error)

    def _write_tick(self, lines: list[bytes]) -> BaseException | None:
        """Write and sync one iteration's lines; the error for their callers (record_async logs each charge)."""
        try:
            self._write_durably(b"".join(lines), len(lines))
        except Exception as err:
            return err
        return None

    def _write_durably(self, data: bytes, lines: int) -> None:
        """Write whole lines that are on disk when this returns: one direct write (`_write_direct`) where the
        filesystem takes it, else a write and an fdatasync."""
        seq, direct = self._put(data, lines, self.direct_io)
        if not direct:  # (a direct write does not make earlier writes durable: `_synced_seq` stays)
            self._sync(seq)

    def _write(self, data: bytes, lines: int) -> int:
        """Write whole lines at the end of the active file; return the write's sequence number."""
        return self._put(data, lines, False)[0]

    def _put(self, data: bytes, lines: int, direct: bool) -> tuple[int, bool]:
        """`_write`, and `direct`: with direct I/O where the file has it (`_write_direct`); whether it did (then
        the lines are on disk)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("spool is closed")
            if self._active is not None and time.monotonic() >= self._next_files_check:
                self._keep_in_place_locked()
            seg = self._active
            if seg is None:
                raise RuntimeError("a node drainer's spool takes no records")
            if seg.size + len(data) > seg.allocated:
                self._preallocate(seg, seg.allocated + max(self.preallocate_bytes, len(data)))
            try:
                direct = direct and seg.direct_fd >= 0 and self._write_direct(seg, data)
                if direct:
                    self.direct_writes += 1
                else:
                    _write_all(seg.fd, data, seg.size)
            except OSError:
                try:  # no torn fragment for the next line to be glued to
                    _write_all(seg.fd, bytes(len(data)), seg.size)
                except OSError:
                    log.exception("metering spool: could not clear a failed write in %s", seg.path.name)
                raise
            seg.size += len(data)
            if seg.direct_fd >= 0:
                seg.tail = (seg.tail + data)[len(seg.tail) + len(data) - seg.size % DIRECT_BLOCK :]
            self._write_seq += lines
            seq = self._write_seq
            if seg.size >= self.rotate_bytes:
                self._rotate()
            return seq, direct

    def _write_direct(self, seg: _Segment, data: bytes) -> bool:
        """Write `data` at the end of `seg` with one O_DIRECT | O_DSYNC write, on disk when it returns; False when
        the filesystem refuses direct I/O (this spool stops trying it; the caller writes and syncs instead).

        Direct I/O writes whole blocks from a block's start: the file's last block not yet full (`seg.tail`) is
        written again in front of the new lines, the same bytes it already holds, and zeros after them, over the
        zeros preallocated there. One write, no page cache, and on a disk with FUA no cache flush: on the test
        VM's disk, back to back beside two busy cores, 0.09 ms and 25 us of CPU against 0.14 ms and 45-65 us for a
        write and an fdatasync; with writes milliseconds apart (as under load) 0.18-0.21 ms either way, so what it
        saves there is CPU. Readers (another process's page cache) see the new bytes: Linux keeps the two
        coherent. Raises OSError for a write that failed otherwise (the caller clears what it left)."""
        start = seg.size - len(seg.tail)
        end = len(seg.tail) + len(data)
        # no data at a block's start (`_disk_is_quick`): one block of zeros
        length = _blocks(end) or DIRECT_BLOCK
        buf = self._direct_buffer
        if buf is None or len(buf) < length:
            if buf is not None:
                buf.close()
            buf = self._direct_buffer = mmap.mmap(-1, max(length, 16 * DIRECT_BLOCK))
        view = memoryview(buf)
        try:
            view[: len(seg.tail)] = seg.tail
            view[len(seg.tail) : end] = data
            view[end:length] = bytes(length - end)
            done = 0
            while done < length:  # a short direct write ends on a block boundary
                try:
                    done += os.pwrite(seg.direct_fd, view[done:length], start + done)
                except OSError as err:
                    if err.errno != errno.EINVAL or done:
                        raise
                    # alignment or the filesystem: never again (nothing was written)
                    self._no_direct_io(err)
                    seg.close_direct()
                    return False
        finally:
            view.release()
        return True

    def _rotate(self) -> None:
        """A new active file in place of the current one, which is fdatasync'd first (so every line written to
        it is on disk, whichever sync its callers wait for) and never written again. Under the lock.

        Where the new file cannot be made (a full disk), the current one stays active, and grows while it can:
        the lines just written are good, so their callers are not told of a failure they did not have. Tried
        again ROTATE_RETRY_S later."""
        old = self._active
        assert old is not None
        if time.monotonic() < self._rotate_retry_at:
            return
        try:
            new = self._create_active()
        except OSError as err:
            if not self._rotate_retry_at:  # once, not at every retry
                log.warning("metering spool: no new file (%s): %s stays in use", err, old.path.name)
            self._rotate_retry_at = time.monotonic() + ROTATE_RETRY_S
            return
        if self._rotate_retry_at:
            log.info("metering spool: a new file again, after %s grew past its size", old.path.name)
            self._rotate_retry_at = 0.0
        if self.fsync:
            os.fdatasync(old.fd)
        old.close_direct()
        self._active = new
        self._segments.append(self._active)
        self._file_number += 1
        old.active = False
        if self.handed_off:
            self._release(old)  # the drainer takes it over, and deletes it once delivered
        elif all(old.offsets[c] >= old.size for c in self.consumers):
            self._remove(old)

    def _sync(self, seq: int) -> None:
        """fsync unless a concurrent caller's fsync already covered write `seq`."""
        if not self.fsync:
            return
        with self._sync_lock:
            if self._synced_seq < seq:
                target = self._write_seq  # every write numbered up to here is in the file already
                os.fdatasync(self._active.fd)  # the file's length never changes on append (preallocated)
                self._synced_seq = target

    # Reading

    def read(self, consumer: str, max_records: int) -> Batch | None:
        """The next records for `consumer` (at most `max_records`), or None when it has read everything."""
        with self._lock:
            for seg in self._segments:
                start = seg.offsets[consumer]
                if seg.live and start >= seg.size:  # another process's file: what it wrote since
                    seg.size = _scan(seg.fd, seg.size)[1]
                if start >= seg.size:
                    continue
                records, end = _read_lines(seg, start, max_records)
                return Batch(records, Cursor(seg.path, end))
        return None

    def commit(self, consumer: str, cursor: Cursor) -> None:
        """Record that `consumer` delivered everything up to `cursor`; deletes a finished file that is no longer
        written (rotated, or left by a process that is gone)."""
        with self._lock:
            seg = next((s for s in self._segments if s.path == cursor.path), None)
            if seg is None:  # deleted, or let go to a node drainer, meanwhile
                return
            seg.offsets[consumer] = max(seg.offsets[consumer], cursor.offset)
            try:
                _write_offsets(seg)
            except (FileNotFoundError, NotADirectoryError):  # the directory was removed: its files with it
                self._keep_in_place_locked()
                self._changed.notify_all()
                return
            if not seg.active and not seg.live and all(seg.offsets[c] >= seg.size for c in self.consumers):
                self._remove(seg)
            self._changed.notify_all()

    def _remove(self, seg: _Segment) -> None:
        seg.path.unlink(missing_ok=True)
        seg.offsets_path.unlink(missing_ok=True)
        seg.close()
        self._segments.remove(seg)

    def pending(self, consumer: str) -> int:
        """Bytes `consumer` has not delivered yet."""
        with self._lock:
            return sum(max(0, s.size - s.offsets[consumer]) for s in self._segments)

    def wait_drained(self, consumers: list[str], timeout_s: float) -> bool:
        """Wait until every named consumer has delivered everything appended so far; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            for seg in self._segments:
                if seg.live:
                    seg.size = _scan(seg.fd, seg.size)[1]
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

    def wait_delivered_by_drainer(self, consumers: list[str], timeout_s: float) -> bool:
        """`wait_drained` while handed off: until the node drainer's saved offsets are past everything this
        process wrote so far; False on timeout."""
        with self._lock:
            targets = [(s.offsets_path, s.size) for s in self._segments]
        deadline = time.monotonic() + timeout_s
        while True:
            saved = [(_read_offsets(path), size) for path, size in targets]
            if all(offsets.get(c, 0) >= size for offsets, size in saved for c in consumers):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _undelivered_by_drainer(self, consumer: str) -> list[tuple[Path, int, int]]:
        """While handed off: (file, start, end) of each of this process's files that the node drainer has not
        delivered to `consumer` to its end, from the offsets it saved beside them."""
        with self._lock:  # the reads below happen outside it: appends never wait for a status read
            files = [(s.path, s.offsets_path, s.size) for s in self._segments]
        ranges = []
        for path, offsets_path, end in files:
            start = min(_read_offsets(offsets_path).get(consumer, 0), end)
            if start < end:
                ranges.append((path, start, end))
        return ranges

    def pending_bytes_on_disk(self, consumer: str) -> int:
        """While handed off: the bytes of this process's files that the node drainer has not delivered to
        `consumer` yet, from its saved offsets alone (no record is read: cheap enough for every drain interval)."""
        return sum(end - start for _, start, end in self._undelivered_by_drainer(consumer))

    def pending_on_disk(self, consumer: str) -> tuple[int, int, float]:
        """While handed off: the records and bytes of this process's files that the node drainer has not
        delivered to `consumer` yet (from its saved offsets), and how long the oldest of them has waited (seconds
        since its request started; 0 when none waits): a drainer that is stuck, or gone, shows here."""
        records = size = 0
        oldest: dt.datetime | None = None
        for path, start, end in self._undelivered_by_drainer(consumer):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # rotated away and delivered meanwhile
                continue
            try:
                data = os.pread(fd, min(end - start, 16 << 20), start)
            finally:
                os.close(fd)
            size += end - start
            records += data.count(b"\n")
            first = _started_at(data.split(b"\n", 1)[0])
            if first is not None and (oldest is None or first < oldest):
                oldest = first
        waited = 0.0 if oldest is None else (dt.datetime.now(dt.timezone.utc) - oldest).total_seconds()
        return records, size, max(0.0, waited)

    def files(self) -> list[Path]:
        """The spool files this process holds (adopted ones first)."""
        with self._lock:
            return [s.path for s in self._segments]

    @property
    def active_path(self) -> Path:
        if self._active is None:
            raise RuntimeError("a node drainer's spool has no file of its own")
        return self._active.path

    def close(self) -> None:
        """Release the files: fully delivered ones are deleted, the rest stay for the next start to replay.

        Lines queued by `append_async` are written first."""
        with self._queue_cv:
            if self._closed:
                return
            ticks, self._ticks = self._ticks, {}
            for loop, (lines, waiters) in ticks.items():  # lines of a loop iteration not yet over
                error = self._write_tick(lines)
                _settle_on(loop, waiters, error)
            if self._syncer is not None:  # end the child; what it had not confirmed is synced here
                syncer, self._syncer = self._syncer, None
                syncer.close()
                self._sync_pending(syncer)
            self._closed = True
        # Under the sync lock: a worker thread's fdatasync still to come finds everything synced here and never
        # touches a file this closes.
        with self._sync_lock, self._lock:
            self._keep_in_place_locked()  # a file removed meanwhile: its lines on disk again, for the next start
            if self.fsync and self._synced_seq < self._write_seq and self._active is not None:
                os.fdatasync(self._active.fd)
                self._synced_seq = self._write_seq
            for seg in list(self._segments):
                if not seg.live and all(seg.offsets[c] >= seg.size for c in self.consumers):
                    self._remove(seg)
                else:
                    seg.close()
            self._segments.clear()
            if self._direct_buffer is not None:
                self._direct_buffer.close()
                self._direct_buffer = None
            self._changed.notify_all()


def encode_line(record: dict[str, Any]) -> bytes:
    """One spool line: compact JSON and a newline (orjson: a tenth of the json module's time per charge).

    A value JSON has no type for is written as its str(); what orjson refuses (an integer beyond 64 bits) is
    written by the json module instead, after a space that tells `decode_line` to read it with the json module
    too (orjson would read such an integer as a float)."""
    try:
        return orjson.dumps(record, default=str, option=_ORJSON_LINE)
    except orjson.JSONEncodeError:
        return (" " + json.dumps(record, separators=(",", ":"), default=_json_default) + "\n").encode()


def _json_default(value: Any) -> Any:
    """What the json module writes for a value it has no type for: datetimes and dates as orjson does."""
    if isinstance(value, dt.datetime):
        return as_utc(value).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def decode_line(line: bytes) -> Any:
    """The record of one spool line (ValueError when it is not JSON)."""
    if line[:1] == b" ":  # written by the json module (encode_line)
        return json.loads(line)
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:  # what only the json module reads (NaN, a very large integer), or not JSON
        return json.loads(line)


UNREADABLE_LINE = "unreadable_spool_line"


def unreadable_line(line: bytes, file: str, offset: int) -> dict[str, Any]:
    """The record that stands for a spool line that is not JSON: its text (undecodable bytes escaped), the file and
    the byte offset it was at. No consumer takes it as a charge or an event (no request id), so each dead-letters
    it."""
    return {UNREADABLE_LINE: line.decode("utf-8", errors="backslashreplace"), "file": file, "offset": offset}


def _settle_on(
    loop: asyncio.AbstractEventLoop, futures: list[asyncio.Future[None]], error: BaseException | None
) -> None:
    """Settle `futures` on their loop's thread (from any thread)."""
    try:
        loop.call_soon_threadsafe(settle, futures, error)
    except RuntimeError:  # that loop is closed: nobody is waiting any more
        pass


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
            records.append(decode_line(line))
        except ValueError:
            # Not JSON (the disk, or an edit by hand): no charge can be read from it, and dropping it would drop
            # whatever it was without trace. Its consumers refuse it, so it lands in their dead letters whole.
            at = start + pos - len(line) - 1
            log.error("metering spool: a corrupt line in %s at byte %d, dead-lettered", seg.path.name, at)
            records.append(unreadable_line(line, seg.path.name, at))
    end = start + pos
    if not records and pos == 0 and start + len(data) >= seg.size and not seg.active:
        # a torn last line left by a crash mid-append: that record() never returned, so nothing was promised
        log.warning(
            "metering spool: skipping a torn last line of %d bytes in %s", seg.size - start, seg.path.name
        )
        end = seg.size
    return records, end


def _started_at(line: bytes) -> dt.datetime | None:
    """The `started_at` of a spooled charge's line (aware UTC), or None when the line has none that reads."""
    try:
        value = decode_line(line).get("started_at")
        return as_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
    except (ValueError, AttributeError, TypeError):
        return None


def drainer_consumers(directory: Path) -> list[str] | None:
    """The consumers of the node drainer that holds `directory`'s drainer lock, or None when none does."""
    try:
        fd = os.open(directory / DRAINER_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if _try_lock(fd, fcntl.LOCK_SH):  # free: no drainer (closing the file lets our shared lock go)
            return None
        data = os.pread(fd, 65536, 0)
    finally:
        os.close(fd)
    try:
        consumers = json.loads(data)["consumers"]
    except (ValueError, KeyError, TypeError):  # written just now, or by another version: not known yet
        return []
    return [str(c) for c in consumers] if isinstance(consumers, list) else []


def take_drainer_lock(directory: Path, consumers: list[str]) -> int | None:
    """Become `directory`'s node drainer: its lock's descriptor (hold it open), or None when another process is.
    The consumers are written into the lock file for the writers to compare with theirs."""
    fd = os.open(directory / DRAINER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    if not _try_lock(fd):
        os.close(fd)
        return None
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "consumers": consumers}).encode()
    os.ftruncate(fd, 0)
    _write_all(fd, data, 0)
    return fd


def _try_lock(fd: int, kind: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _scan(fd: int, start: int = 0) -> tuple[int, int]:
    """From `start` (0, or the end of a complete line): where a spool file's records end (its length, or the first
    zero byte of its preallocated tail: a record never holds one, JSON escapes control characters), and where its
    last complete line before that ends (all a reader may take of a file another process is appending to)."""
    complete = offset = start
    chunk = 64 * 1024
    while True:
        data = os.pread(fd, chunk, offset)
        if not data:
            return offset, complete
        zero = data.find(b"\0")
        newline = data.rfind(b"\n", 0, len(data) if zero < 0 else zero)
        if newline >= 0:
            complete = offset + newline + 1
        if zero >= 0:
            return offset + zero, complete
        offset += len(data)
        chunk = min(chunk * 2, 4 << 20)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


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


def _file_id(path: Path) -> tuple[int, int] | None:
    """The device and inode of `path` (None: it is not there)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _moved(seg: _Segment) -> bool:
    """Whether `seg`'s path no longer leads to its open file (deleted, its directory removed or replaced)."""
    try:
        there = os.stat(seg.path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:  # cannot tell (permissions): leave it
        return False
    ours = os.fstat(seg.fd)
    return (there.st_dev, there.st_ino) != (ours.st_dev, ours.st_ino)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _blocks(length: int) -> int:
    """`length` rounded up to whole DIRECT_BLOCKs."""
    return -(-length // DIRECT_BLOCK) * DIRECT_BLOCK
