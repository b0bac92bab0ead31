"""Bridging blocking generators (model streaming) to asyncio."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

_DONE = object()
log = logging.getLogger(__name__)


async def iterate_in_thread(
    make: Callable[[], Iterator[Any]], report_stop: bool = False
) -> AsyncIterator[Any]:
    """Drive a blocking generator on a worker thread and hand its items to the event loop as they come.

    If the consumer stops early (a cancelled request), the generator is closed on its own thread, which
    lets the runner stop generating at the next token.

    With `report_stop` (a generator whose `close()` raises Interrupted with the compute that ran, as
    `ModelExecutor.stream(report_stop=True)`), closing this one early (`aclose()`) waits for that close and raises
    its Interrupted, or Interrupted with the whole result when the work ended before it saw the stop. A consumer
    cancelled while it waits for an item stops the work without waiting, as without `report_stop`.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()
    closed: asyncio.Future[BaseException | None] = loop.create_future()
    worker = threading.Thread(
        target=_pump, args=(make, loop, items, stop, closed), daemon=True, name="stream-worker"
    )
    worker.start()
    try:
        while (item := await items.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    except GeneratorExit:
        if not report_stop:
            raise
        stop.set()
        stopped = _stopped(await outlast_cancels(closed), items)
        if stopped is None:
            raise
        raise stopped from None
    finally:
        stop.set()


def _pump(
    make: Callable[[], Iterator[Any]],
    loop: asyncio.AbstractEventLoop,
    items: asyncio.Queue[Any],
    stop: threading.Event,
    closed: asyncio.Future[BaseException | None],
) -> None:
    """iterate_in_thread's worker: the generator's items (or its error) into `items`, then _DONE; what its
    `close()` raised into `closed`."""

    def report(outcome: BaseException | None) -> None:
        if not closed.done():
            closed.set_result(outcome)

    gen = make()
    outcome: BaseException | None = None
    try:
        for item in gen:
            loop.call_soon_threadsafe(items.put_nowait, item)
            if stop.is_set():
                break
    except BaseException as err:
        loop.call_soon_threadsafe(items.put_nowait, err)
    finally:
        try:
            gen.close()
        except BaseException as err:  # what closing it early said (report_stop): Interrupted
            outcome = err
        try:
            loop.call_soon_threadsafe(items.put_nowait, _DONE)
            loop.call_soon_threadsafe(report, outcome)
        except RuntimeError:  # the loop is closed: nobody reads this stream any more
            pass


def _stopped(closed: BaseException | None, unread: asyncio.Queue[Any]) -> BaseException | None:
    """What a stream closed early ran: what its close raised, or what it ended with while nobody read it."""
    from models.types import Interrupted, RunResult

    if isinstance(closed, Interrupted):
        return closed
    while not unread.empty():
        item = unread.get_nowait()
        if isinstance(item, Interrupted):
            return item
        if isinstance(item, RunResult):
            return Interrupted(item.timings.compute_ns, item)
    return None


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


def leavable_stream(backend: Any, model_id: str, request: Any) -> LeavableStream:
    """A backend's stream of a request, for a reader whose client may leave: `stop()` then learns what ran, from
    a backend that can tell (`reports_stop(model_id)`: models run in this process)."""
    reports = getattr(backend, "reports_stop", None)
    if reports is not None and reports(model_id):
        return LeavableStream(backend.stream(model_id, request, report_stop=True), reports_stop=True)
    return LeavableStream(backend.stream(model_id, request), reports_stop=False)


class LeavableStream:
    """A model stream read one item at a time in a task of its own, so that a reader cancelled mid-wait (its
    client left) leaves the stream intact, and `stop()`, awaited elsewhere (a background task), can end it and
    learn the compute that ran for it: with `reports_stop` (a source whose `aclose()` raises Interrupted, as
    `LocalBackend.stream(report_stop=True)`), every step until the model dropped it, not only up to the last item
    read. Without it, a read in flight is cancelled at once (a Ray handle's stream: the replica stops too)."""

    def __init__(self, source: AsyncIterator[Any], reports_stop: bool = False) -> None:
        self._source = source
        self._reports = reports_stop
        self._next: asyncio.Future[Any] | None = None
        self._done = False

    def __aiter__(self) -> LeavableStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        if self._next is None:
            self._next = asyncio.ensure_future(self._source.__anext__())
        try:
            item = await asyncio.shield(self._next)
        except asyncio.CancelledError:
            raise  # the reader was cancelled: the read goes on (or its outcome waits), for stop()
        except BaseException:
            self._next = None
            self._done = True  # it ended (StopAsyncIteration) or failed: nothing is left to stop
            raise
        self._next = None
        return item

    async def stop(self) -> Any:
        """End the stream if it has not ended: what ran for it, as Interrupted (compute_ns, and the whole result if
        it finished meanwhile), or None when the stream cannot tell (it failed, or its backend does not report)."""
        from models.types import Interrupted, RunResult, StreamChunk

        if self._done:
            return None
        self._done = True
        pending, self._next = self._next, None
        seen_ns = 0  # the compute of an item nobody read: it ran
        if pending is not None:
            if not self._reports:
                pending.cancel()
            await asyncio.wait({pending})  # the item being read when the reader left: one step at most
            if pending.cancelled():
                return None
            if pending.exception() is not None:
                err = pending.exception()
                return err if isinstance(err, Interrupted) else None  # it ended or failed: nothing to learn
            item = pending.result()
            if isinstance(item, RunResult):  # it finished as its reader left
                await _close_quietly(self._source)
                return Interrupted(item.timings.compute_ns, item)
            if isinstance(item, StreamChunk):
                seen_ns = item.elapsed_ns
        try:
            await self._source.aclose()  # type: ignore[attr-defined]
        except Interrupted as stopped:
            return stopped
        return Interrupted(seen_ns) if seen_ns else None


async def _close_quietly(source: AsyncIterator[Any]) -> None:
    try:
        await source.aclose()  # type: ignore[attr-defined]
    except Exception:
        log.debug("closing a finished stream", exc_info=True)
