"""Dynamic batching that forms a batch when the model is free.

Ray Serve's `@serve.batch` closes a batch on its timeout even while the previous batch is still running, so on a
busy replica batches stay small (2-3 requests measured here) and requests queue behind them. This batcher has one
worker per replica: while a batch runs, new requests gather in the queue, and the next batch takes all of them
(up to the maximum) at once. Only a request that would run alone waits, at most `wait_timeout_s`, for company.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

RunBatch = Callable[[list[Any], list[int]], Awaitable[list[Any]]]


class Batcher:
    """Queue requests, run them in batches of at most `max_batch_size`, hand each caller its own result.

    `run_batch(items, queue_ns)` gets the batch and how long each item waited, and returns one result per item
    (a result may be an exception object, handed back to that caller only).
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int, wait_timeout_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_timeout_s = wait_timeout_s
        self._queue: asyncio.Queue[tuple[Any, int, asyncio.Future]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # what ran, for tests and diagnostics (bounded below)

    async def submit(self, item: Any) -> Any:
        """Run `item` in the next batch and return its result."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        future: asyncio.Future = loop.create_future()
        self._queue.put_nowait((item, time.perf_counter_ns(), future))
        return await future

    async def _gather(self) -> list[tuple[Any, int, asyncio.Future]]:
        batch = [await self._queue.get()]
        if self._queue.empty() and self.wait_timeout_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait_timeout_s
            while len(batch) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
        while len(batch) < self.max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return [entry for entry in batch if not entry[2].cancelled()]  # callers that went away

    async def _work(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            started = time.perf_counter_ns()
            items = [item for item, _, _ in batch]
            waited = [started - arrived for _, arrived, _ in batch]
            self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
            try:
                results = await self.run_batch(items, waited)
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
            except Exception as err:  # the whole batch failed: every caller gets the error
                results = [err] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
