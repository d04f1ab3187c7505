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

import contextlib
import functools
import logging
from collections.abc import AsyncIterable, Callable
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from . import _protocol as p
from ._context import ResumableStream, ResumableStreamContext
from ._event import Event
from ._exceptions import (
    BackendError,
    ProducerLostError,
    ProducerUnavailableError,
    ResumableStreamError,
    StreamCancelledError,
    StreamFailedError,
)
from ._http import (
    DEFAULT_KEEPALIVE_FRAME,
    Authorize,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    allowed,
    body,
    check_callables,
    check_frame,
    check_headers,
    check_options,
    context_of,
    error_frame,
    error_info,
    last_path_segment,
    plain,
    raw_body,
    request_cursor,
    resume_cursor,
    sse_body,
)
from ._producer import MakeStream

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
]

logger = logging.getLogger("resumable_stream")


_SMALL_BATCH = 16
_COALESCE_TURNS = 4
_CLEANUP_TIMEOUT = 5.0


class EventStreamResponse:
    """Create or resume `stream_id` on `context` and send it to this request.

    With `make_stream`, the first request for the id produces the stream and later ones follow
    it; without, the response only resumes (204 if there is nothing to resume). `raw=True`
    sends the plain text from the cursor instead of SSE, for fetch-based clients that count
    characters themselves. `keepalive` is the idle time (seconds) after which `keepalive_frame`
    (a comment) is sent so proxies keep the connection open; `retry` (milliseconds) is sent to
    `EventSource`s as their reconnection delay. `headers` (a mapping or `(name, value)` pairs)
    are added to a 200's. `authorize(scope, stream_id)` is asked before anything is created or
    read (403 if it says no). Arguments are checked here (`TypeError`, `ValueError`), never once
    the response runs.
    """

    def __init__(
        self,
        context: ResumableStreamContext,
        stream_id: str,
        make_stream: MakeStream | None = None,
        *,
        raw: bool = False,
        keepalive: float | None = 15.0,
        retry: int | None = None,
        headers: Headers | None = None,
        authorize: Authorize | None = None,
        keepalive_frame: bytes = DEFAULT_KEEPALIVE_FRAME,
        id_prefix: str = "",
    ) -> None:
        # Checked here: once the response runs, a bad argument could only be a 500.
        check_options(keepalive, retry)
        check_callables(make_stream=make_stream, authorize=authorize)
        self.keepalive_frame = check_frame(keepalive_frame)
        if not isinstance(id_prefix, str) or any(c in id_prefix for c in "\r\n\0"):
            raise ValueError(f"id_prefix must be a str without CR, LF or NUL, got {id_prefix!r}")
        self.id_prefix = id_prefix
        self.authorize = authorize
        self.context = context
        self.stream_id = stream_id
        self.make_stream = make_stream
        self.raw = raw
        self.keepalive = keepalive
        self.retry = retry
        self.headers = check_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            stream_id = p.validate_stream_id(self.stream_id)
            cursor = request_cursor(scope, self.id_prefix)
        except ValueError as exc:
            await plain(send, 400, str(exc))
            return
        if not await allowed(self.authorize, scope, stream_id):
            await plain(send, 403, "not allowed")
            return
        if cursor is not None and cursor.seen_end:
            await _no_content(send)  # it has seen the frame that ended the stream: stop
            return
        resume_at = None if cursor is None else cursor.offset
        try:
            # A request with a cursor continues a stream it saw; it never starts a new one
            # (that would serve the new stream's text from an offset into the old one).
            if self.make_stream is not None and resume_at is None:
                stream = await self.context.resumable_stream(stream_id, self.make_stream)
            else:
                stream = await self.context.resume_existing_stream(stream_id, resume_at)
        except (StreamFailedError, StreamCancelledError, ProducerLostError) as exc:
            await self._ended(exc, send)
            return
        except ProducerUnavailableError:
            await plain(send, 503, "the stream's producer did not answer; try again")
            return
        except BackendError as exc:
            logger.warning("could not open stream %r: %s", stream_id, exc)
            await plain(send, 503, "the stream store is unavailable; try again")
            return
        if stream is None:
            await _no_content(send)
            return
        await self._stream(stream, receive, send, new_reader=cursor is None)

    async def _ended(self, exc: ResumableStreamError, send: Send) -> None:
        """A stream that already ended badly: every reader learns how, a reconnecting one too
        (it may have all the text and miss only the end); the end frame's id then stops it."""
        if self.raw:
            await plain(send, 410, error_info(exc)[1])
        else:
            headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": error_frame(exc, self.id_prefix)})

    async def _stream(
        self, stream: ResumableStream, receive: Receive, send: Send, new_reader: bool
    ) -> None:
        media = b"text/plain; charset=utf-8" if self.raw else b"text/event-stream; charset=utf-8"
        headers = [
            (b"content-type", media),
            (b"cache-control", b"no-cache, no-transform"),
            (b"x-accel-buffering", b"no"),
        ]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                await self._send_body(stream, send, tg, new_reader)
                tg.cancel_scope.cancel()
        except OSError:
            pass
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                await stream.aclose()

    async def _send_body(
        self, reader: ResumableStream, send: Send, tg: TaskGroup, new_reader: bool
    ) -> None:
        prefix = self.id_prefix
        encode = raw_body if self.raw else functools.partial(sse_body, id_prefix=prefix)
        keepalive = self.keepalive
        # Time of the last send, and whether one is in progress, for the keep-alive task.
        last_sent = anyio.current_time()
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
            if not self.raw:
                # A new reader's first frame gives it a cursor (an id-only block dispatches
                # nothing), so its reconnect resumes even before the first chunk: a stream that
                # ended meanwhile still sends it everything, and how it ended.
                head = f"retry: {self.retry}\n" if self.retry is not None else ""
                if new_reader:
                    head += f"id: {prefix}0\n"
                if head:
                    await body(send, f"{head}\n".encode())
            while True:
                entries = reader.take_ready()
                if not entries:
                    try:
                        entries = await reader.next_batch()
                    except StopAsyncIteration:
                        break
                    except ResumableStreamError as exc:
                        if not self.raw:
                            await body(send, error_frame(exc, prefix))
                        break
                    # A generator handing over one chunk per loop turn would cost one send
                    # per chunk; a few more turns let the next chunks join this send.
                    for _ in range(_COALESCE_TURNS):
                        if len(entries) >= _SMALL_BATCH:
                            break
                        await anyio.lowlevel.checkpoint()
                        more = reader.take_ready()
                        if not more:
                            break
                        entries += more
                sending = True
                await body(send, encode(entries))
                sending = False
                last_sent = anyio.current_time()
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _no_content(send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


class EventStreamApp:
    """An ASGI app serving `GET <mount>/<stream_id>` for any framework that can mount one.

    `context` is the context or a function of the ASGI scope returning it (for a context made
    in the lifespan: `lambda scope: scope["state"]["streams"]`). `make_stream(stream_id, scope)`
    returns the generator for a new stream; without it the app only resumes. `stream_id(scope)`
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
    ) -> None:
        check_options(keepalive, retry)
        check_callables(make_stream=make_stream, stream_id=stream_id, authorize=authorize)
        self._context = context
        self._make_stream = make_stream
        self._stream_id = stream_id or last_path_segment
        self._options: dict[str, Any] = {
            "raw": raw,
            "keepalive": keepalive,
            "retry": retry,
            "headers": check_headers(headers),
            "authorize": authorize,
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
        if scope["method"] not in ("POST", "DELETE"):
            await plain(send, 405, "use POST or DELETE", [(b"allow", b"POST, DELETE")])
            return
        try:
            stream_id = p.validate_stream_id(self._stream_id(scope))
        except ValueError as exc:
            await plain(send, 400, str(exc))
            return
        if not await allowed(self._authorize, scope, stream_id):
            await plain(send, 403, "not allowed")
            return
        try:
            await context_of(self._context, scope).cancel_stream(stream_id)
        except BackendError as exc:
            logger.warning("could not stop stream %r: %s", stream_id, exc)
            await plain(send, 503, "the stream store is unavailable; try again")
            return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


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
