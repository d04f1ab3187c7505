"""The context: elects producers, starts followers, and owns the task group producers run in."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

import anyio
from anyio.abc import TaskGroup

from . import _protocol as p
from ._backend import Backend, Connection, MemoryBackend
from ._buffer import Signal
from ._exceptions import (
    BackendError,
    ProducerLostError,
    ProducerUnavailableError,
    ResumableStreamError,
    StreamIncompleteError,
)
from ._follower import Follower
from ._producer import MakeStream, Producer, end_error

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["ResumableStream", "ResumableStreamContext", "create_resumable_stream_context"]

logger = logging.getLogger("resumable_stream")

_DEFAULT_TTL = 24 * 60 * 60


class ResumableStream(Protocol):
    """What the context's methods return: an async iterator of `str` chunks with `aclose()`."""

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def __anext__(self) -> str: ...

    async def aclose(self) -> None: ...


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
    """

    def __init__(
        self,
        *,
        backend: Backend,
        key_prefix: str = "resumable-stream",
        ttl: int = _DEFAULT_TTL,
        resume_timeout: float = 2.0,
        max_message_size: int = 1 << 20,
        drain_timeout: float = 30.0,
        linger: float = 30.0,
        liveness_timeout: float = 3.0,
        lost_ttl: int = 60,
        max_backlog: int = 64 << 20,
        on_backend_error: Literal["degrade", "raise"] = "degrade",
    ) -> None:
        if not isinstance(key_prefix, str) or not key_prefix:
            raise ValueError("key_prefix must be a non-empty str")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise ValueError(f"ttl must be a positive int (seconds), got {ttl!r}")
        if not resume_timeout > 0:
            raise ValueError(f"resume_timeout must be > 0, got {resume_timeout!r}")
        if (
            isinstance(max_message_size, bool)
            or not isinstance(max_message_size, int)
            or (max_message_size < 1)
        ):
            raise ValueError(f"max_message_size must be a positive int, got {max_message_size!r}")
        if not drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0, got {drain_timeout!r}")
        if not linger >= 0:
            raise ValueError(f"linger must be >= 0, got {linger!r}")
        if not liveness_timeout > 0:
            raise ValueError(f"liveness_timeout must be > 0, got {liveness_timeout!r}")
        if on_backend_error not in ("degrade", "raise"):
            raise ValueError(
                f"on_backend_error must be 'degrade' or 'raise', got {on_backend_error!r}"
            )
        if isinstance(max_backlog, bool) or not isinstance(max_backlog, int) or max_backlog < 1:
            raise ValueError(f"max_backlog must be a positive int, got {max_backlog!r}")
        if isinstance(lost_ttl, bool) or not isinstance(lost_ttl, int) or lost_ttl <= 0:
            raise ValueError(f"lost_ttl must be a positive int (seconds), got {lost_ttl!r}")
        self._backend = backend
        self._keys = p.Keys(key_prefix)
        self._ttl = ttl
        self._resume_timeout = resume_timeout
        self._max_message_size = max_message_size
        self._drain_timeout = drain_timeout
        self._linger = linger
        self._liveness_timeout = liveness_timeout
        self._lost_ttl = lost_ttl
        self._max_backlog = max_backlog
        self._degrade = on_backend_error == "degrade"
        self._inbox = self._keys.inbox(uuid.uuid4().hex)
        self._stack: AsyncExitStack | None = None
        self._conn: Connection | None = None
        self._tg: TaskGroup | None = None
        self._producers: set[Producer] = set()
        self._producers_changed = Signal()
        self._request_routes: dict[str, Producer] = {}
        self._live_routes: dict[str, set[Follower]] = {}
        self._listeners: dict[str, Follower] = {}
        self._live_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<ResumableStreamContext backend={self._backend!r}>"

    async def __aenter__(self) -> ResumableStreamContext:
        if self._stack is not None:
            raise RuntimeError("this context is already open")
        async with AsyncExitStack() as stack:
            self._conn = await stack.enter_async_context(self._backend.connect(self._dispatch))
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self._conn.subscribe(self._inbox)
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
            with anyio.move_on_after(self._drain_timeout):
                while self._producers:
                    await self._producers_changed.wait()
            assert self._tg is not None
            self._tg.cancel_scope.cancel()
            for follower in list(self._listeners.values()):
                follower.fail(ResumableStreamError("the stream context was closed"))
        finally:
            try:
                await stack.__aexit__(exc_type, exc, tb)
            finally:
                self._conn = self._tg = None
        return None

    def _connection(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("the context is not open: use `async with ctx:` first")
        return self._conn

    # Public API

    async def resumable_stream(
        self, stream_id: str, make_stream: MakeStream, resume_at: int | None = None
    ) -> ResumableStream | None:
        """Produce the stream if nobody does yet, else follow it; None if it already finished.

        With a `resume_at`, a finished stream whose producer still lingers sends its text from
        there (None if there is none left).
        """
        stream_id, offset = _validate(stream_id, make_stream, resume_at)
        connection = self._connection()
        try:
            count = await connection.incr(self._keys.sentinel(stream_id), self._ttl)
        except BackendError as exc:
            if not self._degrade:
                raise
            logger.warning(
                "stream %r runs without resumability: the backend failed (%s)",
                stream_id,
                exc,
            )
            return self._start_producer(stream_id, make_stream, offline=True).reader(offset)
        if count is None:
            return await self._finished(stream_id, offset, resume_at)
        if count == 1:
            return self._start_producer(stream_id, make_stream).reader(offset)
        return await self._follow(stream_id, offset)

    async def create_new_resumable_stream(
        self, stream_id: str, make_stream: MakeStream, resume_at: int | None = None
    ) -> ResumableStream:
        """Produce a new stream under `stream_id`, replacing a finished one of that id.

        Raises `ResumableStreamError` if a stream with this id is still running.
        """
        stream_id, offset = _validate(stream_id, make_stream, resume_at)
        previous = await self._connection().swap(self._keys.sentinel(stream_id), "1", self._ttl)
        if previous is not None and p.terminal_state(previous) is None:
            raise ResumableStreamError(f"stream {stream_id!r} is already running")
        return self._start_producer(stream_id, make_stream).reader(offset)

    async def resume_existing_stream(
        self, stream_id: str, resume_at: int | None = None
    ) -> ResumableStream | None:
        """Follow a running stream; None if there is no such stream or it already finished.

        With a `resume_at`, a finished stream whose producer still lingers sends its text from
        there (None if there is none left).
        """
        stream_id = p.validate_stream_id(stream_id)
        offset = p.validate_resume_at(resume_at)
        value = await self._connection().get(self._keys.sentinel(stream_id))
        if value is None:
            return None
        if p.terminal_state(value) is not None:
            return await self._finished(stream_id, offset, resume_at, value)
        return await self._follow(stream_id, offset)

    async def cancel_stream(self, stream_id: str) -> None:
        """Stop a stream from any process: its generator is cancelled and every reader ends
        with `StreamCancelledError`. A stream about to start is prevented; one that already
        ended is left as it is. Idempotent.
        """
        stream_id = p.validate_stream_id(stream_id)
        producer = self._request_routes.get(self._keys.request(stream_id))
        if producer is not None and producer.state is None:
            producer.stop()
            return
        connection = self._connection()
        key = self._keys.sentinel(stream_id)
        cancel = p.pack(p.CANCEL, [])
        with anyio.move_on_after(self._resume_timeout):
            delay = 0.002
            while True:
                value = await connection.get(key)
                if value is None:
                    if await connection.create(key, p.sentinel_value(p.CANCELLED), self._ttl):
                        return  # nobody started it: whoever tries next finds it cancelled
                    continue
                if p.terminal_state(value) is not None:
                    return
                if await connection.publish(self._keys.request(stream_id), cancel):
                    return
                # Running, but its producer is not listening yet (about to start) or gone.
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.1)
        await connection.set(key, p.sentinel_value(p.CANCELLED), self._ttl)

    async def _finished(
        self, stream_id: str, offset: int, resume_at: int | None, value: str | None = None
    ) -> ResumableStream | None:
        """A finished stream: its tail from a lingering producer, None, or its error."""
        if resume_at is not None:
            reader = await self._follow(stream_id, offset, after_end=True)
            if not isinstance(reader, _Nobody):
                return reader
            value = None
        if value is None:
            value = await self._connection().get(self._keys.sentinel(stream_id))
        state = p.terminal_state(value)
        error = None if state is None else end_error(stream_id, state, None)
        if error is not None:
            raise error
        return None

    async def has_existing_stream(self, stream_id: str) -> Literal[True, "DONE"] | None:
        """None if there is no such stream, "DONE" if it finished, else True."""
        stream_id = p.validate_stream_id(stream_id)
        value = await self._connection().get(self._keys.sentinel(stream_id))
        if value is None:
            return None
        return "DONE" if p.terminal_state(value) is not None else True

    # Producers

    def _start_producer(
        self, stream_id: str, make_stream: MakeStream, offline: bool = False
    ) -> Producer:
        assert self._tg is not None
        producer = Producer(self, stream_id, make_stream, offline)
        self._producers.add(producer)
        self._tg.start_soon(producer.run, name=f"resumable_stream producer {stream_id!r}")
        return producer

    def _producer_finished(self, producer: Producer) -> None:
        self._producers.discard(producer)
        self._producers_changed.notify()

    # Followers

    @overload
    async def _follow(
        self, stream_id: str, resume_at: int, after_end: Literal[False] = False
    ) -> ResumableStream | None: ...

    @overload
    async def _follow(
        self, stream_id: str, resume_at: int, after_end: Literal[True]
    ) -> ResumableStream | _Nobody | None: ...

    async def _follow(
        self, stream_id: str, resume_at: int, after_end: bool = False
    ) -> ResumableStream | _Nobody | None:
        connection = self._connection()
        follower = Follower(self, stream_id, uuid.uuid4().hex, resume_at)
        await self._attach_follower(follower)
        reached = False
        try:
            request = p.pack(p.REQUEST, [follower.listener, self._inbox, resume_at, after_end])
            with anyio.move_on_after(self._resume_timeout):
                delay = 0.002
                while True:
                    if await connection.publish(self._keys.request(stream_id), request):
                        reached = True
                        await follower.acked.wait()
                        if after_end:
                            # A reader that already has everything learns how the stream
                            # ended at once, as it would without lingering.
                            await follower.ended.wait()
                            state = follower.ended_with_nothing_left()
                            if state is not None:
                                await follower.aclose()
                                if state == p.DONE:
                                    return None
                                raise end_error(stream_id, state, None) or AssertionError
                        follower.heard = anyio.current_time()
                        return follower
                    if after_end:
                        await follower.aclose()
                        return _NOBODY  # nobody lingers: the text is gone
                    # Nobody subscribed: the producer is not listening yet, finished or gone.
                    value = await connection.get(self._keys.sentinel(stream_id))
                    if value is None or p.terminal_state(value) is not None:
                        await follower.aclose()
                        return await self._finished(stream_id, resume_at, None, value)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 0.1)
            value = await connection.get(self._keys.sentinel(stream_id))
            await follower.aclose()
            if value is None or p.terminal_state(value) is not None:
                return await self._finished(stream_id, resume_at, None, value)
            if not reached:
                await self._record_lost(stream_id)
                raise ProducerLostError(
                    f"the producer of stream {stream_id!r} is gone: nobody listened for "
                    f"{self._resume_timeout}s"
                )
            raise ProducerUnavailableError(
                f"no producer answered for stream {stream_id!r} within {self._resume_timeout}s"
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await follower.aclose()
            raise

    async def _probe(self, follower: Follower) -> None:
        """A follower heard nothing for `liveness_timeout`: ask again, or learn why not."""
        stream_id = follower.stream_id
        connection = self._connection()
        request = [follower.listener, self._inbox, follower.position, False]
        try:
            if await connection.publish(self._keys.request(stream_id), p.pack(p.REQUEST, request)):
                follower.heard = anyio.current_time()
                return
            value = await connection.get(self._keys.sentinel(stream_id))
            state = p.terminal_state(value)
            if state is None:
                await self._record_lost(stream_id)
                state = p.LOST
        except BackendError as exc:
            follower.fail(exc)
            return
        error = end_error(stream_id, state, None) or StreamIncompleteError(
            f"stream {stream_id!r} ended but its end never arrived"
        )
        follower.fail(error)  # type: ignore[arg-type]

    async def _record_lost(self, stream_id: str) -> None:
        # The id stays taken for `lost_ttl` seconds, so late readers learn what happened.
        value = p.sentinel_value(p.LOST)
        await self._connection().set(self._keys.sentinel(stream_id), value, self._lost_ttl)

    async def _attach_follower(self, follower: Follower) -> None:
        channel = self._keys.live(follower.stream_id)
        async with self._live_lock:
            followers = self._live_routes.get(channel)
            if followers is None:
                await self._connection().subscribe(channel)
                followers = self._live_routes[channel] = set()
            followers.add(follower)
            self._listeners[follower.listener] = follower

    async def _detach_follower(self, follower: Follower) -> None:
        self._listeners.pop(follower.listener, None)
        channel = self._keys.live(follower.stream_id)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            async with self._live_lock:
                followers = self._live_routes.get(channel)
                if followers is None or follower not in followers:
                    return
                followers.discard(follower)
                if not followers:
                    del self._live_routes[channel]
                    if self._conn is not None:
                        try:
                            await self._conn.unsubscribe(channel)
                        except BackendError as exc:
                            logger.warning("could not unsubscribe %r: %s", channel, exc)

    # Messages from the backend

    def _dispatch(self, channel: str, message: bytes) -> None:
        try:
            tag, payload = p.unpack(message)
        except ValueError:
            logger.warning("ignored a malformed message on %r", channel)
            return
        if channel == self._inbox:
            follower = self._listeners.get(payload[0]) if payload else None
            if follower is not None:
                follower.deliver(tag, payload)
        elif tag == p.REQUEST:
            producer = self._request_routes.get(channel)
            if producer is not None:
                producer.on_request(payload)
        elif tag == p.CANCEL:
            producer = self._request_routes.get(channel)
            if producer is not None:
                producer.stop()
        else:
            for follower in tuple(self._live_routes.get(channel, ())):
                follower.deliver(tag, payload)


class _Nobody:
    """What `_follow(after_end=True)` returns when no producer lingers to answer."""


_NOBODY = _Nobody()


def _validate(stream_id: object, make_stream: object, resume_at: object) -> tuple[str, int]:
    if not callable(make_stream):
        raise ValueError("make_stream must be a callable returning an async iterable of str")
    return p.validate_stream_id(stream_id), p.validate_resume_at(resume_at)


def create_resumable_stream_context(
    redis: str | redis.asyncio.Redis | None = None,
    *,
    backend: Backend | None = None,
    key_prefix: str = "resumable-stream",
    command_timeout: float | None = None,
    **options: Any,
) -> ResumableStreamContext:
    """Make a context on Redis (a URL or a `redis.asyncio.Redis` client) or on a backend.

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
            logger.warning(
                "resumable_stream: no Redis configured (redis= or REDIS_URL); using an in-memory "
                "backend, so streams are resumable only inside this process"
            )
            backend = MemoryBackend()
        else:
            from .redis import DEFAULT_COMMAND_TIMEOUT, RedisBackend

            timeout = DEFAULT_COMMAND_TIMEOUT if command_timeout is None else command_timeout
            backend = RedisBackend(url, command_timeout=timeout)
    return ResumableStreamContext(backend=backend, key_prefix=key_prefix, **options)
