"""The context for threads and sync code: one event loop of its own, in a thread, serving every
thread of the process (a Celery threads pool, gunicorn threads, a Flask app, a script).

It sits on top of the async context and changes nothing in it: every call is the async
context's call, run in that loop. A writer's chunks cross to the loop in batches: `write`
appends to a thread-safe queue and asks the loop to take it only when no such request is
pending, so a thread that writes fast costs one hand-off per batch, not per chunk; a task of
the loop holds the async writer for the `with` block's life (the writer's cancel scope is
entered and left in that one task) and appends the batch to the stream. A reader crosses once
per batch too (`next_batch` of the async reader).

A process forked after the context was opened (Celery's prefork pool forks after importing the
app module) inherits a copy of the loop and of its sockets, but not its thread. In the child
the context leaves them alone, for good (the parent still uses the sockets), and opens anew,
from the same arguments, on first use; a context made from client or backend objects, whose
connections would be the parent's, refuses to instead.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
import anyio.lowlevel

from ._backend import Backend
from ._buffer import Entry
from ._context import ContextStats, ResumableStreamContext, create_resumable_stream_context
from ._event import Event
from ._exceptions import ResumableStreamError, StreamCancelledError
from ._reader import ResumableStream
from ._writer import StreamWriter

if TYPE_CHECKING:
    import redis.asyncio

__all__ = [
    "SyncResumableStream",
    "SyncResumableStreamContext",
    "SyncStreamWriter",
    "create_sync_context",
]

_T = TypeVar("_T")

# The most chunks a writer's loop appends before letting the loop's other tasks run.
_BATCH = 1024

# The contexts of this process, for the fork handler.
_CONTEXTS: weakref.WeakSet[SyncResumableStreamContext] = weakref.WeakSet()
# What a forked child inherited of its parent's open contexts (their loops, clients, sockets):
# kept for the child's life and never touched, so that no finaliser closes a socket that the
# parent still uses.
_INHERITED: list[object] = []


def _after_fork_in_child() -> None:
    for context in list(_CONTEXTS):
        context._forked()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Loop:
    """An event loop in a thread of its own, running one async context for its whole life."""

    def __init__(self, context: ResumableStreamContext) -> None:
        self.context = context
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closed: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.thread = threading.Thread(
            target=self._run, name="resumable_stream sync context", daemon=True
        )
        self.thread.start()
        try:
            self._opened.result()
        finally:
            if self._opened.exception() is not None:
                self.thread.join()

    def _run(self) -> None:
        try:
            anyio.run(self._main)
        except BaseException as exc:
            if not self._opened.done():
                self._opened.set_exception(exc)
            self._closed.set_exception(exc)
        else:
            self._closed.set_result(None)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.context:
            self._opened.set_result(None)
            await self._stop.wait()

    def submit(self, coroutine: Awaitable[_T]) -> concurrent.futures.Future[_T]:
        """Run `coroutine` in the loop, as a task of its own; its future."""
        if threading.current_thread() is self.thread:
            raise RuntimeError(
                "a sync context's method was called from its own event loop, which it would "
                "block: use the async context's methods there"
            )
        loop = self.loop
        assert loop is not None

        async def run() -> _T:
            return await coroutine

        try:
            return asyncio.run_coroutine_threadsafe(run(), loop)
        except RuntimeError:  # the loop is closed
            if asyncio.iscoroutine(coroutine):
                coroutine.close()
            raise _closed_error() from None

    def call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run `fn()` in the loop and wait for its result (or its exception)."""
        return result_of(self.submit(fn()))

    def call_soon(self, fn: Callable[[], object]) -> None:
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to do
            self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        """Leave the async context (draining its streams as it does), stop the thread."""
        if self.loop is not None and self._stop is not None:
            self.call_soon(self._stop.set)
        self.thread.join()
        self._closed.result()


def result_of(future: concurrent.futures.Future[_T]) -> _T:
    """`future.result()`; a task the closing loop cancelled is a closed context's error, and a
    wait that is interrupted (KeyboardInterrupt) cancels the task."""
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        raise _closed_error() from None
    except BaseException:
        if not future.done():
            future.cancel()
        raise


def _closed_error() -> ResumableStreamError:
    return ResumableStreamError("the stream context was closed")


