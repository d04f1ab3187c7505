"""The Redis backend (redis-py's `redis.asyncio`, so asyncio only).

Each context gets exactly two connections: one for commands, driven by a task that sends every
command queued meanwhile as one pipeline (so concurrent streams share round trips), and one for
pub/sub, read by one supervised task that dispatches messages and subscription confirmations.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any

import anyio
import redis.exceptions
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from ._backend import Connection, MessageHandler
from ._buffer import Signal
from ._exceptions import BackendError

__all__ = ["RedisBackend"]

logger = logging.getLogger("resumable_stream")

_RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@contextmanager
def map_exceptions() -> Iterator[None]:
    """Translate redis-py errors into ours at the boundary."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise BackendError(f"Redis error: {exc}") from exc
    except OSError as exc:
        raise BackendError(f"Redis connection error: {exc}") from exc


@contextmanager
def _broken_connection() -> Iterator[None]:
    # redis-py's PubSub, used while its connection is being torn down (after a read was
    # cancelled, say), fails with AttributeError or RuntimeError rather than a RedisError.
    try:
        yield
    except (AttributeError, RuntimeError) as exc:
        raise BackendError(f"the Redis subscriber connection is broken: {exc!r}") from exc


class RedisBackend:
    """A backend on a Redis server, given as a URL or a `redis.asyncio.Redis` client.

    A client passed in (fakeredis's included) is used as it is and left open; one made from a URL
    is closed with the last context using it. TLS (`rediss://`) and ACL credentials go in the URL.
    """

    def __init__(self, redis: str | Redis) -> None:
        if isinstance(redis, str):
            self._url: str | None = redis
            self._client: Redis | None = None
        else:
            self._url = None
            self._client = redis

    def __repr__(self) -> str:
        return f"RedisBackend({self._url or self._client!r})"

    def connect(self, on_message: MessageHandler) -> AbstractAsyncContextManager[Connection]:
        return self._connect(on_message)

    @asynccontextmanager
    async def _connect(self, on_message: MessageHandler) -> AsyncIterator[Connection]:
        if self._url is not None:
            client = Redis.from_url(self._url)
        else:
            assert self._client is not None
            client = self._client
        connection = _RedisConnection(client, on_message)
        try:
            # Connect before the task group, so a refused connection raises BackendError itself
            # rather than inside an ExceptionGroup.
            await connection.connect()
            async with anyio.create_task_group() as tg:
                connection.start(tg)
                try:
                    yield connection
                finally:
                    connection.closing()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await connection.close()
            if self._url is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await client.aclose()


