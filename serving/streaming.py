"""Bridging blocking generators (model streaming) to asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

_DONE = object()


async def iterate_in_thread(make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Drive a blocking generator on a worker thread and hand its items to the event loop as they come.

    If the consumer stops early (a cancelled request), the generator is closed on its own thread, which
    lets the runner stop generating at the next token.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def work() -> None:
        gen = make()
        try:
            for item in gen:
                loop.call_soon_threadsafe(items.put_nowait, item)
                if stop.is_set():
                    break
        except BaseException as err:
            loop.call_soon_threadsafe(items.put_nowait, err)
        finally:
            gen.close()
            loop.call_soon_threadsafe(items.put_nowait, _DONE)

    worker = threading.Thread(target=work, daemon=True, name="stream-worker")
    worker.start()
    try:
        while (item := await items.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def in_own_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """Run `fn(*args)` on a thread of its own; its result (or error) resolves the returned future.

    Not the loop's default executor: its few workers (cores + 4) would cap how many requests of a continuously
    batched model run at once, since each waits there for its tokens while the engine runs them together."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def work() -> None:
        try:
            outcome = (True, fn(*args))
        except BaseException as err:
            outcome = (False, err)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this result any more
            pass

    threading.Thread(target=work, daemon=True, name="run-worker").start()
    return future


# Heartbeats are sent at most this often: a client that leaves is charged the compute of the last one it got.
PROGRESS_INTERVAL_NS = 20_000_000


async def run_with_progress(executor: Any, request: Any) -> AsyncIterator[Any]:
    """Run a request of a stoppable runner on a thread: yield Progress heartbeats (the compute so far, at most one
    per PROGRESS_INTERVAL_NS), then its RunResult. Closing this generator early (the caller went away) stops the
    runner at its next step."""
    from models.types import Progress

    loop = asyncio.get_running_loop()
    beats: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()
    last = [-PROGRESS_INTERVAL_NS]

    def on_step(elapsed_ns: int) -> None:
        if elapsed_ns - last[0] >= PROGRESS_INTERVAL_NS:
            last[0] = elapsed_ns
            loop.call_soon_threadsafe(beats.put_nowait, elapsed_ns)

    task = in_own_thread(executor.run, request, stop.is_set, on_step)
    task.add_done_callback(lambda _: beats.put_nowait(_DONE))
    try:
        finished = False
        while not finished:
            got = [await beats.get()]
            while not beats.empty():
                got.append(beats.get_nowait())
            finished = any(b is _DONE for b in got)
            elapsed = [b for b in got if b is not _DONE]
            if elapsed:
                yield Progress(elapsed[-1])  # only the latest heartbeat matters
        yield await task
    finally:
        if not task.done():
            stop.set()  # the thread ends at the runner's next step; its Interrupted is nobody's to read
            task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def outlast_cancels(work: asyncio.Future) -> Any:
    """`work`'s outcome, awaited to its end however often the caller is cancelled meanwhile.

    For the wait that follows a first cancellation (the client left: the work stops at its next step, or ends):
    a second one can come, as when both Serve's replica and the service notice the same disconnect, and it must
    not turn the charge for what ran into nothing. Each cancellation is absorbed (`uncancel`); the wait it
    interrupts is bounded by the work itself."""
    while True:
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.done():
                return work.result()  # its own cancellation or outcome, not ours
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()


async def run_stoppable(executor: Any, request: Any) -> Any:
    """Run a request of a stoppable runner on a thread and return its RunResult. If the caller is cancelled (its
    client went away), the runner stops at its next step and Interrupted carries the compute that ran, measured
    by the executor when it stopped (exact, unlike a heartbeat): the caller waits that one step for it."""
    from models.types import Interrupted

    stop = threading.Event()
    task = in_own_thread(executor.run, request, stop.is_set)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        try:
            result = await outlast_cancels(task)
        except Interrupted:
            raise
        except Exception:  # it failed anyway: a failure is never charged
            raise asyncio.CancelledError from None
        raise Interrupted(result.timings.compute_ns, result) from None  # it ended before it saw the stop


async def result_of(items: AsyncIterator[Any], stop: Callable[[], Any]) -> Any:
    """The RunResult at the end of `run_with_progress`'s items. If the caller is cancelled (its client went
    away), `stop()` ends the work and Interrupted carries the compute of the last heartbeat."""
    from models.errors import GenerationError
    from models.types import Interrupted, Progress, RunResult

    consumed_ns = 0
    try:
        async for item in items:
            if isinstance(item, RunResult):
                return item
            if isinstance(item, Progress):
                consumed_ns = item.elapsed_ns
    except asyncio.CancelledError:
        done = stop()
        if asyncio.iscoroutine(done):
            await outlast_cancels(asyncio.ensure_future(done))
        raise Interrupted(consumed_ns) from None
    raise GenerationError("the model ended without a result")


async def finish_despite_cancel(work: Any) -> Any:
    """Await `work` (a RunResult) to its end even if the caller is cancelled meanwhile (its client went away):
    the compute runs anyway, so it is charged. Then Interrupted carries the whole result."""
    from models.types import Interrupted

    inner = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        try:
            result = await outlast_cancels(inner)
        except Exception:  # it failed anyway: a failure is never charged
            raise asyncio.CancelledError from None
        raise Interrupted(result.timings.compute_ns, result) from None