class SyncResumableStreamContext:
    """The context for threads and sync code (`rs.create_sync_context(...)`): the async
    context's streams, readers and writers, with blocking methods that any thread may call at
    once. It runs one event loop of its own, in a thread.

    Open it with `with ctx:` (or `open()` and `close()`); used before that, it opens itself
    and closes when the interpreter exits. Closing it leaves the async context: running
    streams get `drain_timeout` to end, then are stopped.

    In a process forked after it was opened, it opens anew on first use, from the same
    arguments, and never touches what the parent's loop left behind; only a context made from
    a URL (or `REDIS_URL`, or the in-memory default) can, so one made from a client or backend
    object raises `RuntimeError` there instead (make it in the child then: in Celery, in a
    `worker_process_init` handler).
    """

    def __init__(
        self,
        make_context: Callable[[], ResumableStreamContext],
        *,
        reopen_after_fork: bool = True,
    ) -> None:
        self._make_context = make_context
        self._first: ResumableStreamContext | None = make_context()  # checks the arguments
        self._reopen_after_fork = reopen_after_fork
        self._lock = threading.Lock()
        self._runner: _Loop | None = None
        self._pid = os.getpid()
        self._closed = False
        self._unusable: str | None = None
        self._atexit = False
        _CONTEXTS.add(self)

    def __repr__(self) -> str:
        state = "open" if self._runner is not None else "closed" if self._closed else "not open"
        return f"<SyncResumableStreamContext {state}>"

    # Opening and closing

    def open(self) -> None:
        """Open the context (its loop and its backend connection); idempotent."""
        self._loop()

    def close(self) -> None:
        """Close the context: running streams get `drain_timeout` to end, then are stopped.
        Idempotent; a closed context cannot be opened again."""
        with self._lock:
            runner, self._runner = self._runner, None
            self._closed = True
        if runner is not None and self._pid == os.getpid():
            runner.close()

    def __enter__(self) -> SyncResumableStreamContext:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _loop(self) -> _Loop:
        runner = self._runner
        if runner is not None and self._pid == os.getpid():
            return runner
        if self._pid != os.getpid():
            self._forked()  # a fork the handler did not see
        with self._lock:
            if self._unusable is not None:
                raise RuntimeError(self._unusable)
            if self._closed:
                raise RuntimeError("this sync context was closed")
            if self._runner is None:
                context, self._first = self._first, None
                if context is None:
                    context = self._make_context()
                self._runner = _Loop(context)
                if not self._atexit:
                    self._atexit = True
                    atexit.register(_close_at_exit, weakref.ref(self))
            return self._runner

    def _forked(self) -> None:
        """In a forked child: whatever the parent had open stays as it is, unused."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._lock = threading.Lock()  # another thread may have held it when the fork came
        had = self._runner is not None
        if self._runner is not None:
            _INHERITED.append(self._runner)
            self._runner = None
        if self._first is not None:
            _INHERITED.append(self._first)
            self._first = None
        if had and not self._reopen_after_fork:
            self._unusable = (
                "this sync context was opened before the process forked, with a client or "
                "backend object whose connections are the parent's: make the context with a "
                "URL (or REDIS_URL), or make it in the child (in Celery: worker_process_init)"
            )

    # Streams

    def writer(self, stream_id: str, *, restart: bool = False) -> SyncStreamWriter:
        """A writer of a new stream `stream_id`: `with ctx.writer(stream_id) as w:
        w.write(chunk)`. The same semantics as the async `ctx.writer` (see `SyncStreamWriter`
        and `StreamWriter`): `StreamExistsError` when entered if the id exists, `restart=True`
        for a retried job."""
        runner = self._loop()
        return SyncStreamWriter(runner, runner.context.writer(stream_id, restart=restart))

    def resume_existing_stream(
        self,
        stream_id: str,
        resume_at: int | None = None,
        wait: float | None = None,
        attempt: int | None = None,
    ) -> SyncResumableStream | None:
        """A reader of a running stream (an iterator of its `str` chunks, with `close()`), or
        None if there is no such stream or it finished: the async method's semantics, `wait`
        and `attempt` included."""
        runner = self._loop()
        context = runner.context
        reader = runner.call(
            lambda: context.resume_existing_stream(stream_id, resume_at, wait=wait, attempt=attempt)
        )
        return None if reader is None else SyncResumableStream(runner, reader)

    def has_existing_stream(self, stream_id: str) -> Literal[True, "DONE"] | None:
        """None if there is no such stream, "DONE" if it finished, else True."""
        runner = self._loop()
        return runner.call(lambda: runner.context.has_existing_stream(stream_id))

    def current_attempt(
        self, stream_id: str, *, newer_than: int | None = None, wait: float | None = None
    ) -> int | None:
        """Which attempt `stream_id` is at, None if there is no such stream; with `newer_than`
        and `wait`, waits for a newer one (see the async `current_attempt`)."""
        runner = self._loop()
        return runner.call(
            lambda: runner.context.current_attempt(stream_id, newer_than=newer_than, wait=wait)
        )

    def cancel_stream(self, stream_id: str) -> None:
        """Stop a stream from any process (see the async `cancel_stream`). Idempotent."""
        runner = self._loop()
        runner.call(lambda: runner.context.cancel_stream(stream_id))

    def stats(self) -> ContextStats:
        """A snapshot of the context (no backend command)."""
        runner = self._loop()

        async def stats() -> ContextStats:
            return runner.context.stats()

        return runner.call(stats)


def _close_at_exit(ref: weakref.ref[SyncResumableStreamContext]) -> None:
    context = ref()
    if context is not None and context._pid == os.getpid():
        context.close()


class SyncResumableStream:
    """A reader of one stream for sync code: an iterator of its `str` chunks, with `close()`
    (also a context manager). It waits in the context's loop once per batch of chunks: a
    stream's end raises `StopIteration`, a bad end the error it ended with, as the async
    reader does."""

    __slots__ = ("_closed", "_reader", "_ready", "_runner")

    def __init__(self, runner: _Loop, reader: ResumableStream) -> None:
        self._runner = runner
        self._reader = reader
        self._ready: collections.deque[str] = collections.deque()
        self._closed = False

    def __repr__(self) -> str:
        return f"<SyncResumableStream attempt={self.attempt}>"

    @property
    def attempt(self) -> int:
        """Which attempt of the stream this reads (see `ResumableStream.attempt`)."""
        return self._reader.attempt

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        ready = self._ready
        while not ready:
            for item, _ in self.next_batch():
                ready.append(item if type(item) is str else item.data)  # type: ignore[union-attr]
        return ready.popleft()

    def next_batch(self, limit: int | None = None) -> list[Entry]:
        """Wait for chunks and take those available (at most `limit`), each with the offset
        just past it; `StopIteration` at the end."""
        if self._closed:
            raise StopIteration
        reader = self._reader

        async def batch() -> list[Entry] | None:
            try:
                return await reader.next_batch(limit)
            except StopAsyncIteration:
                return None

        entries = self._runner.call(batch)
        if entries is None:
            self._closed = True
            raise StopIteration
        return entries

    def close(self) -> None:
        """Stop reading; the stream and its other readers carry on (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        with contextlib.suppress(ResumableStreamError):  # the context closed: nothing to free
            self._runner.call(self._reader.aclose)

    def __enter__(self) -> SyncResumableStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncStreamWriter:
    """Writes one stream from sync code: `with ctx.writer(stream_id) as w: w.write(chunk)`.

    The async `StreamWriter`'s semantics: entering starts the stream (`StreamExistsError` if
    the id exists); leaving normally ends it done, an exception ends it failed (and goes on);
    `close()` and `fail(message)` end it before that. Ending waits until the end is announced
    and written. A stop (`ctx.cancel_stream` from any process, the context closing) ends the
    stream cancelled: the next `write` raises `StreamCancelledError`, and the `with` then exits
    without an exception (`cancelled` tells).

    `write` never waits: it appends to a queue that the context's loop takes in batches (one
    hand-off between threads per batch, however fast the chunks come), and the loop appends
    them to the stream as the async writer does. One writer is for one thread at a time.
    """

    __slots__ = (
        "_cancel_error",
        "_end",
        "_entered",
        "_holder",
        "_open",
        "_pending",
        "_runner",
        "_scheduled",
        "_wake",
        "_writer",
        "stream_id",
    )

    def __init__(self, runner: _Loop, writer: StreamWriter) -> None:
        self.stream_id = writer.stream_id
        self._runner = runner
        self._writer = writer
        self._pending: collections.deque[str | Event] = collections.deque()
        self._scheduled = False  # a hand-off to the loop is pending
        self._wake: asyncio.Event | None = None
        # How the block ends: ("close",), ("fail", message) or ("exit", its exception).
        self._end: tuple[Any, ...] | None = None
        self._entered = False
        # Entered, and neither ended nor stopped (as far as this side knows): `write`'s check.
        self._open = False
        self._holder: concurrent.futures.Future[None] | None = None
        self._cancel_error: StreamCancelledError | None = None

    def __repr__(self) -> str:
        return f"<SyncStreamWriter {self.stream_id!r}>"

    @property
    def attempt(self) -> int:
        """Which attempt of the stream this writes (1, or more after `restart=True`)."""
        return self._writer.attempt

    @property
    def cancelled(self) -> bool:
        """Whether the stream was stopped before the writer ended it."""
        return self._writer.cancelled

    def __enter__(self) -> SyncStreamWriter:
        if self._entered:
            raise RuntimeError("a writer is entered once")
        self._entered = True
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._holder = self._runner.submit(self._hold(started))
        try:
            result_of(started)
        except BaseException:
            if not started.done():
                self._holder.cancel()
            raise
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._holder is None:
            return None
        self._finish(("close",) if exc is None else ("exit", exc))
        if exc is not None and exc is self._cancel_error:
            return True  # the stop's own way out of the block
        return None

    def write(self, chunk: str | Event) -> None:
        """Append `chunk` to the stream (an empty `str` adds nothing); never waits. Raises
        `StreamCancelledError` once the stream was stopped, `ResumableStreamError` once the
        writer ended it, `ValueError` for a chunk that is neither a `str` nor an `Event`."""
        if not self._open:
            self._refuse()
        if type(chunk) is str:
            if not chunk:
                return
        elif isinstance(chunk, Event):
            pass
        elif isinstance(chunk, str):
            if not chunk:
                return
            chunk = str(chunk)
        else:
            raise ValueError(f"a stream's chunks are str or Event, not {type(chunk).__name__}")
        if not self._scheduled and self._writer.cancelled:
            # A stop the loop has seen, and its task holding the writer not yet (once per
            # batch: the holder's flag is the check of every write).
            self._refuse()
        self._pending.append(chunk)
        if not self._scheduled:
            self._scheduled = True
            self._runner.call_soon(self._woken)

    def close(self) -> None:
        """End the stream done, and wait until its end is recorded (idempotent; nothing once
        it was stopped)."""
        self._finish(("close",))

    def fail(self, message: str) -> None:
        """End the stream failed: its readers get `StreamFailedError` (`message` goes to the
        log and to readers in this process)."""
        if not isinstance(message, str):
            raise ValueError(f"message must be a str, not {type(message).__name__}")
        self._finish(("fail", message))

    def _refuse(self) -> None:
        if self._holder is None:
            raise RuntimeError("use the writer as `with ctx.writer(stream_id) as w:`")
        if self._writer.cancelled:
            error = StreamCancelledError(f"stream {self.stream_id!r} was stopped")
            self._cancel_error = error
            raise error
        raise ResumableStreamError(f"the writer of stream {self.stream_id!r} has ended it")

    def _finish(self, end: tuple[Any, ...]) -> None:
        holder = self._holder
        if holder is None:
            raise RuntimeError("use the writer as `with ctx.writer(stream_id) as w:`")
        self._open = False
        if self._end is None:
            self._end = end
            self._runner.call_soon(self._woken)
        result_of(holder)

    # In the loop

    def _woken(self) -> None:
        self._scheduled = False
        if self._wake is not None:
            self._wake.set()

    async def _append(self, pending: collections.deque[str | Event]) -> None:
        """Append what `write` queued, in batches, letting the loop's other tasks run between
        them (a writer's thread may keep the queue full)."""
        writer = self._writer
        while pending:
            batch = [pending.popleft() for _ in range(min(len(pending), _BATCH))]
            writer.write_many(batch)
            await anyio.lowlevel.checkpoint()

    async def _hold(self, started: concurrent.futures.Future[None]) -> None:
        """The task that holds the async writer for the block's life: enters it, appends the
        chunks that `write` queues, ends it as the block ends, and leaves it."""
        writer = self._writer
        self._wake = wake = asyncio.Event()
        try:
            await writer.__aenter__()
        except BaseException as exc:
            started.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        started.set_result(None)
        error: BaseException | None = None
        block_error: BaseException | None = None
        pending = self._pending
        try:
            while True:
                end = self._end
                await self._append(pending)
                if end is not None:
                    break  # set after the block's last write: what it queued is all there
                await wake.wait()
                wake.clear()
            if end[0] == "close":
                await writer.close()
            elif end[0] == "fail":
                await writer.fail(end[1])
            else:
                error = block_error = end[1]
        except BaseException as exc:  # a stop (the writer's scope), or the loop shutting down
            error = exc
        self._open = False  # what the block writes from now on is refused
        pending.clear()
        tb = None if error is None else error.__traceback__
        swallowed = await writer.__aexit__(None if error is None else type(error), error, tb)
        if error is not None and error is not block_error and not swallowed:
            raise error


def create_sync_context(
    redis: str | redis.asyncio.Redis | redis.asyncio.RedisCluster | None = None,
    *,
    backend: Backend | None = None,
    key_prefix: str = "resumable-stream",
    command_timeout: float | None = None,
    **options: Any,
) -> SyncResumableStreamContext:
    """A context for threads and sync code (Celery, RQ, Dramatiq, gunicorn threads, Flask,
    scripts), with the arguments of `create_resumable_stream_context`: see
    `SyncResumableStreamContext`."""
    if redis is None and backend is None:
        redis = os.environ.get("REDIS_URL") or None  # read once: a forked child uses the same
    make = functools.partial(
        create_resumable_stream_context,
        redis,
        backend=backend,
        key_prefix=key_prefix,
        command_timeout=command_timeout,
        **options,
    )
    reopenable = backend is None and (redis is None or isinstance(redis, str))
    return SyncResumableStreamContext(make, reopen_after_fork=reopenable)
