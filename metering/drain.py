"""Background consumers that move spooled charges to one destination each (the ledger, a sink), in batches.

A consumer reads a batch at its offset, delivers it, and only then commits the offset. On failure it waits
(exponential back-off, capped) and retries the same batch, so nothing is skipped and every retry carries the
same request ids. A `PermanentDeliveryError` drops the batch (logged and counted) instead of blocking forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from metering import metrics
from metering.events import PermanentDeliveryError
from metering.spool import Spool

log = logging.getLogger(__name__)

Deliver = Callable[[list[dict[str, Any]]], None]


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
    ) -> None:
        self.name = name
        self.spool = spool
        self.deliver = deliver
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.failures = 0  # consecutive failed attempts
        self.delivered_records = 0
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
                metrics.SPOOL_PENDING_BYTES.labels(self.name).set(self.spool.pending(self.name))
                self._sleep(self.interval_s)

    def step(self) -> int:
        """Deliver one batch; return its size (0: nothing to do). Raises when delivery failed."""
        batch = self.spool.read(self.name, self.batch_size)
        if batch is None:
            return 0
        try:
            if batch.records:
                self.deliver(batch.records)
        except PermanentDeliveryError as err:
            metrics.EVENTS_DROPPED.labels(self.name).inc(len(batch.records))
            log.error(
                "metering %s: dropping %d records refused for good: %s", self.name, len(batch.records), err
            )
        self.spool.commit(self.name, batch.cursor)
        self.delivered_records += len(batch.records)
        return max(1, len(batch.records))


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes (a helper for flush and tests)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
