"""The node drainer: one process per spool directory that delivers every serving process's charges to the ledger
and the usage-event sinks, so that the serving processes do not.

Each serving process spools its charges (metering/spool.py). Delivering them (reading, decoding, the database
writes, the events) costs CPU, and in a replica that CPU shares one GIL with the event loop and the model: measured
with benchmarks/metering_overhead.py, the in-process drain was about half of what metering cost a small model's
throughput. The drainer takes the spool directory's drainer lock and delivers every file there, the live ones
too; while it holds the lock, the serving processes only append (and fsync), and leave the rest to it. When it
stops or dies, the lock is free and they drain their own files again: nothing depends on it being there.

- `hfi serve` runs one as its child (`spawn`, `finish`): it starts before the replicas and, at a stop, delivers
  what the replicas left for up to a few seconds; the rest waits in the spool for the next start.
- On a cluster, `hfi metering drain --follow` runs it (the Helm chart's sidecar on every pod, beside Ray).

Standby: a second drainer for the same directory waits until the lock is free, then takes over.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from metering.config import MeteringSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
STANDBY_POLL_S = 0.5
LOCK_CHECK_S = 1.0  # how often the drainer looks whether its lock file is still there (`keep_lock`)


def run(settings: MeteringSettings, stop: threading.Event, *, finish_timeout_s: float = 5.0) -> bool:
    """Be the node drainer of the settings' spool directory until `stop` is set (waiting first while another
    process is), then deliver what is left for up to `finish_timeout_s`. True when nothing was left undelivered."""
    from hardware_profiles import ProfileCatalog
    from metering.service import MeteringService, configured_consumers

    directory = settings.resolved_spool_dir()
    consumers = configured_consumers(settings)
    settings = settings.model_copy(update={"enabled": True, "close_timeout_s": 0.0})
    while True:
        lock = _wait_for_lock(directory, consumers, stop)
        if lock is None:
            return True
        log.info("metering: draining every spool file in %s", directory)
        try:
            svc = MeteringService(settings, ProfileCatalog(profiles={}), drainer=True)
            try:
                while not stop.wait(LOCK_CHECK_S):
                    lock = keep_lock(directory, lock, consumers)
                    if lock is None:
                        break
                if lock is None:  # another drainer holds the directory now: stand by again
                    continue
                svc.spool.adopt_orphans()  # type: ignore[union-attr]  # the files let go since the last re-scan
                delivered = svc.flush(finish_timeout_s)
                if not delivered:
                    log.warning(
                        "metering: the drainer stops with charges undelivered; they wait in %s", directory
                    )
                return delivered
            finally:
                svc.close()
        finally:
            if lock is not None:
                os.close(lock)  # the writers drain their own files again


def _wait_for_lock(directory: Path, consumers: list[str], stop: threading.Event) -> int | None:
    """The drainer lock of `directory` once this process has it (standing by while another has it), or None when
    `stop` was set first."""
    from metering.spool import take_drainer_lock

    directory.mkdir(parents=True, exist_ok=True)
    lock = take_drainer_lock(directory, consumers)
    if lock is None:
        log.info("metering: another process drains %s; standing by", directory)
    while lock is None:
        if stop.wait(STANDBY_POLL_S):
            return None
        directory.mkdir(parents=True, exist_ok=True)
        lock = take_drainer_lock(directory, consumers)
    return lock


def keep_lock(directory: Path, lock: int, consumers: list[str]) -> int | None:
    """The drainer lock to hold from now on: `lock`, or, where its file was removed (the spool directory deleted or
    replaced while this process runs), a new one in the directory made again, so that the writers still find a
    drainer there (they would drain their own files meanwhile). None when another process took the new one first
    (`lock` is closed then)."""
    from metering.spool import DRAINER_LOCK, take_drainer_lock

    try:
        there = os.stat(directory / DRAINER_LOCK)
        ours = os.fstat(lock)
        if (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
            return lock
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:  # cannot tell: keep it
        return lock
    try:
        directory.mkdir(parents=True, exist_ok=True)
        new = take_drainer_lock(directory, consumers)
    except OSError as err:
        log.warning(
            "metering: the drainer's lock file in %s is gone and cannot be made again yet: %s", directory, err
        )
        return lock
    os.close(lock)
    if new is None:
        log.warning(
            "metering: the drainer's lock file in %s was removed, and another drainer holds the new one",
            directory,
        )
    else:
        log.warning("metering: the drainer's lock file in %s was removed; made again", directory)
    return new


def yield_cpu(settings: MeteringSettings) -> int:
    """Lower this process's CPU priority to `drainer_nice` (call in the drainer's own process): the charges it
    delivers are on disk already, so the requests beside it go first. Returns the niceness now."""
    current = os.nice(0)
    if settings.drainer_nice > current:
        try:
            return os.nice(settings.drainer_nice - current)
        except OSError as err:  # pragma: no cover - a platform without nice
            log.warning("metering drainer: could not lower its CPU priority: %s", err)
    return current


def stop_on(*signals: int) -> threading.Event:
    """An event that any of `signals` sets (handlers installed now: call on the main thread)."""
    stop = threading.Event()
    for number in signals:
        signal.signal(number, lambda *_: stop.set())
    return stop


def spawn(settings: MeteringSettings, *, finish_timeout_s: float = 2.0) -> subprocess.Popen[bytes]:
    """Start a drainer child process for `settings`; it runs until its standard input closes (`finish`, or this
    process's end), in its own session so that a Ctrl-C meant for this process does not end it first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "metering.node_drain"],
        stdin=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    message = {"settings": settings.model_dump(mode="json"), "finish_timeout_s": finish_timeout_s}
    assert proc.stdin is not None
    proc.stdin.write(
        json.dumps(message).encode() + b"\n"
    )  # secrets go through the pipe, never the command line
    proc.stdin.flush()
    return proc


def finish(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Tell a spawned drainer to deliver what is left and stop; kill it if it takes longer than `timeout_s`."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning(
            "metering: the drainer did not stop within %.1f s; killed (its charges wait in the spool)",
            timeout_s,
        )
        proc.kill()
        proc.wait()


def _main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    line = sys.stdin.buffer.readline()
    try:
        message: dict[str, Any] = json.loads(line)
        settings = MeteringSettings.model_validate(message["settings"])
        finish_timeout_s = float(message.get("finish_timeout_s", 2.0))
    except (ValueError, KeyError, TypeError) as err:
        log.error("metering drainer: no settings on standard input (%s)", err)
        return 2
    stop = stop_on(signal.SIGTERM)
    yield_cpu(settings)

    def watch_stdin() -> None:  # end of file: the parent finished, or is gone
        while sys.stdin.buffer.read(65536):
            pass
        stop.set()

    threading.Thread(target=watch_stdin, name="drainer-stdin", daemon=True).start()
    return 0 if run(settings, stop, finish_timeout_s=finish_timeout_s) else 1


if __name__ == "__main__":
    sys.exit(_main())
