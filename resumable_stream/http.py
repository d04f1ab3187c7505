"""Resumable streams as HTTP responses for any web framework, from plain request values.

`EventStream(context, stream_id, make_stream, **options)` is what an endpoint decides once: its
options, checked when it is built. `await event_stream.prepare(method=..., headers=...,
query=..., request=...)` makes the decisions for one request, from values every framework has:

- the status: 200 (the stream); 204 for a finished stream with nothing more for this reader (it
  tells `EventSource` to stop reconnecting), or no stream at all; 400 for a malformed stream id,
  `Last-Event-ID` or `resumeAt`; 403 when `authorize(request, stream_id)` says no; 410 for a raw
  reader of a stream that ended badly; 503 when the store or the producer does not answer;
- the headers, as `(name, value)` pairs;
- the body: `content` (bytes) for an answer that is not streamed, else `body`, an
  `EventStreamBody`: an async iterator of encoded bytes, keep-alive comments included, which the
  framework sends as it comes. A client disconnect is the framework's to notice: cancelling the
  iterator's `__anext__` or calling its `aclose()` ends the body and detaches the reader (the
  stream, its producer and its other readers carry on); for a framework that notices nothing,
  `prepare(disconnected=...)` takes an awaitable that returns when the client has gone.

`resumable_stream.asgi.EventStreamResponse` is this with an ASGI `__call__`; the Django, Quart
and Falcon adapters (`resumable_stream.django`, `.quart`, `.falcon`) wrap `PreparedResponse`
in their frameworks' responses. `prepare_stop` decides the answer of a stop endpoint.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from . import _protocol as p
from ._context import ResumableStream, ResumableStreamContext
from ._exceptions import (
    BackendError,
    ProducerLostError,
    ProducerUnavailableError,
    ResumableStreamError,
    StreamCancelledError,
    StreamFailedError,
    StreamIncompleteError,
    StreamNotCancellableError,
    StreamRestartedError,
)
from ._http import (
    DEFAULT_KEEPALIVE_FRAME,
    END_ID,
    Headers,
    Query,
    RequestHeaders,
    allowed,
    check_callables,
    check_frame,
    check_headers,
    check_options,
    error_frame,
    error_info,
    parse_cursor,
    raw_body,
    restart_frame,
    sse_body,
)
from ._options import check_seconds
from ._producer import MakeStream
from ._reader import ProducerReader

__all__ = [
    "Authorize",
    "Disconnected",
    "EventStream",
    "EventStreamBody",
    "Headers",
    "PreparedResponse",
    "Query",
    "RequestHeaders",
    "prepare_stop",
]

logger = logging.getLogger("resumable_stream")

Authorize = Callable[[Any, str], bool | Awaitable[bool]]
"""`authorize(request, stream_id)`: may this request create, read or stop that stream? `request`
is what the caller of `prepare` passed: the ASGI scope, Django's `HttpRequest`, Quart's or
Falcon's `Request`. Only `True` (or an awaitable of it) allows."""

Disconnected = Callable[[], Awaitable[object]]
"""A function whose awaitable returns once the client has gone (e.g. it awaits ASGI's
`http.disconnect`)."""

_CLEANUP_TIMEOUT = 5.0
_SSE_MEDIA = "text/event-stream; charset=utf-8"
_TEXT_MEDIA = "text/plain; charset=utf-8"


@dataclass(slots=True)
class PreparedResponse:
    """What to answer: `status`, `headers` (`(name, value)` pairs), then either `content` (the
    whole body) or, for a stream, `body` (send it as it comes, and close it if it is never
    sent: `aclose()`)."""

    status: int
    headers: list[tuple[str, str]]
    content: bytes = b""
    body: EventStreamBody | None = field(default=None, repr=False)

    @property
    def streaming(self) -> bool:
        """Whether the body is `body`, an async iterator, rather than `content`."""
        return self.body is not None

    async def aclose(self) -> None:
        """Let go of the stream's reader, if the body was never sent (idempotent)."""
        if self.body is not None:
            await self.body.aclose()


