"""ASGI responses that create or resume a stream and send it as Server-Sent Events.

Framework-free: `EventStreamResponse` is an ASGI callable for one request, `EventStreamApp` an
ASGI app that serves every stream id under a path. `resumable_stream.starlette` wraps the
response for Starlette and FastAPI endpoints.

Each chunk becomes one event whose `id` is the character offset just past it, so the
`Last-Event-ID` an `EventSource` sends when it reconnects is exactly where to resume; the
`resumeAt` query parameter does the same for clients that cannot set headers. A finished stream
answers 204, which tells `EventSource` to stop reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from . import _protocol as p
from ._context import ResumableStreamContext
from ._event import Event
from ._http import (
    Authorize,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    body,
    check_callables,
    check_headers,
    check_options,
    context_of,
    last_path_segment,
    plain,
    resume_cursor,
    send_whole,
)
from ._options import check_seconds
from .http import EventStream, Frames, PreparedResponse, prepare_stop

__all__ = [
    "Authorize",
    "ClientScriptApp",
    "EventStreamApp",
    "EventStreamResponse",
    "Headers",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "StopStreamApp",
    "resume_cursor",
    "send_prepared",
    "with_context",
]

logger = logging.getLogger("resumable_stream")

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CLEANUP_TIMEOUT = 5.0


class EventStreamResponse(EventStream):
    """Create or resume `stream_id` on `context` and send it to this request: an ASGI callable.

    The options are `resumable_stream.http.EventStream`'s, which decides the status, the
    headers and the body (`authorize` gets the ASGI scope); this sends them, and ends the
    response when the client disconnects (the producer keeps running). With `make_stream`, the
    first request for the id produces the stream and later ones follow it; without, the
    response only resumes (204 if there is nothing to resume). `raw=True` sends the plain text
    from the cursor instead of SSE. Arguments are checked here (`TypeError`, `ValueError`),
    never once the response runs.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        opened = await self._open(
            scope.get("method", "GET"),
            scope.get("headers", ()),
            scope.get("query_string", b""),
            scope,
        )
        if isinstance(opened, PreparedResponse):
            await send_whole(opened, send)
            return
        reader, new_reader = opened
        frames = self._frames(reader, new_reader)
        headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.stream_headers()
        ]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                await self._send_body(frames, send, tg)
                tg.cancel_scope.cancel()
        except OSError:
            pass
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                await reader.aclose()

    async def _send_body(self, frames: Frames, send: Send, tg: TaskGroup) -> None:
        # The framework-neutral body (`EventStreamBody`) waits for frames in a task of its own
        # so that it can hand out keep-alives; here a task group is at hand, and a keep-alive
        # task costs nothing per batch.
        keepalive = self.keepalive
        clock = _clock()
        # Time of the last send, and whether one is in progress, for the keep-alive task.
        last_sent = clock()
        sending = False

        async def keep_alive(interval: float) -> None:
            # A task rather than a timeout around each wait: a cancel scope per batch would
            # cost more than the send itself.
            nonlocal last_sent, sending
            while True:
                # sleep_until, never sleep(deadline - now): the deadline may be past already
                # (uvloop's clock counts milliseconds and its timers fire a hair early; a slow
                # send outlasts it), and anyio.sleep raises on a negative delay.
                await anyio.sleep_until(last_sent + interval)
                if sending:
                    # A send in progress is activity, however long the client takes to read
                    # it: look again an interval later instead of spinning until it ends.
                    await anyio.sleep(interval)
                elif anyio.current_time() >= last_sent + interval:
                    sending = True
                    try:
                        await body(send, self.keepalive_frame)
                    except OSError:
                        return  # the client is gone; the next send of the body says so too
                    sending = False
                    last_sent = anyio.current_time()

        if keepalive is not None and not self.raw:
            tg.start_soon(keep_alive, keepalive)
        # OSError is how ASGI 2.4 servers say the client went away; caught here, in the
        # task group's own body, as anyio would wrap it in an ExceptionGroup otherwise.
        with contextlib.suppress(OSError):
            # After the first frames, `wait()` returns at once when more are ready, so `ready()`
            # (which also hands out the head frame) is not asked again: one call less per batch.
            piece = frames.ready()
            while True:
                if piece is None:
                    try:
                        piece = await frames.wait()
                    except StopAsyncIteration:
                        break
                sending = True
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                sending = False
                last_sent = clock()
                piece = None
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _clock() -> Callable[[], float]:
    """`anyio.current_time`, without its lookup of the running library on every call: the body
    reads the clock after every send."""
    try:
        return asyncio.get_running_loop().time  # what anyio.current_time reads on asyncio
    except RuntimeError:
        return anyio.current_time  # trio


