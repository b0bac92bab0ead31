"""Cancel a request's handler when its client goes away before the response starts.

A plain (non-streamed) handler never reads from the connection again after the body, so on a server that does
not watch the connection itself (uvicorn, as in a single-process service or the tests' in-process apps) a client
that leaves goes unnoticed: its request runs to the end and is charged as answered. This pure ASGI middleware
listens for the server's `http.disconnect` once the body has been read and, if no response has started, cancels
the handler, so the handler's own rules apply: a stoppable runner stops at its next step and the compute that ran
is charged `client_disconnected`; other work finishes and is charged the same way.

Serve's replica watches the connection too on its own HTTP port and cancels the request as well; both notices of
one disconnect are expected, and the waits that follow a cancellation absorb the second
(serving/streaming.py `outlast_cancels`).

Once the response has started (a stream), the stream's own disconnect handling takes over: messages are passed
on to the application unchanged, and nothing is cancelled here.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _Watched(receive, send).run(self.app, scope)


class _Watched:
    """One request's connection: the body passed on as it comes, then a watcher owns `receive`."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.handler = asyncio.current_task()
        self.started = False  # the response has started
        self.cancelled_here = False
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.watcher: asyncio.Task[None] | None = None

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self.receive, self.send)
        except asyncio.CancelledError:
            if not self.cancelled_here:
                raise
            if self.handler is not None:
                self.handler.uncancel()
            # The client left and the handler did not turn the cancellation into an answer: nothing to send.
        finally:
            if self.watcher is not None and not self.watcher.done():
                self.watcher.cancel()

    async def watch(self) -> None:
        while True:
            message = await self._receive()
            self.inbox.put_nowait(message)
            if message["type"] == "http.disconnect":
                if not self.started and self.handler is not None:
                    self.cancelled_here = True
                    self.handler.cancel()
                return

    async def receive(self) -> Message:
        if self.watcher is not None:  # the watcher owns the connection now: take what it read
            return await self.inbox.get()
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.watcher = asyncio.create_task(self.watch(), name="hfi-disconnect-watch")
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)