def plain(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> PreparedResponse:
    """A short text answer (an error's reason)."""
    return PreparedResponse(
        status,
        [("content-type", _TEXT_MEDIA), *(headers or [])],
        text.encode("utf-8", "replace"),
    )


def no_content() -> PreparedResponse:
    return PreparedResponse(204, [])


class EventStream:
    """An endpoint's response of `stream_id` on `context`, for any framework.

    With `make_stream`, the first request for the id produces the stream and later ones follow
    it; without, it only follows (204 if there is nothing to resume), and with `wait` (seconds)
    it waits that long for a stream that does not exist yet (a job still queued): 404 if none
    appeared, 204 for one that finished. A request that carries a cursor only continues a
    stream, it never starts one; a cursor into an earlier attempt of a stream a writer started
    again gets an `event: restart` frame whose id starts the new attempt. `raw=True` sends the
    plain text from the cursor instead of SSE, for fetch-based clients that count characters
    themselves. `keepalive` is the idle time (seconds) after which `keepalive_frame` (a comment)
    is sent so proxies keep the connection open; `retry` (milliseconds) is sent to
    `EventSource`s as their reconnection delay. `headers` (a mapping or `(name, value)` pairs)
    are added to a 200's. `authorize(request, stream_id)` is asked before anything is created or
    read (403 if it says no). `id_prefix` goes before every event id (and is expected before a
    cursor). Every argument is checked here (`TypeError`, `ValueError`), never once a request is
    answered.
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
        wait: float | None = None,
    ) -> None:
        # Checked here: once the response runs, a bad argument could only be a 500.
        check_options(keepalive, retry)
        self.wait = None if wait is None else check_seconds("wait", wait, zero=True)
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

    def stream_headers(self) -> list[tuple[str, str]]:
        """The headers of a 200 that streams: no `Connection` (HTTP/2 forbids it), and nothing
        that lets a proxy buffer or transform the body."""
        return [
            ("content-type", _TEXT_MEDIA if self.raw else _SSE_MEDIA),
            ("cache-control", "no-cache, no-transform"),
            ("x-accel-buffering", "no"),
            *self.headers,
        ]

    async def prepare(
        self,
        *,
        method: str = "GET",
        headers: RequestHeaders = (),
        query: Query = "",
        request: Any = None,
        disconnected: Disconnected | None = None,
    ) -> PreparedResponse:
        """Decide the answer to one request from its `method`, `headers` (a mapping, or pairs of
        `str` or of ASGI's `bytes`) and `query` (the raw query string, or its pairs); `request`
        is what `authorize` gets. A `HEAD` starts and reads nothing: it gets 204 if there is no
        stream, else a 200's headers without a body. `disconnected`, for a framework that does
        not cancel a response whose client went away, ends the body once it returns.

        Never raises for a bad request (that is a 400); an `authorize` that raises does.
        """
        opened = await self._open(method, headers, query, request)
        if isinstance(opened, PreparedResponse):
            return opened
        reader, new_reader = opened
        return PreparedResponse(
            200,
            self.stream_headers(),
            body=EventStreamBody(
                self._frames(reader, new_reader),
                None if self.raw else self.keepalive,
                self.keepalive_frame,
                disconnected,
            ),
        )

    async def _open(
        self, method: str, headers: RequestHeaders, query: Query, request: Any
    ) -> PreparedResponse | tuple[ResumableStream, bool]:
        """The answer, or a reader of the stream and whether it is new (it has no cursor)."""
        try:
            stream_id = p.validate_stream_id(self.stream_id)
            cursor = parse_cursor(headers, query, self.id_prefix)
        except ValueError as exc:
            return plain(400, str(exc))
        if not await allowed(self.authorize, request, stream_id):
            return plain(403, "not allowed")
        if cursor is not None and cursor.attempt == p.UNRESUMABLE:
            return self._unresumable(stream_id, cursor.seen_end)
        try:
            if cursor is not None and cursor.seen_end:
                # It has seen the frame that ended its attempt badly: 204 stops it, unless a
                # newer attempt started meanwhile (a job's retry), which a follow-only endpoint
                # with `wait` waits for: then it is told, and starts reading that one.
                wait = self.wait if self.make_stream is None else None
                attempt = await self.context.current_attempt(
                    stream_id, newer_than=cursor.attempt, wait=wait
                )
                if attempt is None or attempt <= cursor.attempt:
                    return no_content()
                raise StreamRestartedError(f"stream {stream_id!r} was started again", attempt)
            if method == "HEAD":
                state = await self.context.has_existing_stream(stream_id)
                return (
                    no_content() if state is None else PreparedResponse(200, self.stream_headers())
                )
            resume_at = None if cursor is None else cursor.offset
            attempt = None if cursor is None else cursor.attempt
            # A request with a cursor continues a stream it saw; it never starts a new one
            # (that would serve the new stream's text from an offset into the old one).
            if self.make_stream is not None and resume_at is None:
                stream = await self.context.resumable_stream(stream_id, self.make_stream)
            else:
                stream = await self.context.resume_existing_stream(
                    stream_id, resume_at, wait=self.wait, attempt=attempt
                )
            # Nothing within `wait`: a stream that never appeared (404), or one that finished.
            follow_only = self.wait is not None and self.make_stream is None
            if (
                follow_only
                and stream is None
                and not await self.context.has_existing_stream(stream_id)
            ):
                return plain(404, "no such stream")
        except StreamRestartedError as exc:
            if self.raw:
                return plain(409, f"the stream was started again: resume at {exc.attempt}.0")
            return PreparedResponse(
                200, [("content-type", _SSE_MEDIA)], restart_frame(exc, self.id_prefix)
            )
        except (StreamFailedError, StreamCancelledError, ProducerLostError) as exc:
            return self._ended(exc)
        except StreamIncompleteError as exc:
            # Its text (or its end) is lost for good: the reader learns it, as a live one would.
            return self._ended(exc)
        except ProducerUnavailableError:
            return plain(503, "the stream's producer did not answer; try again")
        except BackendError as exc:
            logger.warning(
                "could not open stream %r: %s", stream_id, exc, extra={"stream_id": stream_id}
            )
            return plain(503, "the stream store is unavailable; try again")
        except ResumableStreamError as exc:
            # Anything else of ours (a malformed message from the store, a context closing):
            # nothing was read, so the client may try again.
            logger.warning(
                "could not open stream %r: %s", stream_id, exc, extra={"stream_id": stream_id}
            )
            return plain(503, "the stream could not be read; try again")
        if stream is None:
            return no_content()
        return stream, cursor is None

    def _ended(self, exc: ResumableStreamError) -> PreparedResponse:
        """A stream that already ended badly: every reader learns how, a reconnecting one too
        (it may have all the text and miss only the end); the end frame's id then stops it."""
        if self.raw:
            return plain(410, error_info(exc)[1])
        return PreparedResponse(
            200, [("content-type", _SSE_MEDIA)], error_frame(exc, self.id_prefix)
        )

    def _unresumable(self, stream_id: str, seen_end: bool) -> PreparedResponse:
        """A reconnect with an id of a stream that ran without resumability: its producer's
        text is nowhere else, so whatever this worker could find under the id (nothing, or
        another producer's stream) is not the rest of it. The reader learns that its text is
        incomplete (the frame's id then stops it with a 204), rather than getting a 204 that
        passes the text off as whole, or another text from its offset."""
        if seen_end:
            return no_content()
        exc = StreamIncompleteError(
            f"stream {stream_id!r} ran without resumability (the backend failed as it "
            "started): its text cannot be resumed"
        )
        if self.raw:
            return plain(410, error_info(exc)[1])
        frame = error_frame(exc, self.id_prefix, p.UNRESUMABLE)
        return PreparedResponse(200, [("content-type", _SSE_MEDIA)], frame)

    def _frames(self, reader: ResumableStream, new_reader: bool) -> Frames:
        head = None
        # Ids of a later attempt carry it: `2.15` (see `resumable_stream._http.parse_cursor`);
        # those of a stream run without resumability say so: `0.15`.
        prefix = self.id_prefix + p.attempt_prefix(_id_attempt(reader))
        if not self.raw:
            # A new reader's first frame gives it a cursor (an id-only block dispatches
            # nothing), so its reconnect resumes even before the first chunk: a stream that
            # ended meanwhile still sends it everything, and how it ended.
            text = f"retry: {self.retry}\n" if self.retry is not None else ""
            if new_reader:
                text += f"id: {prefix}0\n"
            if text:
                head = f"{text}\n".encode()
        return Frames(reader, self.raw, self.id_prefix, head)


def _id_attempt(reader: ResumableStream) -> int:
    """The attempt its SSE ids carry: `UNRESUMABLE` for a stream that runs without
    resumability (only its own reader has it), else the attempt it reads."""
    if isinstance(reader, ProducerReader) and reader.offline:
        return p.UNRESUMABLE
    return reader.attempt


class Frames:
    """A reader's batches as encoded frames: `ready()` those there now, `await wait()` the next
    ones; the frame of a bad end (SSE only) comes last. Keep-alives are not its business."""

    __slots__ = ("_attempt", "_encode", "_ended", "_head", "_prefix", "_raw", "_sent", "reader")

    def __init__(
        self, reader: ResumableStream, raw: bool, id_prefix: str, head: bytes | None
    ) -> None:
        self.reader = reader
        self._raw = raw
        self._prefix = id_prefix
        self._head = head
        self._ended = False
        self._sent = False  # whether any of the stream's text went out
        self._attempt = _id_attempt(reader)
        ids = id_prefix + p.attempt_prefix(self._attempt)
        self._encode = raw_body if raw else functools.partial(sse_body, id_prefix=ids)

    def ready(self) -> bytes | None:
        """The next frames if they are there now (no await), else None."""
        head = self._head
        if head is not None:
            self._head = None
            return head
        entries = self.reader.take_ready()
        if not entries:
            return None
        self._sent = True
        return self._encode(entries)

    async def wait(self) -> bytes:
        """Wait for the next frames; StopAsyncIteration after the last."""
        if self._ended:
            raise StopAsyncIteration
        reader = self.reader
        try:
            entries = await reader.next_batch()
        except StopAsyncIteration:
            self._ended = True
            if self._raw or self._sent:
                raise
            # Nothing at all for this reader: it had the whole text already (a reconnect that
            # reached the producer before Redis had its end: it could not record it, say). A
            # body that just ends would have EventSource reconnect to the same answer again
            # and again; an id-only block (it dispatches nothing) moves its cursor past the
            # end, whose reconnect is answered 204, as a finished stream's is.
            return f"id: {self._prefix}{p.attempt_prefix(self._attempt)}{END_ID}\n\n".encode()
        except ResumableStreamError as exc:
            self._ended = True
            if self._raw:
                raise StopAsyncIteration from None  # a raw body just ends
            return error_frame(exc, self._prefix, self._attempt)
        # No extra loop turns to let more chunks join this send: a producer wakes its readers
        # once per batch already (a chunk per loop turn comes as one batch), and a follower
        # gets a batch per message; for a model's tokens every turn waited was wasted.
        self._sent = True
        return self._encode(entries)


class EventStreamBody:
    """A streamed body: an async iterator of encoded bytes, keep-alive frames included, with
    `aclose()`. Made by `EventStream.prepare`.

    The body ends after the stream's last frames (or once `disconnected` returned). A cancelled
    `__anext__` ends it too, as does `aclose()`: either way the reader is let go, shielded from
    the cancellation and bounded in time, and the stream runs on for its other readers.

    The keep-alive needs no task of the framework's: while the consumer waits in `__anext__`,
    the next frames are awaited in a task of their own, and `__anext__` returns the keep-alive
    frame instead once `keepalive` seconds passed since it was called (that is, since the
    previous piece was sent). The wait for the frames is never cancelled to send a keep-alive,
    so a reader in the middle of a recovery is never interrupted; the next `__anext__` takes
    up the same wait. Frames and keep-alives come out of one iterator, so they never interleave.
    """

    __slots__ = (
        "_closed",
        "_disconnected",
        "_frames",
        "_keepalive",
        "_keepalive_frame",
        "_pending",
        "_wake",
        "_watcher",
    )

    def __init__(
        self,
        frames: Frames,
        keepalive: float | None,
        keepalive_frame: bytes,
        disconnected: Disconnected | None,
    ) -> None:
        self._frames = frames
        self._keepalive = keepalive
        self._keepalive_frame = keepalive_frame
        self._disconnected = disconnected
        self._closed = False
        self._pending: _Job[bytes] | None = None
        self._watcher: _Job[object] | None = None
        self._wake: anyio.Event | None = None

    def __aiter__(self) -> EventStreamBody:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            if self._pending is None:
                piece = self._frames.ready()
                if piece is not None:
                    return piece
                if self._keepalive is None and self._disconnected is None:
                    return await self._frames.wait()  # nothing to wait for beside the frames
            return await self._next_or_keepalive()
        except BaseException:
            # The end (StopAsyncIteration), a cancellation (how frameworks react to a client
            # that went away) or a failure: this body is over, and its reader is let go.
            await self.aclose()
            raise

    async def _next_or_keepalive(self) -> bytes:
        if self._pending is None:
            self._pending = _Job(self._frames.wait, self._notify)
        if self._disconnected is not None and self._watcher is None:
            self._watcher = _Job(self._disconnected, self._notify)
        keepalive = self._keepalive
        # A deadline, not a delay: uvloop's timers fire a hair early, and the scope then
        # waits again rather than sending a keep-alive before its time.
        deadline = math.inf if keepalive is None else anyio.current_time() + keepalive
        while True:
            pending = self._pending
            if pending.done:
                self._pending = None
                return pending.result()
            if self._watcher is not None and self._watcher.done:
                raise StopAsyncIteration  # the client went away
            # Both jobs set their `done` before they notify, and nothing is awaited between the
            # checks above and this wait: no notification can be missed.
            wake = self._wake = anyio.Event()
            with anyio.CancelScope(deadline=deadline) as scope:
                await wake.wait()
            if scope.cancel_called:
                return self._keepalive_frame

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def aclose(self) -> None:
        """End the body and let go of the reader (idempotent); the stream carries on."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
            for job in (self._pending, self._watcher):
                if job is not None:
                    await job.cancel()
            await self._frames.reader.aclose()


_T = TypeVar("_T")


class _Job(Generic[_T]):
    """An awaitable run in a task of its own, next to the task that iterates the body, which
    learns of its end through `notify`. Frameworks give a response no task group, so it is a
    task of the event loop's own (a system task under trio); it ends with the body."""

    __slots__ = ("_error", "_finished", "_notify", "_scope", "_task", "_value", "done")

    def __init__(self, fn: Callable[[], Awaitable[_T]], notify: Callable[[], None]) -> None:
        self.done = False
        self._notify = notify
        self._value: _T | None = None
        self._error: BaseException | None = None
        self._scope = anyio.CancelScope()  # entered by the task; cancel() works before that
        self._finished = anyio.Event()
        self._task = _spawn(functools.partial(self._run, fn))

    async def _run(self, fn: Callable[[], Awaitable[_T]]) -> None:
        try:
            with self._scope:
                self._value = await fn()
        except anyio.get_cancelled_exc_class():
            self._error = StopAsyncIteration()
            raise  # the event loop is shutting down
        except BaseException as exc:  # handed over to the iterating task, which raises it
            self._error = exc
        finally:
            if self._scope.cancelled_caught and self._error is None:
                self._error = StopAsyncIteration()
            self.done = True
            self._finished.set()
            self._notify()

    def result(self) -> _T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    async def cancel(self) -> None:
        """Cancel it and wait until it is over."""
        self._scope.cancel()
        await self._finished.wait()


def _spawn(fn: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None] | None:
    """Run `fn()` in a task of the running event loop's own."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio  # anyio's other backend

        trio.lowlevel.spawn_system_task(fn)
        return None
    return loop.create_task(fn())  # kept by the job: the loop holds its tasks weakly


async def prepare_stop(
    context: ResumableStreamContext,
    stream_id: str,
    *,
    method: str = "POST",
    request: Any = None,
    authorize: Authorize | None = None,
) -> PreparedResponse:
    """The answer of a stop endpoint: stop `stream_id` from any worker (`cancel_stream`).

    204 once the stop reached the producer (or was recorded, for a stream not started yet);
    405 unless `method` is POST or DELETE; 400 for a malformed id; 403 if `authorize(request,
    stream_id)` says no; 409 in compat mode for a stream a Node producer runs (it cannot be
    stopped); 503 if the store is unavailable. A client that disconnects from a stream stops
    nothing; this does.
    """
    check_callables(authorize=authorize)
    if method not in ("POST", "DELETE"):
        return plain(405, "use POST or DELETE", [("allow", "POST, DELETE")])
    try:
        stream_id = p.validate_stream_id(stream_id)
    except ValueError as exc:
        return plain(400, str(exc))
    if not await allowed(authorize, request, stream_id):
        return plain(403, "not allowed")
    try:
        await context.cancel_stream(stream_id)
    except StreamNotCancellableError:
        # Compat mode: its producer (a Node one) has no cancellation; it runs to its end.
        return plain(409, "this stream's producer cannot be stopped; it runs to its end")
    except BackendError as exc:
        logger.warning(
            "could not stop stream %r: %s", stream_id, exc, extra={"stream_id": stream_id}
        )
        return plain(503, "the stream store is unavailable; try again")
    return no_content()
