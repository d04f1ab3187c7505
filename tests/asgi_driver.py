"""Drive an ASGI app in-process, message by message: lifespan, streamed bodies, disconnects.

httpx's ASGITransport collects a whole response before returning it, so it cannot show what a
client sees mid-stream or cut a connection; this driver can.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from resumable_stream.sse import ServerSentEvent, SSEDecoder

App = Any
STEP_TIMEOUT = 5.0


class Response:
    """One request in flight: status and headers once started, then body pieces as they come."""

    def __init__(self, messages: MemoryObjectReceiveStream[dict[str, Any]]) -> None:
        self._messages = messages
        self.disconnected = anyio.Event()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.finished = False
        self.body = b""
        self._decoder = SSEDecoder()

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower().encode():
                return value.decode("latin-1")
        return None

    async def _start(self) -> None:
        with anyio.fail_after(STEP_TIMEOUT):
            message = await self._messages.receive()
        assert message["type"] == "http.response.start", message
        self.status = message["status"]
        self.headers = list(message.get("headers", []))

    async def chunk(self) -> bytes | None:
        """The next body piece (None at the end of the body), within STEP_TIMEOUT."""
        if self.finished:
            return None
        with anyio.fail_after(STEP_TIMEOUT):
            try:
                message = await self._messages.receive()
            except anyio.EndOfStream:
                raise AssertionError("the app returned without finishing the body") from None
        assert message["type"] == "http.response.body", message
        body: bytes = message.get("body", b"")
        self.body += body
        if not message.get("more_body", False):
            self.finished = True
        return body

    async def read(self) -> bytes:
        while await self.chunk() is not None:
            pass
        return self.body

    async def events(self, count: int | None = None) -> list[ServerSentEvent]:
        """Decode events until `count` arrived (or the body ended)."""
        events: list[ServerSentEvent] = []
        while count is None or len(events) < count:
            piece = await self.chunk()
            if piece is None:
                break
            events += self._decoder.feed(piece)
        return events

    def disconnect(self) -> None:
        self.disconnected.set()


class Client:
    """Requests against one app, sharing the lifespan state like a server does."""

    def __init__(self, app: App, tg: TaskGroup, state: dict[str, Any]) -> None:
        self.app = app
        self._tg = tg
        self.state = state

    @asynccontextmanager
    async def request(
        self,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        method: str = "GET",
        body: bytes = b"",
    ) -> AsyncIterator[Response]:
        send_stream: MemoryObjectSendStream[dict[str, Any]]
        receive_stream: MemoryObjectReceiveStream[dict[str, Any]]
        send_stream, receive_stream = anyio.create_memory_object_stream(math.inf)
        response = Response(receive_stream)
        done = anyio.Event()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode("latin-1"),
            "headers": [
                (k.lower().encode(), v.encode("utf-8")) for k, v in (headers or {}).items()
            ],
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
            "state": dict(self.state),
        }
        sent_request = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": body, "more_body": False}
            await response.disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if response.disconnected.is_set():
                raise OSError("the client disconnected")
            await send_stream.send(message)

        async def run() -> None:
            try:
                with send_stream:
                    await self.app(scope, receive, send)
            finally:
                done.set()

        self._tg.start_soon(run)
        await response._start()
        try:
            yield response
        finally:
            response.disconnect()
            with anyio.fail_after(STEP_TIMEOUT):
                await done.wait()
            receive_stream.close()


@asynccontextmanager
async def serve(app: App) -> AsyncIterator[Client]:
    """Run the app's lifespan around the block, like a server would."""
    state: dict[str, Any] = {}
    to_app: MemoryObjectSendStream[dict[str, Any]]
    app_inbox: MemoryObjectReceiveStream[dict[str, Any]]
    to_app, app_inbox = anyio.create_memory_object_stream(math.inf)
    from_app: MemoryObjectSendStream[dict[str, Any]]
    outbox: MemoryObjectReceiveStream[dict[str, Any]]
    from_app, outbox = anyio.create_memory_object_stream(math.inf)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    async with to_app, app_inbox, from_app, outbox, anyio.create_task_group() as tg:
        tg.start_soon(app, scope, app_inbox.receive, from_app.send)
        await to_app.send({"type": "lifespan.startup"})
        with anyio.fail_after(STEP_TIMEOUT):
            message = await outbox.receive()
        assert message["type"] == "lifespan.startup.complete", message
        try:
            async with anyio.create_task_group() as requests:
                yield Client(app, requests, state)
        finally:
            await to_app.send({"type": "lifespan.shutdown"})
            with anyio.fail_after(STEP_TIMEOUT + 30):
                message = await outbox.receive()
            assert message["type"] == "lifespan.shutdown.complete", message


@asynccontextmanager
async def client(app: App) -> AsyncIterator[Client]:
    """Requests against an app that needs no lifespan."""
    async with anyio.create_task_group() as tg:
        yield Client(app, tg, {})
