"""Background consumers that move spooled charges to one destination each (the ledger, a sink), in batches.

A consumer reads a batch at its offset, delivers it, and only then commits the offset. On failure it waits
(exponential back-off, capped) and retries the same batch, so nothing is skipped and every retry carries the
same request ids.

A failure that says the records themselves are refused (`refused(err)`: the database refused a value, a
collector answered 400) would fail every retry and block every later record. Then the consumer delivers the
batch's records one at a time: those delivered go in; each one still refused goes to the consumer's dead-letter
store (kept whole, logged, counted in `hfi_metering_errors{stage="<consumer>-dead-letter"}`), and the drain goes
on past it. If the dead-letter store cannot take them either, the batch is retried later like any failure: a
record leaves the spool only once it is delivered or dead-lettered.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metering import metrics
from metering.events import PermanentDeliveryError
from metering.spool import Spool

log = logging.getLogger(__name__)

Deliver = Callable[[list[dict[str, Any]]], None]
DEAD_LETTER_DIR = "dead-letter"  # under the spool directory, out of the spool's *.jsonl glob
_ERROR_CHARS = 2000


@dataclass(frozen=True)
class DeadLetter:
    """A spooled record its destination refused for good, and why."""

    record: dict[str, Any]
    error: str


DeadLetterStore = Callable[[list[DeadLetter]], None]


def record_request_id(record: Any) -> Any:
    """The request id of a spooled record (None when it has none, or is not even a JSON object)."""
    return record.get("request_id") if isinstance(record, dict) else None


def is_permanent(err: BaseException) -> bool:
    """The default refusal test: a sink said the batch itself is bad (`PermanentDeliveryError`)."""
    return isinstance(err, PermanentDeliveryError)


def describe_error(err: BaseException) -> str:
    """`err` in one bounded line for a dead letter: its type and the driver's or sink's own message."""
    orig = getattr(err, "orig", None)  # a SQLAlchemy DBAPIError: the driver's message, without the SQL text
    text = f"{type(err).__name__}: {orig if orig is not None else err}"
    return text[:_ERROR_CHARS]


class DeadLetterFile:
    """A JSON-lines file of dead letters, one object a line, appended under an exclusive lock and fsync'd.

    Where a sink's refused events go (the sink's own destination refused them, and the ledger's database may be
    another service or down): in `<spool_dir>/dead-letter/<consumer>.jsonl`, on the volume that already keeps
    the spool, beside it but out of the spool's own files (the spool takes every *.jsonl directly in its
    directory for a spool file). The lock lets several processes that share the spool directory append to it.
    Each line: consumer, request_id, error, dead_at, record (the spooled charge), plus `extra(record)`.
    """

    def __init__(
        self,
        path: Path | str,
        consumer: str,
        extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.consumer = consumer
        self.extra = extra

    def add(self, letters: Sequence[DeadLetter]) -> None:
        """Append `letters` and fsync them; raises (so the batch is retried) when the file cannot be written."""
        if not letters:
            return
        now = dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")
        lines = []
        for letter in letters:
            entry = {
                "consumer": self.consumer,
                "request_id": record_request_id(letter.record),
                "error": letter.error,
                "dead_at": now,
                "record": letter.record,
            }
            if self.extra is not None:
                entry.update(self.extra(letter.record))
            lines.append(json.dumps(entry, sort_keys=True, default=str) + "\n")
        new_dir, new_file = not self.path.parent.exists(), not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = "".join(lines).encode()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        if new_file:  # the new names must outlive a power cut too
            _fsync_dir(self.path.parent)
        if new_dir:
            _fsync_dir(self.path.parent.parent)


def read_dead_letter_files(spool_dir: Path | str) -> list[dict[str, Any]]:
    """Every dead letter in `<spool_dir>/dead-letter/*.jsonl`, each with the file it is in (`file`).

    A line that is not JSON (torn by a crash mid-append) is returned as `{"file", "unreadable_line"}`."""
    directory = Path(spool_dir).expanduser() / DEAD_LETTER_DIR
    letters = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                letters.append({**json.loads(line), "file": str(path)})
            except ValueError:
                letters.append({"file": str(path), "unreadable_line": line})
    return letters


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolConsumer:
    """One daemon thread draining `spool` for consumer `name` through `deliver`."""

    def __init__(
        self,
        name: str,
        spool: Spool,
        deliver: Deliver,
        *,
        batch_size: int,
        interval_s: float,
        retry_initial_s: float,
        retry_max_s: float,
        refused: Callable[[BaseException], bool] = is_permanent,
        dead_letter: DeadLetterStore | None = None,
        adopt_interval_s: float = 0.0,
    ) -> None:
        """`refused(err)`: whether a delivery failure is a refusal of the records (isolated and dead-lettered)
        rather than a transient one (retried). `dead_letter`: where refused records go (default: the
        consumer's DeadLetterFile in the spool directory). `adopt_interval_s` > 0: every so often, adopt the
        spool files of processes gone since the start (Spool.adopt_orphans; one consumer per spool does it)."""
        self.name = name
        self.spool = spool
        self.deliver = deliver
        self.refused = refused
        if dead_letter is None:
            dead_letter = DeadLetterFile(spool.directory / DEAD_LETTER_DIR / f"{name}.jsonl", name).add
        self.dead_letter = dead_letter
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.failures = 0  # consecutive failed attempts
        # When it last found nothing left to deliver (monotonic): while records wait, now minus this bounds how
        # long the oldest of them has waited (the drain lag of `hfi status`).
        self.caught_up_at = time.monotonic()
        self.delivered_records = 0
        self.dead_lettered_records = 0
        self.adopt_interval_s = adopt_interval_s
        self._next_adopt_s = time.monotonic() + adopt_interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metering-{name}", daemon=True)

    def start(self) -> SpoolConsumer:
        self._thread.start()
        return self

    def wake(self) -> None:
        """Look for new records now instead of at the next interval."""
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _run(self) -> None:
        backoff_s = self.retry_initial_s
        while not self._stop.is_set():
            self.spool.keep_in_place()  # its files removed from under it: written again (at most every second)
            if self.spool.handed_off_now():  # a node drainer delivers this process's files: stand by
                self.caught_up_at = time.monotonic()
                self._report_pending(handed_off=True)  # its progress on them, so a stuck drainer shows
                self._sleep(self.interval_s)
                continue
            self._adopt_when_due()
            try:
                delivered = self.step()
            except Exception as err:  # any failure: keep the batch, back off, retry it
                self.failures += 1
                metrics.observe_error(self.name)
                level = logging.WARNING if self.failures <= 3 or self.failures % 50 == 0 else logging.DEBUG
                log.log(
                    level,
                    "metering %s: delivery failed (attempt %d), retrying: %s",
                    self.name,
                    self.failures,
                    err,
                )
                self._sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.retry_max_s)
                continue
            if self.failures:
                log.info("metering %s: delivering again after %d failed attempts", self.name, self.failures)
            self.failures = 0
            backoff_s = self.retry_initial_s
            if not delivered:
                self.caught_up_at = time.monotonic()
                self._report_pending(handed_off=False)
                self._sleep(self.interval_s)

    def _report_pending(self, *, handed_off: bool) -> None:
        """`hfi_metering_spool_pending_bytes` of this consumer: what it has not delivered, or, while the node
        drainer delivers this process's files, what the drainer has not (its saved offsets)."""
        try:
            pending = (
                self.spool.pending_bytes_on_disk(self.name) if handed_off else self.spool.pending(self.name)
            )
        except OSError:  # a file rotated away and deleted meanwhile: the next interval reads again
            return
        metrics.SPOOL_PENDING_BYTES.labels(self.name).set(pending)

    def _adopt_when_due(self) -> None:
        if self.adopt_interval_s <= 0 or time.monotonic() < self._next_adopt_s:
            return
        self._next_adopt_s = time.monotonic() + self.adopt_interval_s
        try:
            self.spool.adopt_orphans()
        except Exception:  # the directory unreadable for a while: our own file still drains, try again later
            metrics.observe_error("spool-adopt")
            log.exception("metering %s: could not re-scan the spool directory for orphaned files", self.name)

    def step(self) -> int:
        """Deliver one batch; return its size (0: nothing to do). Raises when delivery failed."""
        batch = self.spool.read(self.name, self.batch_size)
        if batch is None:
            return 0
        dead = self._deliver_isolating(batch.records) if batch.records else []
        if dead:
            self._bury(dead)  # raises when the store cannot take them: the batch is retried, nothing skipped
        self.spool.commit(self.name, batch.cursor)
        self.delivered_records += len(batch.records) - len(dead)
        return max(1, len(batch.records))

    def _deliver_isolating(self, records: list[dict[str, Any]]) -> list[DeadLetter]:
        """Deliver `records`; when they are refused, deliver them one at a time and return those refused alone.

        Any failure that is not a refusal (the database or the collector unreachable) is raised, whole batch
        or single record, so the batch is retried later; deliveries are idempotent by request id, so the
        records that went in one at a time are not doubled by that retry."""
        try:
            self.deliver(records)
            return []
        except Exception as err:
            if not self.refused(err):
                raise
            if len(records) == 1:
                return [DeadLetter(records[0], describe_error(err))]
            log.warning(
                "metering %s: a batch of %d records was refused (%s); delivering them one at a time",
                self.name,
                len(records),
                describe_error(err)[:300],
            )
        dead = []
        for record in records:
            try:
                self.deliver([record])
            except Exception as err:
                if not self.refused(err):
                    raise
                dead.append(DeadLetter(record, describe_error(err)))
        return dead

    def _bury(self, dead: list[DeadLetter]) -> None:
        """Put refused records in the dead-letter store, then count and log each one."""
        self.dead_letter(dead)
        metrics.observe_error(f"{self.name}-dead-letter", len(dead))
        self.dead_lettered_records += len(dead)
        for letter in dead:
            log.error(
                "metering %s: dead-lettered a record refused for good (%s): %s",
                self.name,
                letter.error,
                json.dumps(letter.record, sort_keys=True, default=str),
            )


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes (a helper for flush and tests)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