class _Pending:
    __slots__ = ("command", "done", "error", "result")

    def __init__(self, command: Callable[[Pipeline], object]) -> None:
        self.command = command
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class _RedisConnection:
    def __init__(self, client: Redis, on_message: MessageHandler) -> None:
        self._client = client
        self._on_message = on_message
        self._pubsub = client.pubsub()
        self._queue: list[_Pending] = []
        self._queued = Signal()
        self._closed = False
        self._subscribe_lock = anyio.Lock()
        self._confirmations: dict[tuple[bytes, str], deque[anyio.Event]] = {}
        self._pubsub_error: BaseException | None = None
        # What we want to be subscribed to, so a reconnect can restore what an outage lost.
        self._wanted: set[str] = set()

    async def connect(self) -> None:
        with map_exceptions():
            await self._pubsub.connect()  # type: ignore[no-untyped-call]

    def start(self, tg: TaskGroup) -> None:
        tg.start_soon(self._send_commands)
        tg.start_soon(self._read_messages)

    def closing(self) -> None:
        self._closed = True
        self._fail_pending(BackendError("the context was closed"))

    async def close(self) -> None:
        self.closing()
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    # Commands: queued, then sent together by one task.

    def _enqueue(self, command: Callable[[Pipeline], object]) -> _Pending:
        if self._closed:
            raise BackendError("the context was closed")
        pending = _Pending(command)
        self._queue.append(pending)
        self._queued.notify()
        return pending

    @staticmethod
    async def _result(pending: _Pending) -> Any:
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def _send_commands(self) -> None:
        while True:
            while not self._queue:
                await self._queued.wait()
            batch, self._queue = self._queue, []
            pipe = self._client.pipeline(transaction=False)
            for pending in batch:
                pending.command(pipe)
            try:
                with map_exceptions():
                    results = await pipe.execute(raise_on_error=False)
            except BaseException as exc:
                error = exc if isinstance(exc, BackendError) else BackendError("command aborted")
                for pending in batch:
                    pending.error = error
                    pending.done.set()
                if isinstance(exc, BackendError):
                    continue
                raise
            for pending, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    pending.error = result
                else:
                    pending.result = result
                pending.done.set()

    def _fail_pending(self, exc: BaseException) -> None:
        batch, self._queue = self._queue, []
        for pending in batch:
            pending.error = exc
            pending.done.set()

    async def incr(self, key: str, ttl: int) -> int | None:
        # redis-py's `incr` sends INCRBY; the raw command keeps the protocol to a plain INCR.
        incr = self._enqueue(lambda pipe: pipe.execute_command("INCR", key))
        expire = self._enqueue(lambda pipe: pipe.expire(key, ttl))
        try:
            value = await self._result(incr)
        except redis.exceptions.ResponseError:
            value = None
        finally:
            with map_exceptions():
                await self._result(expire)
        return int(value) if value is not None else None

    async def get(self, key: str) -> str | None:
        with map_exceptions():
            return _text(await self._result(self._enqueue(lambda pipe: pipe.get(key))))

    async def set(self, key: str, value: str, ttl: int) -> None:
        with map_exceptions():
            await self._result(self._enqueue(lambda pipe: pipe.set(key, value, ex=ttl)))

    async def swap(self, key: str, value: str, ttl: int) -> str | None:
        with map_exceptions():
            return _text(
                await self._result(
                    self._enqueue(lambda pipe: pipe.set(key, value, ex=ttl, get=True))
                )
            )

    async def create(self, key: str, value: str, ttl: int) -> bool:
        with map_exceptions():
            created = await self._result(
                self._enqueue(lambda pipe: pipe.set(key, value, ex=ttl, nx=True))
            )
        return bool(created)

    async def publish(self, channel: str, message: bytes) -> int:
        with map_exceptions():
            return int(
                await self._result(self._enqueue(lambda pipe: pipe.publish(channel, message)))
            )

    # Pub/sub: commands written under a lock (redis-py's PubSub is not safe for concurrent
    # subscribes), confirmations and messages read by one task.

    async def subscribe(self, channel: str, *, wait: bool = True) -> None:
        await self._change(b"subscribe", channel, wait)

    async def unsubscribe(self, channel: str) -> None:
        await self._change(b"unsubscribe", channel, wait=False)

    async def _change(self, kind: bytes, channel: str, wait: bool) -> None:
        confirmed = anyio.Event()
        waiters = self._confirmations.setdefault((kind, channel), deque())
        async with self._subscribe_lock:
            if kind == b"subscribe":
                self._wanted.add(channel)
            else:
                self._wanted.discard(channel)
            if self._closed and kind == b"unsubscribe":
                return  # the subscriptions end with the connection
            if self._pubsub_error is not None:
                # Down: the reconnect subscribes what is wanted then (and forgets the rest).
                self._pubsub.channels.pop(channel.encode(), None)
                if not wait:
                    return
                raise BackendError("the Redis subscriber connection is down") from (
                    self._pubsub_error
                )
            waiters.append(confirmed)
            try:
                with map_exceptions(), _broken_connection():
                    if kind == b"subscribe":
                        await self._pubsub.subscribe(channel)
                    else:
                        await self._pubsub.unsubscribe(channel)
            except BaseException:
                waiters.remove(confirmed)
                raise
        if wait:
            await confirmed.wait()
            if self._pubsub_error is not None:
                raise BackendError("the Redis subscriber connection is down") from (
                    self._pubsub_error
                )

    async def _restore_subscriptions(self) -> None:
        # redis-py resubscribes what it knew of; whatever was asked for during the outage is
        # subscribed here, and what was dropped meanwhile is let go.
        async with self._subscribe_lock:
            known = {_text(name) for name in self._pubsub.channels}
            missing = [channel for channel in self._wanted if channel not in known]
            stale = [channel for channel in known if channel not in self._wanted]
            try:
                with map_exceptions():
                    if missing:
                        await self._pubsub.subscribe(*missing)
                    if stale:
                        await self._pubsub.unsubscribe(*stale)
            except BackendError as exc:
                logger.warning("could not restore Redis subscriptions: %s", exc)

    def _confirm(self, kind: bytes, channel: str) -> None:
        waiters = self._confirmations.get((kind, channel))
        if waiters:
            waiters.popleft().set()
            if not waiters:
                del self._confirmations[(kind, channel)]

    async def _read_messages(self) -> None:
        pubsub = self._pubsub
        failures = 0
        while True:
            try:
                response = await pubsub.parse_response(block=True)
            except (redis.exceptions.RedisError, OSError) as exc:
                self._pubsub_error = exc
                for waiters in self._confirmations.values():
                    for event in waiters:
                        event.set()
                self._confirmations.clear()
                delay = _RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)]
                failures += 1
                logger.warning(
                    "Redis subscriber connection failed (%s); retrying in %ss", exc, delay
                )
                await anyio.sleep(delay)
                continue
            if self._pubsub_error is not None:
                logger.warning("Redis subscriber connection restored")
                self._pubsub_error = None
                await self._restore_subscriptions()
            failures = 0
            if not response:
                continue
            kind = response[0]
            if isinstance(kind, str):
                kind = kind.encode()
            if kind == b"message":
                channel, data = response[1], response[2]
                if isinstance(data, str):
                    data = data.encode("utf-8", "surrogatepass")
                try:
                    self._on_message(_text(channel) or "", data)
                except Exception:
                    logger.exception("message handler failed")
            elif kind in (b"subscribe", b"unsubscribe"):
                await pubsub.handle_message(response)  # type: ignore[no-untyped-call]
                self._confirm(kind, _text(response[1]) or "")