class EventStreamApp:
    """An ASGI app serving `GET <mount>/<stream_id>` for any framework that can mount one.

    `context` is the context or a function of the ASGI scope returning it (for a context made
    in the lifespan: `lambda scope: scope["state"]["streams"]`). `make_stream(stream_id, scope)`
    returns the generator for a new stream; without it the app only follows (with `wait`, a
    stream not started yet is waited for: see `EventStream`). `stream_id(scope)`
    picks the id (default: the last segment of the path). `authorize(scope, stream_id)` is
    asked before anything is created or read (403 if it says no). Other options are those of
    `EventStreamResponse`.
    """

    def __init__(
        self,
        context: ResumableStreamContext | Callable[[Scope], ResumableStreamContext],
        make_stream: Callable[[str, Scope], AsyncIterable[str | Event]] | None = None,
        *,
        stream_id: Callable[[Scope], str] | None = None,
        raw: bool = False,
        keepalive: float | None = 15.0,
        retry: int | None = None,
        headers: Headers | None = None,
        authorize: Authorize | None = None,
        wait: float | None = None,
    ) -> None:
        check_options(keepalive, retry)
        check_callables(make_stream=make_stream, stream_id=stream_id, authorize=authorize)
        if wait is not None:
            check_seconds("wait", wait, zero=True)
        self._context = context
        self._make_stream = make_stream
        self._stream_id = stream_id or last_path_segment
        self._options: dict[str, Any] = {
            "raw": raw,
            "keepalive": keepalive,
            "retry": retry,
            "headers": check_headers(headers),
            "authorize": authorize,
            "wait": wait,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"EventStreamApp serves HTTP only, not {scope['type']!r}")
        if scope["method"] != "GET":
            await plain(send, 405, "use GET", [(b"allow", b"GET")])
            return
        context = context_of(self._context, scope)
        try:
            stream_id = p.validate_stream_id(self._stream_id(scope))
        except ValueError as exc:
            await plain(send, 400, str(exc))
            return
        make_stream = self._make_stream
        make = None if make_stream is None else (lambda: make_stream(stream_id, scope))
        response = EventStreamResponse(context, stream_id, make, **self._options)
        await response(scope, receive, send)


class StopStreamApp:
    """An ASGI app: `POST` (or `DELETE`) `<mount>/<stream_id>` stops that stream, from any worker.

    Answers 204 once the stop reached the producer (or recorded it, for a stream not started
    yet); 400 for a malformed id, 403 if `authorize(scope, stream_id)` says no. A client
    disconnecting from a stream is not a stop; this is.
    """

    def __init__(
        self,
        context: ResumableStreamContext | Callable[[Scope], ResumableStreamContext],
        *,
        stream_id: Callable[[Scope], str] | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self._context = context
        self._stream_id = stream_id or last_path_segment
        self._authorize = authorize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"StopStreamApp serves HTTP only, not {scope['type']!r}")
        try:
            stream_id = self._stream_id(scope)
        except ValueError as exc:
            await plain(send, 400, str(exc))
            return
        context = context_of(self._context, scope)
        answer = await prepare_stop(
            context, stream_id, method=scope["method"], request=scope, authorize=self._authorize
        )
        await send_whole(answer, send)


class ClientScriptApp:
    """An ASGI app serving the browser client `static/client.js` (`runTask`, `follow`) to GET.

    Mount it where pages import it from, e.g. `import { runTask } from "/client.js"`. Answers
    with an ETag (304 when `If-None-Match` has it) and `cache_control` (default: revalidate).
    """

    def __init__(self, *, cache_control: str = "no-cache") -> None:
        import hashlib
        import importlib.resources

        script = importlib.resources.files("resumable_stream").joinpath("static/client.js")
        self.body = script.read_bytes()
        self.etag = f'"{hashlib.sha256(self.body).hexdigest()[:32]}"'.encode()
        self._headers = [(b"etag", self.etag), (b"cache-control", cache_control.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"ClientScriptApp serves HTTP only, not {scope['type']!r}")
        if scope["method"] not in ("GET", "HEAD"):
            await plain(send, 405, "use GET", [(b"allow", b"GET, HEAD")])
            return
        tags = b",".join(v for k, v in scope.get("headers", ()) if k == b"if-none-match")
        if any(t.strip().removeprefix(b"W/") in (self.etag, b"*") for t in tags.split(b",")):
            await send({"type": "http.response.start", "status": 304, "headers": self._headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [
            (b"content-type", b"text/javascript; charset=utf-8"),
            (b"content-length", str(len(self.body)).encode()),
            *self._headers,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


async def send_prepared(response: PreparedResponse, receive: Receive, send: Send) -> None:
    """Send a `PreparedResponse` (from `resumable_stream.http` or `.ai_sdk`) to an ASGI client.

    A streamed body ends when the client disconnects (the stream carries on for its other
    readers); a body that is never sent is let go.
    """
    body_iter = response.body
    if body_iter is None:
        await send_whole(response, send)
        return
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    try:
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()  # cancels the body's wait, which lets its reader go

            tg.start_soon(watch_disconnect)
            # OSError is how ASGI 2.4 servers say the client went away; caught in the task
            # group's own body, as anyio would wrap it in an ExceptionGroup otherwise.
            with contextlib.suppress(OSError):
                async for piece in body_iter:
                    await body(send, piece)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            tg.cancel_scope.cancel()
    except OSError:
        pass
    finally:
        await response.aclose()


def with_context(app: ASGIApp, context: ResumableStreamContext) -> ASGIApp:
    """`app` with `context` open from the server's lifespan startup to its shutdown.

    For frameworks without a lifespan of their own (Django): the lifespan events are answered
    here and not passed on (startup fails, with the reason, if the context cannot open); every
    other connection goes to `app`.
    """

    async def app_with_context(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        await receive()  # lifespan.startup
        started = False
        try:
            async with context:
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except Exception as exc:
            # The server prints the message and stops (startup) or reports it (shutdown).
            failed = "lifespan.shutdown.failed" if started else "lifespan.startup.failed"
            await send({"type": failed, "message": f"{type(exc).__name__}: {exc}"})
            return
        await send({"type": "lifespan.shutdown.complete"})

    return app_with_context
