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
