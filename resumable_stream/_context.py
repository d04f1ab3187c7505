"""The context: elects producers, starts followers, and owns the task group producers run in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
from anyio.abc import TaskGroup

from . import _protocol as p
from ._backend import Backend, Connection, CountedConnection, MemoryBackend
from ._buffer import Signal
from ._exceptions import (
    BackendError,
    ResumableStreamError,
    StreamExistsError,
    StreamRestartedError,
    single_exception_out,
)
from ._follower import Follower
from ._hub import Hub
from ._options import Settings, check_int, check_make_stream, check_resume_at, check_seconds
from ._producer import MakeStream, Producer
from ._reader import ProducerReader, ResumableStream
from ._telemetry import Resume
from ._telemetry_setup import make_telemetry
from ._vercel import Compat, VercelProducer, VercelStreams, check_compat
from ._writer import StreamWriter

if TYPE_CHECKING:
    import redis.asyncio

__all__ = [
    "ContextStats",
    "ResumableStream",
    "ResumableStreamContext",
    "create_resumable_stream_context",
]

logger = logging.getLogger("resumable_stream")

_DEFAULTS = Settings()
_NO_BRACES = str.maketrans("{}", "()")
# How long leaving the context waits for its stopped producers' cleanup (each of its steps is
# bounded by 15 s).
_CLOSE_TIMEOUT = 40.0
# Compare-and-set tries of a restart whose sentinel readers keep counting themselves into.
_RESTART_TRIES = 5

# What the context runs: a producer of this library's protocol, or of the reference's.
_Hosted = Producer | VercelProducer
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ContextStats:
    """A snapshot of one context, for a health endpoint (`ctx.stats()`)."""

    producers: int
    """Producers whose generator runs in this context."""
    followers: int
    """Readers here following a stream produced elsewhere."""
    lingering: int
    """Finished producers keeping their text for late resumes (`linger`)."""
    backend_connected: bool
    """The context is open and its backend connection is up (for Redis: its subscriber)."""
    reconnects: int
    """How many times the backend connection came back after an outage."""
    last_reconnect: float | None
    """When it last did (`time.time()`), or None."""


class ResumableStreamContext:
    """Creates and resumes streams on one backend; use it as `async with ctx:`.

    Producers run in the context's task group, so they outlive the request that started them.
    After its end a producer keeps its text for `linger` seconds, so a reader cut off near the
    end can still resume (with a `resume_at`) and get the tail. Leaving the context waits up to
    `drain_timeout` seconds for running producers, then cancels them.

    A producer with followers proves it is alive at least three times per `liveness_timeout`;
    a follower that hears nothing for that long asks again, and learns `ProducerLostError` if
    the producer is gone. A dead stream keeps its id for `lost_ttl` seconds.

    A follower holding more than `max_backlog` unread characters is ended with
    `SlowReaderError`, so a reader that stops reading cannot make memory grow without bound.

    If the backend cannot be reached when a stream starts, `resumable_stream` still runs it,
    for this caller only and not resumable, and logs a warning (`on_backend_error="degrade"`,
    the default); with `"raise"` it raises `BackendError` instead.

    An exception raised inside `async with ctx:` comes out of it as itself, not wrapped in an
    exception group; only several failures at the same time (the block's and the backend's,
    say) come out as a `BaseExceptionGroup`.

    With `opentelemetry-api` installed (and `telemetry=True`, the default), the context reports
    metrics and spans (see the documentation's Metrics and traces) through `meter_provider` and
    `tracer_provider`, by default the global ones; `trace_stream_ids=False` keeps stream ids out
    of span attributes. Without the API, nothing of it is imported or run.

    With `compat="vercel"`, every stream of the context speaks the wire protocol of npm
    `resumable-stream` 2.x under `key_prefix` (its `keyPrefix`), so that a Next.js app on that
    package and this one share streams on one Redis; offsets then count UTF-16 code units
    (see the documentation's "Next.js and Python on one Redis").

    Args:
        backend: The backend every stream of the context lives on (`MemoryBackend`, or
            `resumable_stream.redis.RedisBackend`; `create_resumable_stream_context` makes one).
        key_prefix: Isolates apps sharing one Redis (no braces).
        ttl: Seconds every key of a stream lives (default 86400, 24 hours).
        resume_timeout: Seconds a resume waits for the producer's answer (default 2).
        max_message_size: Characters per pub/sub message (default 1 MiB); replays of any size
            are split.
        drain_timeout: Seconds leaving the context waits for running producers (default 30).
        linger: Seconds a finished producer keeps its text for readers that resume with an
            offset (default 30; 0 keeps nothing after the end).
        liveness_timeout: Seconds within which a follower learns that its producer died
            (default 3).
        lost_ttl: Seconds a dead stream keeps its id (default 60).
        max_backlog: Unread characters a follower may hold before it is ended (default 64 Mi).
        on_backend_error: `"degrade"` (the default) or `"raise"`, for a stream started while
            the backend is unreachable.
        durable: Keep every stream's text in the backend too (default False).
        flush_interval: Seconds a durable stream's text may wait before it is written
            (default 0.02, at most 1).
        telemetry: Report metrics and spans when `opentelemetry-api` is installed (default
            True).
        meter_provider: Where the instruments come from (default: the global provider).
        tracer_provider: Where the spans go (default: the global provider).
        trace_stream_ids: Put stream ids in span attributes (default True).
        compat: `"vercel"` to speak npm `resumable-stream` 2.x's wire protocol (default None).
    """

    def __init__(
        self,
        *,
        backend: Backend,
        key_prefix: str = "resumable-stream",
        ttl: int = _DEFAULTS.ttl,
        resume_timeout: float = _DEFAULTS.resume_timeout,
        max_message_size: int = _DEFAULTS.max_message_size,
        drain_timeout: float = _DEFAULTS.drain_timeout,
        linger: float = _DEFAULTS.linger,
        liveness_timeout: float = _DEFAULTS.liveness_timeout,
        lost_ttl: int = _DEFAULTS.lost_ttl,
        max_backlog: int = _DEFAULTS.max_backlog,
        on_backend_error: Literal["degrade", "raise"] = "degrade",
        durable: bool = False,
        flush_interval: float = _DEFAULTS.flush_interval,
        telemetry: bool = True,
        meter_provider: Any = None,
        tracer_provider: Any = None,
        trace_stream_ids: bool = True,
        compat: Compat | None = None,
    ) -> None:
        compat = check_compat(compat)
        if not isinstance(key_prefix, str) or not key_prefix:
            raise ValueError("key_prefix must be a non-empty str")
        if on_backend_error not in ("degrade", "raise"):
            raise ValueError(
                f"on_backend_error must be 'degrade' or 'raise', got {on_backend_error!r}"
            )
        self._settings = Settings(
            ttl=ttl,
            resume_timeout=resume_timeout,
            max_message_size=max_message_size,
            drain_timeout=drain_timeout,
            linger=linger,
            liveness_timeout=liveness_timeout,
            lost_ttl=lost_ttl,
            max_backlog=max_backlog,
            durable=durable,
            flush_interval=flush_interval,
        )
        for name, flag in (("telemetry", telemetry), ("trace_stream_ids", trace_stream_ids)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self._telemetry = make_telemetry(
            telemetry, meter_provider, tracer_provider, trace_stream_ids
        )
        self._backend = backend
        # A compat context uses none of this protocol's names; the reference allows braces in
        # its prefix, which these names cannot take (they would be unused anyway).
        native_prefix = key_prefix if compat is None else key_prefix.translate(_NO_BRACES)
        self._hub = Hub(self._settings, p.Keys(native_prefix), self._telemetry)
        self._degrade = on_backend_error == "degrade"
        # compat="vercel": every public call goes to the reference protocol's streams.
        self._compat: VercelStreams | None = None
        if compat is not None:
            self._compat = VercelStreams(self._hub, key_prefix, self._launch, self._degrade)
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._running: set[_Hosted] = set()  # producers whose generator has not ended
        self._running_changed = Signal()
        self._local: dict[str, Producer] = {}  # the running producers, by stream id
        self._lingering = 0  # finished producers still answering late resumes
        self._connection: Connection | None = None  # the backend's own, for `stats`
        self._reconnects = 0
        self._last_reconnect: float | None = None
        # On asyncio, each producer runs in a task of the event loop's own (see
        # `_start_producer`); these are those producers, lingering or not, and through them
        # their tasks (the loop holds its tasks weakly). A dict used as an ordered set: they
        # are stopped in the order they started, the same on every run.
        self._native = False
        self._hosted: dict[_Hosted, None] = {}

    def __repr__(self) -> str:
        return f"<ResumableStreamContext backend={self._backend!r}>"

    @property
    def compat(self) -> Compat | None:
        """The other library whose wire protocol this context speaks ("vercel"), or None."""
        return None if self._compat is None else "vercel"

    async def __aenter__(self) -> ResumableStreamContext:
        if self._stack is not None:
            raise RuntimeError("this context is already open")
        async with AsyncExitStack() as stack:
            hub = self._hub
            compat = self._compat
            dispatch = hub.dispatch if compat is None else compat.dispatch
            connection = await stack.enter_async_context(
                self._backend.connect(dispatch, self._reconnected)
            )
            self._connection = connection
            if compat is not None:
                compat.opened(connection)  # before the task group, which would wrap its error
            if self._telemetry.enabled:
                connection = CountedConnection(connection, self._telemetry.command)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self._hub.open(connection, self._tg, inbox=compat is None)
            if self._telemetry.enabled:
                self._tg.start_soon(self._telemetry.run, name="resumable_stream telemetry")
            try:
                asyncio.get_running_loop()
                self._native = True
            except RuntimeError:
                self._native = False  # trio
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        try:
            with anyio.move_on_after(self._settings.drain_timeout):
                while self._running:
                    await self._running_changed.wait()
        finally:
            # Also when the drain itself is cancelled (whatever runs the context is): the
            # helper tasks are cancelled, and none is started from now on (one started in a
            # task group under a scope cancelled already would never learn it).
            self._hub.closing()
            assert self._tg is not None
            self._tg.cancel_scope.cancel()
            for follower in self._hub.followers():
                follower.fail(ResumableStreamError("the stream context was closed"))
            if self._compat is not None:
                self._compat.close()
            # What cancelling the task group does to the producers it runs, for those that run
            # in tasks of their own: stop them, end their linger, wait for their cleanup.
            await self._close_hosted()
            try:
                # The task groups (this context's, the backend's) would wrap an exception of
                # the caller's block in a group: it comes out as itself, unless there are more.
                async with single_exception_out():
                    await stack.__aexit__(exc_type, exc, tb)
            finally:
                self._hub.close()
                self._tg = None
                self._connection = None
                self._telemetry.flush()  # what the last tasks measured
        return None

    def _reconnected(self) -> None:
        self._reconnects += 1
        self._last_reconnect = time.time()
        self._telemetry.reconnect()
        self._hub.resync()
        if self._compat is not None:
            self._compat.resync()

    def stats(self) -> ContextStats:
        """A snapshot of this context (no backend command): for a health endpoint."""
        connection = self._connection
        return ContextStats(
            producers=len(self._running),
            followers=self._hub.follower_count()
            + (0 if self._compat is None else self._compat.follower_count()),
            lingering=self._lingering,
            backend_connected=connection is not None and getattr(connection, "connected", True),
            reconnects=self._reconnects,
            last_reconnect=self._last_reconnect,
        )

    # Public API

    async def resumable_stream(
        self,
        stream_id: str,
        make_stream: MakeStream,
        resume_at: int | None = None,
        *,
        attempt: int | None = None,
    ) -> ResumableStream | None:
        """Produce the stream if nobody does yet, else follow it; None if it already finished.

        With a `resume_at`, a finished stream whose producer still lingers sends its text from
        there (None if there is none left). `attempt` is the attempt the offset was read from
        (`stream.attempt`; the first by default): see `resume_existing_stream`.
        """
        if self._compat is not None:
            return await self._compat.resumable_stream(stream_id, make_stream, resume_at, attempt)
        stream_id, offset = _validate(stream_id, make_stream, resume_at)
        expected = _expected_attempt(resume_at, attempt)
        local = self._local_reader(stream_id, offset, expected)
        if local is not None:
            return local
        hub = self._hub
        started = time.time_ns()  # a resume, if it turns out to be one, started now
        try:
            count = await hub.connection.incr(hub.keys.sentinel(stream_id), self._settings.ttl)
        except BackendError as exc:
            if not self._degrade:
                raise
            logger.warning(
                "stream %r runs without resumability: the backend failed (%s)",
                stream_id,
                exc,
                extra={"stream_id": stream_id},
            )
            producer = self._start_producer(stream_id, make_stream, offline=True)
            return ProducerReader(producer, offset)
        if count == 1:
            return ProducerReader(self._start_producer(stream_id, make_stream), offset)
        with self._telemetry.resume(stream_id, offset, started) as resume:
            if count is None:
                return await self._finished(stream_id, offset, expected, resume)
            return await self._follow(stream_id, offset, expected, resume, str(count))

    async def create_new_resumable_stream(
        self, stream_id: str, make_stream: MakeStream, resume_at: int | None = None
    ) -> ResumableStream:
        """Produce a new stream under `stream_id`, replacing a finished one of that id.

        Raises `ResumableStreamError` if a stream with this id is still running. A finished one
        it replaces counts as an earlier attempt: a reader with a cursor into it gets
        `StreamRestartedError`, never the new stream's text from that offset.
        """
        if self._compat is not None:
            return await self._compat.create_new_resumable_stream(stream_id, make_stream, resume_at)
        stream_id, offset = _validate(stream_id, make_stream, resume_at)
        hub = self._hub
        keys = hub.keys
        connection = hub.connection
        ttl = self._settings.ttl
        for _ in range(_RESTART_TRIES):
            # One command for a new id, as the election's INCR is.
            if await connection.create(keys.sentinel(stream_id), "1", ttl):
                return ProducerReader(self._start_producer(stream_id, make_stream), offset)
            value = await connection.get(keys.sentinel(stream_id))
            if value is None:
                continue  # it expired meanwhile
            if p.stream_state(value) == p.RUNNING:
                raise ResumableStreamError(f"stream {stream_id!r} is already running")
            attempt = await connection.restart(
                keys.sentinel(stream_id), keys.restarts(stream_id), keys.text(stream_id), value, ttl
            )
            if attempt is not None:
                producer = self._start_producer(stream_id, make_stream, attempt=attempt)
                return ProducerReader(producer, offset)
        raise ResumableStreamError(f"stream {stream_id!r} was started again by somebody else")

    async def resume_existing_stream(
        self,
        stream_id: str,
        resume_at: int | None = None,
        *,
        wait: float | None = None,
        attempt: int | None = None,
    ) -> ResumableStream | None:
        """Follow a running stream; None if there is no such stream or it already finished.

        With a `resume_at`, a finished stream whose producer still lingers sends its text from
        there (None if there is none left). With `wait` (seconds), a stream that does not exist
        yet (a job still queued) is waited for, that long: it costs a subscription to the
        stream's channel, shared by every reader of it here, and no polling.

        An offset is an offset into one attempt of the stream: the first, unless `attempt`
        (`stream.attempt` of the reader it was read from) says otherwise. If the stream was
        started again since (`ctx.writer(..., restart=True)`), a reader with an offset gets
        `StreamRestartedError`, never the new attempt's text from that offset.
        """
        if self._compat is not None:
            return await self._compat.resume_existing_stream(stream_id, resume_at, wait, attempt)
        stream_id = p.validate_stream_id(stream_id)
        offset = check_resume_at(resume_at)
        expected = _expected_attempt(resume_at, attempt)
        if wait is not None:
            wait = check_seconds("wait", wait, zero=True)
        local = self._local_reader(stream_id, offset, expected)
        if local is not None:
            return local
        with self._telemetry.resume(stream_id, offset) as resume:
            sentinel = await self._hub.sentinel(stream_id)
            state = p.stream_state(sentinel)
            if state is None and wait:
                state = await self._wait_for_start(stream_id, wait)
                local = self._local_reader(stream_id, offset, expected)
                if local is not None:
                    return local
            if state is None:
                resume.answered("not_found")
                return None
            if state != p.RUNNING:
                return await self._finished(stream_id, offset, expected, resume, state)
            return await self._follow(stream_id, offset, expected, resume, sentinel)

    def writer(self, stream_id: str, *, restart: bool = False) -> StreamWriter:
        """A writer of a new stream `stream_id`, for code that pushes its text (a background
        job): `async with ctx.writer(stream_id) as w: await w.write(chunk)`. See `StreamWriter`.

        Entering it starts the stream as a producer starts (the same election); raises
        `StreamExistsError` if a stream of that id exists, running or ended. With `restart=True`
        (a retried job), a stream that ended failed, cancelled or lost, or runs with no live
        writer (its process died), is started again as its next attempt: readers never get two
        attempts' texts joined, and a reader with a cursor into an earlier attempt gets
        `StreamRestartedError`. One that ended done, or whose writer is alive, is still
        `StreamExistsError`. A backend error raises `BackendError` (a writer has no reader of
        its own to degrade for).

        Not with `compat="vercel"` (the reference has no writer of its own; `ValueError`).
        """
        if self._compat is not None:
            raise ValueError("ctx.writer is not available with compat='vercel'")
        stream_id = p.validate_stream_id(stream_id)
        if not isinstance(restart, bool):
            raise ValueError(f"restart must be True or False, got {restart!r}")
        return StreamWriter(stream_id, lambda: self._start_writer(stream_id, restart))

    async def _start_writer(self, stream_id: str, restart: bool) -> Producer:
        if self._tg is None:
            raise RuntimeError("the context is not open: use `async with ctx:` first")
        hub = self._hub
        keys = hub.keys
        connection = hub.connection
        ttl = self._settings.ttl
        count = await connection.incr(keys.sentinel(stream_id), ttl)
        if count == 1:
            return await self._first_or_later_attempt(stream_id, restart)
        if not restart:
            raise StreamExistsError(f"stream {stream_id!r} exists already")
        if stream_id in self._local:
            raise StreamExistsError(f"stream {stream_id!r} runs, written in this process")
        for _ in range(_RESTART_TRIES):
            value = await connection.get(keys.sentinel(stream_id))
            state = p.stream_state(value)
            if state is None:
                # Gone meanwhile (its keys expired): a new attempt, if nobody took it first.
                if await connection.incr(keys.sentinel(stream_id), ttl) == 1:
                    return await self._first_or_later_attempt(stream_id, restart)
                continue
            if state == p.DONE:
                raise StreamExistsError(f"stream {stream_id!r} ended well already")
            if state == p.RUNNING and not await self._writer_gone(stream_id):
                raise StreamExistsError(f"stream {stream_id!r} runs, and its writer is alive")
            assert value is not None
            attempt = await connection.restart(
                keys.sentinel(stream_id),
                keys.restarts(stream_id),
                keys.text(stream_id),
                value,
                self._settings.ttl,
            )
            if attempt is not None:
                return self._start_producer(stream_id, None, attempt=attempt)
            # Its state changed meanwhile (a reader counted itself in, another writer won).
        raise StreamExistsError(f"stream {stream_id!r} was started again by somebody else")

    async def _first_or_later_attempt(self, stream_id: str, restart: bool) -> Producer:
        """A writer that won the election of an id with no state: its first attempt, or with
        `restart`, if the id ran before and its state expired since (a lost stream keeps its
        id for `lost_ttl` only), its next one; so that a reader with a cursor into an earlier
        attempt learns of this one, never gets this one's text from its offset. A writer's
        count of restarts is kept as long as its stream's keys (0 for the first attempt)."""
        keys = self._hub.keys
        connection = self._hub.connection
        ttl = self._settings.ttl
        if restart:
            try:
                if await connection.get(keys.restarts(stream_id)) is not None:
                    restarts = await connection.incr(keys.restarts(stream_id), ttl)
                    return self._start_producer(stream_id, None, attempt=1 + (restarts or 0))
            except BaseException:  # a backend error, or the job cancelled meanwhile
                # Elected, and never started: nobody writes this stream. Recorded at once (if
                # nobody counted in meanwhile), so that its readers and the job's next retry
                # need not wait a liveness timeout to learn it.
                # Bounded by the backend's deadlines. If it fails, readers find the stream dead
                # a liveness timeout later.
                with anyio.CancelScope(shield=True), contextlib.suppress(BackendError):
                    await self._hub.record_lost(stream_id, "1")
                raise
        producer = self._start_producer(stream_id, None)
        # Not awaited: the writer starts at once (a retry would come long after this).
        marked = producer.marking()
        count = keys.restarts(stream_id)
        self._hub.spawn(stream_id, _mark_first_attempt, connection, count, ttl, marked)
        return producer

    async def _writer_gone(self, stream_id: str) -> bool:
        """Whether the producer of a running stream is gone: nobody listens for its requests,
        for as long as a follower would need to declare it lost (`Hub.may_declare_lost`)."""
        hub = self._hub
        channel = hub.keys.request(stream_id)
        nobody_since: float | None = None
        delays = p.retry_delays()
        while True:
            if await hub.connection.numsub(channel):
                return False
            now = anyio.current_time()
            if nobody_since is None:
                nobody_since = now
            if hub.may_declare_lost(nobody_since, hub.lost_after):
                return True
            if now - nobody_since >= hub.lost_bound:
                return False  # this side's connection cannot tell: alive, as far as we know
            await anyio.sleep(next(delays))

    async def _wait_for_start(self, stream_id: str, wait: float) -> str | None:
        """Wait up to `wait` seconds for `stream_id` to start; its state once it did (None if
        it did not): one subscription to its live channel (a starting producer announces
        itself there), then its state read once, and again only after a reconnect."""
        return await self._watch_starts(stream_id, wait, lambda: self._hub.state(stream_id))

    async def _watch_starts(
        self, stream_id: str, wait: float, found: Callable[[], Awaitable[_T | None]]
    ) -> _T | None:
        """Ask `found` once subscribed to the stream's live channel, and again whenever a
        producer of it starts or the backend reconnects, for up to `wait` seconds: its first
        answer that is not None, else None. No polling."""
        hub = self._hub
        waiter = _StartWaiter(stream_id)
        with anyio.move_on_after(wait):
            subscribed = await hub.follow(waiter)
            try:
                await subscribed
                while True:
                    answer = await found()
                    if answer is not None:
                        return answer
                    await waiter.wait()
            finally:
                await hub.unfollow(waiter)
        return None

    async def cancel_stream(self, stream_id: str) -> None:
        """Stop a stream from any process: its generator is cancelled and every reader ends
        with `StreamCancelledError`. A stream about to start is prevented; one that already
        ended is left as it is. Idempotent.

        In compat mode a stream that a Node producer runs cannot be stopped: it raises
        `StreamNotCancellableError`.
        """
        if self._compat is not None:
            return await self._compat.cancel_stream(stream_id)
        stream_id = p.validate_stream_id(stream_id)
        producer = self._local.get(stream_id)
        if producer is not None:
            producer.stop()
            return
        connection = self._hub.connection
        keys = self._hub.keys
        key = keys.sentinel(stream_id)
        cancel = p.Cancel().pack()
        cancelled = p.sentinel_value(p.CANCELLED)
        with anyio.move_on_after(self._settings.resume_timeout):
            for delay in p.retry_delays():
                value = await connection.get(key)
                if value is None:
                    if await connection.create(
                        key, p.sentinel_value(p.CANCELLED), self._settings.ttl
                    ):
                        return  # nobody started it: whoever tries next finds it cancelled
                    continue
                if p.terminal_state(value) is not None:
                    return
                if await connection.publish(keys.request(stream_id), cancel):
                    return
                # Running, but its producer is not listening yet (about to start) or gone.
                await anyio.sleep(delay)
        await connection.set(key, cancelled, self._settings.ttl)

    async def has_existing_stream(self, stream_id: str) -> Literal[True, "DONE"] | None:
        """None if there is no such stream, "DONE" if it finished, else True."""
        if self._compat is not None:
            return await self._compat.has_existing_stream(stream_id)
        stream_id = p.validate_stream_id(stream_id)
        state = await self._hub.state(stream_id)
        if state is None:
            return None
        return True if state == p.RUNNING else "DONE"

    async def current_attempt(
        self, stream_id: str, *, newer_than: int | None = None, wait: float | None = None
    ) -> int | None:
        """Which attempt `stream_id` is at: 1, or more once it was started again (a retried
        job's writer, `restart=True`; `create_new_resumable_stream` over a finished one); None
        if there is no such stream.

        With `newer_than` and `wait` (seconds), waits that long for an attempt newer than
        `newer_than` to start (a job's retry, after a reader saw its attempt fail): one
        subscription, as `resume_existing_stream(wait=)`, and no polling. An attempt that was
        stopped (`cancel_stream`) or ended well is not waited on: nothing retries it.
        """
        stream_id = p.validate_stream_id(stream_id)
        if newer_than is not None:
            check_int("newer_than", newer_than)
        if wait is not None:
            wait = check_seconds("wait", wait, zero=True)
        attempt = await self._current_attempt(stream_id)
        if newer_than is None or not wait or (attempt is not None and attempt > newer_than):
            return attempt
        if (
            self._compat is None
            and attempt == newer_than
            and await self._hub.state(stream_id) in (p.DONE, p.CANCELLED)
        ):
            return attempt
        latest = attempt

        async def newer() -> int | None:
            nonlocal latest
            latest = await self._current_attempt(stream_id)
            return latest if latest is not None and latest > newer_than else None

        found = await self._watch_starts(stream_id, wait, newer)
        return latest if found is None else found

    async def _current_attempt(self, stream_id: str) -> int | None:
        if self._compat is not None:
            return None if await self._compat.has_existing_stream(stream_id) is None else 1
        producer = self._local.get(stream_id)
        if producer is not None:
            return producer.attempt
        if await self._hub.state(stream_id) is None:
            return None
        return await self._hub.attempt(stream_id)

    async def set_alias(self, name: str, stream_id: str) -> None:
        """Make `name` point to `stream_id`, from any process, for as long as a stream's keys
        live (`ttl`): how an endpoint that knows a chat, not its current stream, finds it
        again (`resumable_stream.ai_sdk`). A later call replaces the pointer."""
        if self._compat is not None:
            return await self._compat.set_alias(name, stream_id)
        name = p.validate_stream_id(name)
        stream_id = p.validate_stream_id(stream_id)
        await self._hub.connection.set(self._hub.keys.alias(name), stream_id, self._settings.ttl)

    async def resolve_alias(self, name: str) -> str | None:
        """The stream id `name` points to (`set_alias`), or None if it points nowhere."""
        if self._compat is not None:
            return await self._compat.resolve_alias(name)
        name = p.validate_stream_id(name)
        return await self._hub.connection.get(self._hub.keys.alias(name))

    # Producers

    def _start_producer(
        self,
        stream_id: str,
        make_stream: MakeStream | None,
        offline: bool = False,
        attempt: int = 1,
    ) -> Producer:
        if self._tg is None:
            raise RuntimeError("the context is not open: use `async with ctx:` first")
        producer = Producer(self._hub, stream_id, make_stream, offline, attempt)
        if not offline:
            self._local[stream_id] = producer
        self._launch(producer)
        return producer

    def _launch(self, producer: _Hosted) -> None:
        """Run `producer` in this context: it outlives the call that started it, and leaving
        the context drains, then stops it."""
        if self._tg is None:
            raise RuntimeError("the context is not open: use `async with ctx:` first")
        self._running.add(producer)
        name = f"resumable_stream producer {producer.stream_id!r}"
        if not self._native:
            self._tg.start_soon(self._run, producer, name=name)
            return
        # A task of the loop's own, not of the task group: an anyio task costs 3.4 KiB more
        # (its handle, cancel scope and events), which was a third of a live stream's memory.
        # The context still owns it: leaving the context stops it and waits for it
        # (`_close_hosted`), and a producer's cancellations go through its own cancel scopes,
        # so its cleanup stays shielded.
        # `_over` rather than a done callback on the task: 0.3 KiB less per stream.
        coroutine = self._run(producer)
        producer.run_in(asyncio.get_running_loop().create_task(coroutine, name=name))
        self._hosted[producer] = None

    def _over(self, producer: _Hosted) -> None:
        """A producer is over, lingering included."""
        self._lingering -= 1
        if producer in self._hosted:  # it ran in a task of the loop's own
            del self._hosted[producer]
            self._running_changed.notify()

    async def _close_hosted(self) -> None:
        if not self._hosted:
            return
        for producer in list(self._hosted):
            producer.close()
        # Their cleanup is bounded (`_CLEANUP_TIMEOUT` per step), so this is too.
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            while self._hosted:
                await self._running_changed.wait()
        if self._hosted:
            logger.warning("%d producers were still cleaning up", len(self._hosted))

    def _run(self, producer: _Hosted) -> Coroutine[Any, Any, None]:
        # The producer's own coroutine, with no frame of ours around it (an idle stream's
        # memory): it calls `_ended` once its generator ended, lingers, then calls `_over`.
        return producer.run(self._ended, self._over)

    def _ended(self, producer: _Hosted) -> None:
        self._running.discard(producer)
        if self._local.get(producer.stream_id) is producer:
            del self._local[producer.stream_id]
        self._running_changed.notify()
        self._lingering += 1

    def _local_reader(
        self, stream_id: str, offset: int, attempt: int | None
    ) -> ResumableStream | None:
        """A reader of `stream_id` straight from its producer, when it runs in this context.

        No backend command is needed: the producer's buffer has the whole text.
        """
        producer = self._local.get(stream_id)
        if producer is None:
            return None
        if attempt is not None and attempt != producer.attempt:
            raise _restarted(stream_id, producer.attempt)
        with self._telemetry.resume(stream_id, offset) as resume:
            replayed = max(0, producer.buffer.length - offset)
            resume.answered("replayed" if replayed else "live", replayed)
            return ProducerReader(producer, offset)

    # Followers

    async def _follow(
        self,
        stream_id: str,
        offset: int,
        attempt: int | None,
        resume: Resume,
        sentinel: str | None = None,
    ) -> ResumableStream | None:
        """Follow a running stream from another context; `sentinel`: its value as found."""
        follower = Follower(self._hub, stream_id, offset, attempt, sentinel)
        state = await follower.join()
        if state == p.RUNNING:
            return await _following(follower, offset, resume)
        if state is not None and attempt is not None:
            # It ended meanwhile, and this reader has a cursor: its producer may still linger
            # with the tail (perhaps not subscribed right now: that is what it found).
            return await self._finished(stream_id, offset, attempt, resume, state)
        resume.answered("not_found" if state is None else "finished")
        _raise_if_failed(stream_id, state)
        return None

    async def _finished(
        self,
        stream_id: str,
        offset: int,
        attempt: int | None,
        resume: Resume,
        state: str | None = None,
    ) -> ResumableStream | None:
        """A finished stream: its tail from a lingering producer, None, or its error."""
        if attempt is not None:  # a reader with a cursor
            follower = Follower(self._hub, stream_id, offset, attempt)
            state = await follower.join(after_end=True)
            if state == p.RUNNING:
                return await _following(follower, offset, resume)
            if state is not None and not follower.acked.is_set():
                # Nobody lingered to say which attempt ended: the backend says.
                current = await self._hub.attempt(stream_id)
                if current != attempt:
                    raise _restarted(stream_id, current)
        elif state is None:
            state = await self._hub.state(stream_id)
            if state == p.RUNNING:
                # It runs again since its INCR found it ended: a LOST its producer, back from
                # an outage, took back (or its next attempt). Not "nothing to resume".
                return await self._follow(stream_id, offset, None, resume)
        resume.answered("finished")
        _raise_if_failed(stream_id, state)
        return None


async def _following(follower: Follower, offset: int, resume: Resume) -> Follower:
    """A follower handed to its reader: counted as active, its resume answered; or, if the
    stream it found is a later attempt than its cursor's, `StreamRestartedError`."""
    restarted = follower.restarted
    if restarted is not None:
        await follower.aclose()
        raise restarted
    replayed = follower.received - offset
    resume.answered("replayed" if replayed else "live", replayed)
    follower.activate()
    return follower


async def _mark_first_attempt(
    connection: Connection, key: str, ttl: int, marked: Callable[[bool], None]
) -> None:
    # Set, not created: a count left by an earlier stream of this id (whose sentinel was
    # evicted or expired first) is not this one's, which is a first attempt.
    fenced = False
    try:
        await connection.set(key, "0", ttl)
        fenced = True
    except BackendError as exc:  # a retry then counts from 1 again: only after its expiry
        logger.debug("could not mark the first attempt of %r: %s", key, exc)
    finally:
        marked(fenced)


def _restarted(stream_id: str, attempt: int) -> StreamRestartedError:
    return StreamRestartedError(
        f"stream {stream_id!r} was started again (attempt {attempt}): read it from its start",
        attempt,
    )


def _expected_attempt(resume_at: int | None, attempt: object) -> int | None:
    """The attempt a reader's offset belongs to: none without an offset (it reads whichever
    attempt runs, from its start); the first, unless `attempt` says otherwise."""
    if attempt is not None and (
        isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1
    ):
        raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
    if resume_at is None:
        return attempt
    return 1 if attempt is None else attempt


class _StartWaiter:
    """What a reader waiting for a stream to start hears on its live channel."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self._signal = Signal()
        self._heard = False

    async def wait(self) -> None:
        while not self._heard:
            await self._signal.wait()
        self._heard = False

    def _wake(self) -> None:
        self._heard = True
        self._signal.notify()

    def deliver(self, message: p.Message) -> None:
        self._wake()  # a producer announced itself, or speaks already

    def fail(self, error: ResumableStreamError) -> None:
        self._wake()  # the context is closing: the state read says what there is

    def resync(self) -> None:
        self._wake()  # a reconnect may have lost the announcement: read the state again


def _raise_if_failed(stream_id: str, state: str | None) -> None:
    """Raise how a stream ended, unless it ended well (or is gone)."""
    error = None if state is None else p.end_error(stream_id, state, None)
    if error is not None:
        raise error


def _validate(stream_id: object, make_stream: object, resume_at: object) -> tuple[str, int]:
    check_make_stream(make_stream)
    return p.validate_stream_id(stream_id), check_resume_at(resume_at)


def create_resumable_stream_context(
    redis: str | redis.asyncio.Redis | redis.asyncio.RedisCluster | None = None,
    *,
    backend: Backend | None = None,
    key_prefix: str = "resumable-stream",
    command_timeout: float | None = None,
    **options: Any,
) -> ResumableStreamContext:
    """Make a context on Redis (a URL, or a `redis.asyncio.Redis` or `RedisCluster` client: see
    `resumable_stream.redis`) or on a backend.

    With neither, `REDIS_URL` is used if set, else an in-memory backend (streams are then
    resumable only inside this process). `command_timeout` bounds every Redis command (seconds,
    default 5). Other options go to `ResumableStreamContext`.
    """
    if redis is not None and backend is not None:
        raise ValueError("pass either redis= or backend=, not both")
    if backend is not None and command_timeout is not None:
        raise ValueError("command_timeout is an option of the Redis backend: pass redis=")
    if backend is None:
        url = redis if redis is not None else os.environ.get("REDIS_URL") or None
        if url is None:
            logger.warning(  # about no stream in particular
                "resumable_stream: no Redis configured (redis= or REDIS_URL); using an in-memory "
                "backend, so streams are resumable only inside this process"
            )
            backend = MemoryBackend()
        else:
            from .redis import DEFAULT_COMMAND_TIMEOUT, RedisBackend

            timeout = DEFAULT_COMMAND_TIMEOUT if command_timeout is None else command_timeout
            backend = RedisBackend(url, command_timeout=timeout)
    return ResumableStreamContext(backend=backend, key_prefix=key_prefix, **options)
