"""Dynamic batching that forms a batch when the model is free.

Ray Serve's `@serve.batch` closes a batch on its timeout even while the previous batch is still running, so on a
busy replica batches stay small (2-3 requests measured here) and requests queue behind them. This batcher has
`concurrency` workers (one on a replica): while a batch runs, new requests gather in the queue, and the next
batch takes all of them (up to the maximum) at once. Only a request that would run alone waits, at most
`wait_timeout_s`, for company (as many as the recent batches had, or a full batch before there were any); items
submitted together (`submit_many`, already a batch) never wait.

The wait for company is adaptive: after `FRUITLESS_WAITS` lone waits in a row that ended with no company (one
client at a time: its next request comes only after this answer, so every wait is pure latency), a lone request
runs at once, and only one lone request per `PROBE_INTERVAL_S` waits again to find out whether company now comes.
Any sign of concurrent callers (a wait that gathered company, or more than one request queued when a batch
forms) turns the wait back on at once. A batcher starts in the no-wait state, and returns to it after an idle
spell of `PROBE_INTERVAL_S` (the first request after a start or a pause has nobody on the way: `benchmarks/
cold_start.py` measured the first request after the ready line at 3-7x the p50 when it waited), with the next
probe an interval later. Measured on the one-client latency of a batched model (benchmarks/peers.py:
local/tiny-sentiment over HTTP): the 10 ms wait was most of the gap to the in-process latency.

A few stragglers (at most half the largest of the last 8 batches) that find the model free wait too, up to the same
timeout, for the rest of such a batch. Without that, 16 closed-loop clients on MiniLM settled into batches of 13
and 3 in turn (the 3 arrive while the 13 run, and run alone while the 13 go back to their clients); merged, the
replica served 17 % more requests a second with less CPU per request (MiniLM, tokens mode, 16 clients, two runs
each way: 77.6 and 84.5 against 68.7 and 69.7 req/s).

The ingress uses it too, in front of a batched model's handle: it sends one call per batch instead of one per
request, which saves the per-call cost of Ray on both sides (see serving/deployment.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

RunBatch = Callable[[list[Any], list[int]], Awaitable[list[Any]]]

# A queued item: the item, its arrival (perf_counter_ns), its caller's future, whether it may wait for company.
_Entry = tuple[Any, int, asyncio.Future, bool]

FRUITLESS_WAITS = 2  # lone waits in a row that found no company before lone requests stop waiting
PROBE_INTERVAL_S = 1.0  # then one lone request a second waits again, to see whether company comes now
PEAK_WINDOW = 8  # stragglers wait for the largest of this many recent batches


class Batcher:
    """Queue requests, run them in batches of at most `max_batch_size`, hand each caller its own result.

    `run_batch(items, queue_ns)` gets the batch and how long each item waited, and returns one result per item
    (a result may be an exception object, handed back to that caller only). At most `concurrency` batches run
    at once.
    """

    def __init__(
        self, run_batch: RunBatch, max_batch_size: int, wait_timeout_s: float, concurrency: int = 1
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_timeout_s = wait_timeout_s
        self.concurrency = concurrency
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue()
        self._workers: list[asyncio.Task] = []
        self._gathering = asyncio.Lock()  # one worker forms a batch at a time (binds to a loop on first use)
        self.batch_sizes: list[int] = []  # what ran, for tests and diagnostics (bounded below)
        # Lone waits in a row that ended alone. It starts as if waiting did not pay, and goes back to that after an
        # idle spell: the first requests then run at once (until callers arrive together, or a probe finds company).
        self._fruitless = FRUITLESS_WAITS
        self._probe_at = 0.0  # loop time after which a lone request waits again (once fruitless)
        self._last_arrival = -math.inf  # loop time of the last request that may wait

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not yet running)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the idle workers (they hold `run_batch`, and through it the model): for a model a pool evicts,
        which has nothing queued. A later submit starts them again."""
        for worker in self._workers:
            worker.cancel()
        self._workers = []

    async def submit(self, item: Any) -> Any:
        """Run `item` in the next batch and return its result."""
        return await self._enqueue([item], may_wait=True)[0]

    async def submit_many(self, items: list[Any]) -> list[Any]:
        """Run `items` (in as few batches as the maximum allows, with whatever else is queued) and return
        their results in order; a failed item's result is its exception object."""
        return await asyncio.gather(*self._enqueue(items, may_wait=False), return_exceptions=True)

    def _enqueue(self, items: list[Any], *, may_wait: bool) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        self._workers = [w for w in self._workers if not w.done()]
        while len(self._workers) < self.concurrency:
            # In a context of their own: a worker serves every caller, so it must not carry the request context
            # of the caller that happened to start it (Serve cancels a request's handle calls with it).
            self._workers.append(loop.create_task(self._work(), context=contextvars.Context()))
        if may_wait:
            arrival = loop.time()
            if arrival - self._last_arrival >= PROBE_INTERVAL_S:  # after an idle spell nobody is on the way
                self._fruitless = max(self._fruitless, FRUITLESS_WAITS)
                self._probe_at = arrival + PROBE_INTERVAL_S
            self._last_arrival = arrival
        now = time.perf_counter_ns()
        futures = []
        for item in items:
            future: asyncio.Future = loop.create_future()
            self._queue.put_nowait((item, now, future, may_wait))
            futures.append(future)
        return futures

    async def _gather(self) -> list[_Entry]:
        async with self._gathering:
            batch = [await self._queue.get()]
            ready = 1 + self._queue.qsize()
            target = self._company_target(batch[0][3], ready)
            if target:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self.wait_timeout_s
                while len(batch) + self._queue.qsize() < target and (remaining := deadline - loop.time()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except asyncio.TimeoutError:
                        break
                self._waited(company=len(batch) + self._queue.qsize() > ready)
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
        return [entry for entry in batch if not entry[2].cancelled()]  # callers that went away

    def _company_target(self, may_wait: bool, ready: int) -> int:
        """How many requests the batch waits (at most `wait_timeout_s`) to have, or 0 to go at once.

        A lone request waits for as many as the largest of the recent batches (a full batch before any ran; unless
        such waits stopped paying, see `_wait_for_company`). A few
        stragglers (at most half of the largest of the recent batches) wait for the rest of that batch: in a
        closed loop the callers of the batch just answered come back within milliseconds, and one batch of 16 costs
        a model far less than a small batch and then the rest (MiniLM measured here: 7.7 ms a sentence in a batch of 16,
        12.2 in one of 4)."""
        if self.wait_timeout_s <= 0:
            return 0
        if not may_wait or ready >= self.max_batch_size:
            if ready > 1:
                self._fruitless = 0  # callers arrive together: waiting for company pays again
            return 0
        peak = max(self.batch_sizes[-PEAK_WINDOW:], default=0)
        if ready == 1:
            if not self._wait_for_company():
                return 0
            # As many as the recent batches had (their callers come back for the next one; more queued by then go
            # too, so batches still grow with the load), or a full batch before there were any. Never more: with
            # fewer callers than the maximum, a wait for a full batch lasted the whole timeout every time
            # (8 closed-loop clients: about 40 % of the replica's time waiting, batches of 8 either way).
            # (no batch exceeds the maximum, which is > 1 here: no min needed)
            return max(peak, 2) if peak else self.max_batch_size
        if ready * 2 <= peak:
            return peak if self._wait_for_company() else 0
        self._fruitless = 0  # many callers arrived together
        return 0

    def _wait_for_company(self) -> bool:
        """Whether a lone request should wait: yes unless the last lone waits all ended alone, then once a probe
        interval."""
        if self._fruitless < FRUITLESS_WAITS:
            return True
        now = asyncio.get_running_loop().time()
        if now < self._probe_at:
            return False
        self._probe_at = now + PROBE_INTERVAL_S
        return True

    def _waited(self, *, company: bool) -> None:
        if company:
            self._fruitless = 0
            return
        self._fruitless += 1
        if self._fruitless == FRUITLESS_WAITS:
            self._probe_at = asyncio.get_running_loop().time() + PROBE_INTERVAL_S

    async def _work(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            started = time.perf_counter_ns()
            items = [entry[0] for entry in batch]
            waited = [started - entry[1] for entry in batch]
            self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
            try:
                results = await self.run_batch(items, waited)
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
            except Exception as err:  # the whole batch failed: every caller gets the error
                results = [err] * len(batch)
            for entry, result in zip(batch, results, strict=True):
                future = entry[2]
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class LoopOrThread:
    """Where a replica runs its batches: on the event loop while they are short, else on a worker thread.

    On the loop, a batch costs no hand-over to a thread and no second thread contending with the loop for the
    interpreter (Ray Serve's own `@serve.batch` runs the batch on the loop); but nothing else runs on the loop
    meanwhile (other requests' admission and responses, disconnect watchers), so only batches that took less than
    `below_s` on average (a moving average of the last few) run there. Unknown (the first batch), or `busy()` (the
    replica's: a lock on the model held by another caller, which the loop must not wait for) means a thread."""

    WEIGHT = 0.2  # of the newest batch in the moving average

    def __init__(self, below_s: float, busy: Callable[[], bool] | None = None) -> None:
        self.below_s = below_s
        self.busy = busy
        self.average_s: float | None = None
        self.on_loop = 0  # batches run on the loop (for tests)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        here = (
            self.average_s is not None and self.average_s < self.below_s and not (self.busy and self.busy())
        )
        if here:
            # Let what is ready run first (the previous batch's callers take their results and move on).
            await asyncio.sleep(0)
        started = time.perf_counter()
        try:
            if here:
                self.on_loop += 1
                return fn(*args)
            return await asyncio.to_thread(fn, *args)
        finally:
            took = time.perf_counter() - started
            self.average_s = (
                took if self.average_s is None else self.average_s + self.WEIGHT * (took - self.average_s)
            )
