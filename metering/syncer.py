"""A child process that fdatasyncs one file on request, for an event loop that must not wait for a slow disk (the
spool's loop syncs its lines itself while the disk is quick: metering/spool.py `append_async`).

The spool's charges must be on disk before a response goes out, but an fdatasync on the event loop stops the
whole ingress for its duration (0.3-1 ms on a shared disk under load: every other request waits, and a batched
model waits for its next batch), and a thread of the same process has to take the GIL back from the loop to
return, which costs more CPU than the sync (measured in benchmarks/README.md). A tiny child process does it
instead: the loop writes a sequence number to a pipe, the child (its own interpreter, no GIL shared) runs one
fdatasync for every request that reached it meanwhile and writes the last number back, and the loop's reader
callback settles every caller up to it.

The child inherits the file descriptor (same open file), ignores Ctrl-C (a new session) and exits when the pipe
closes: at `close()`, or when this process dies. If it dies or cannot start, the caller falls back to syncing
itself (`alive` turns False); an fdatasync error reaches every waiting caller.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

_CHILD = """
import os, sys
fd, requests, acks = map(int, sys.argv[1:4])
while True:
    data = os.read(requests, 65536)
    if not data:
        break
    try:
        os.fdatasync(fd)
        os.write(acks, data[-8:])
    except OSError as err:
        os.write(acks, (-err.errno).to_bytes(8, "little", signed=True))
"""

Waiters = list[asyncio.Future[None]]


class SyncProcess:
    """fdatasync of `fd` by a child process, for the callers of one event loop (`loop`, on its thread only).

    `request(seq, waiters)` after writing the lines numbered up to `seq`: each waiter's future is settled (None, or
    the OSError of the sync) once a sync that began after the request has returned. `fallback(self)` is called (on
    the loop) if the child goes away, to sync what is pending (`take_pending`) in this process instead.
    """

    def __init__(
        self, fd: int, loop: asyncio.AbstractEventLoop | None, fallback: Callable[[SyncProcess], None]
    ) -> None:
        """`loop` None: started ahead of use (the child's start is then not paid by a request); `attach` it to the
        loop of its callers before the first `request`."""
        self.loop = loop
        self._fallback = fallback
        self._pending: deque[tuple[int, Waiters]] = deque()
        self._lock = threading.Lock()  # close() may run on another thread than the loop's
        read_requests, self._requests = os.pipe()
        self._acks, write_acks = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-S", "-c", _CHILD, str(fd), str(read_requests), str(write_acks)],
                pass_fds=(fd, read_requests, write_acks),
                stdin=subprocess.DEVNULL,  # and it holds none of this process's output pipes open
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # no Ctrl-C from the terminal: it ends when the pipe closes
            )
        except BaseException:
            for end in (self._requests, self._acks):
                os.close(end)
            raise
        finally:
            os.close(read_requests)
            os.close(write_acks)
        self.alive = True
        if loop is not None:
            loop.add_reader(self._acks, self._on_acks)

    def wait_ready(self, timeout_s: float = 5.0) -> bool:
        """Block until the child runs and has synced once (call before `attach`, when started without a loop): the
        first request then finds it started (a child's start takes 10-20 ms, which a replica that takes traffic
        right after its constructor, such as one scaled up from zero, would add to its first request). False
        when it did not answer within `timeout_s` (it then answers the first request instead)."""
        if self.loop is not None or not self.alive:
            return False
        try:
            os.write(self._requests, (0).to_bytes(8, "little", signed=True))
            ready, _, _ = select.select([self._acks], [], [], timeout_s)
            if not ready:
                return False
            data = os.read(self._acks, 8)
        except OSError:
            return False
        if len(data) < 8:  # gone already: the first request finds out and syncs itself
            return False
        if int.from_bytes(data, "little", signed=True) < 0:
            log.warning(
                "metering: the spool's first fdatasync failed; each charge's caller will see the error"
            )
        return True

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the callers of `loop` (once, on that loop's thread) when it was started without one."""
        if self.loop is None:
            self.loop = loop
            loop.add_reader(self._acks, self._on_acks)

    def request(self, seq: int, waiters: Waiters) -> None:
        """Sync everything written up to write number `seq`, then settle `waiters` (call on the loop)."""
        with self._lock:
            self._pending.append((seq, waiters))
        try:
            os.write(self._requests, seq.to_bytes(8, "little", signed=True))
        except OSError:
            self._lost()

    def _on_acks(self) -> None:
        try:
            data = os.read(self._acks, 65536)
        except OSError:
            data = b""
        if len(data) < 8:  # end of file: the child is gone (acks are 8 bytes, written whole)
            self._lost()
            return
        values = [int.from_bytes(data[i : i + 8], "little", signed=True) for i in range(0, len(data) - 7, 8)]
        last, worst = values[-1], min(values)
        # After a failed fdatasync the kernel may have dropped the dirty pages: a later success does not prove the
        # earlier lines are on disk, so every caller still waiting gets the error.
        error = OSError(-worst, os.strerror(-worst)) if worst < 0 else None
        with self._lock:
            done = []
            while self._pending and (error is not None or self._pending[0][0] <= last):
                done.append(self._pending.popleft()[1])
        for waiters in done:
            settle(waiters, error)

    def _lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        log.warning("metering: the spool's sync process is gone; syncing in this process from now on")
        self._stop_reading()
        self._fallback(self)

    def take_pending(self) -> list[Waiters]:
        """Every waiter not settled yet, no longer this object's (for a caller that syncs them itself)."""
        with self._lock:
            pending = [w for _, w in self._pending]
            self._pending.clear()
        return pending

    def _stop_reading(self) -> None:
        if self.loop is None:
            return
        try:
            self.loop.remove_reader(self._acks)
        except (RuntimeError, ValueError, OSError):  # the loop is closed already
            pass

    def close(self, timeout_s: float = 5.0) -> None:
        """End the child (its pipe closes) and wait for it. Pending waiters stay for `take_pending`."""
        self.alive = False  # the end of file the loop may still read is then not a loss
        os.close(self._requests)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:  # pragma: no cover - a child stuck in fdatasync
            self.process.kill()
            self.process.wait()
        if self.loop is not None and not self.loop.is_closed() and not _on_loop_thread(self.loop):
            try:  # the reader belongs to the loop's thread
                self.loop.call_soon_threadsafe(self._release_acks)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        self._release_acks()

    def _release_acks(self) -> None:
        self._stop_reading()
        os.close(self._acks)


def settle(futures: Waiters, error: BaseException | None) -> None:
    """Resolve each future not already done (its caller may have been cancelled: the line is written all the same)."""
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
