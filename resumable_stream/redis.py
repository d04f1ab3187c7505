"""The Redis backend (redis-py's `redis.asyncio`, so asyncio only).

Each context gets exactly two connections: one for commands, driven by a task that sends every
command queued meanwhile as one pipeline (so concurrent streams share round trips), and one for
pub/sub, read by one supervised task that dispatches messages and subscription confirmations.
"""

from __future__ import annotations

import contextlib
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

from ._backend import Connection, MessageHandler, ReconnectHandler
from ._buffer import Signal
from ._exceptions import BackendError, single_exception_out

__all__ = ["RedisBackend"]

logger = logging.getLogger("resumable_stream")

_RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
DEFAULT_COMMAND_TIMEOUT = 5.0
# Eviction may delete a running stream's keys (every key has a TTL, so volatile-* policies
# qualify too): a second producer could then start under the same id.
_SAFE_POLICIES = frozenset({"noeviction"})


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


class _Retryable(Exception):
    """A batch failed on its connection; `error` is what its commands fail with."""

    def __init__(self, error: BackendError) -> None:
        self.error = error


def _holds_no_integer(error: redis.exceptions.ResponseError) -> bool:
    # INCR's answer when the key holds a string that is not a number (our terminal states).
    # Every other error reply (OOM, MOVED, READONLY, NOPERM, WRONGTYPE...) is a failure.
    return "not an integer" in str(error)


class RedisBackend:
    """A backend on a Redis server, given as a URL or a `redis.asyncio.Redis` client.

    A client passed in (fakeredis's included) is used as it is and left open; one made from a URL
    is closed with the last context using it. TLS (`rediss://`) and ACL credentials go in the URL.

    Every command gets `command_timeout` seconds, whatever the client's own socket timeouts
    (redis-py's default is none at all): a stalled Redis then fails commands with `BackendError`
    instead of blocking the callers, and the stalled connection is dropped.
    """

    def __init__(
        self, redis: str | Redis, *, command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    ) -> None:
        if not command_timeout > 0:
            raise ValueError(f"command_timeout must be > 0 seconds, got {command_timeout!r}")
        self._command_timeout = command_timeout
        if isinstance(redis, str):
            self._url: str | None = redis
            self._client: Redis | None = None
        else:
            self._url = None
            self._client = redis

    def __repr__(self) -> str:
        return f"RedisBackend({self._url or self._client!r})"

    def connect(
        self, on_message: MessageHandler, on_reconnect: ReconnectHandler | None = None
    ) -> AbstractAsyncContextManager[Connection]:
        return self._connect(on_message, on_reconnect)

    @asynccontextmanager
    async def _connect(
        self, on_message: MessageHandler, on_reconnect: ReconnectHandler | None
    ) -> AsyncIterator[Connection]:
        if self._url is not None:
            client = Redis.from_url(self._url)
        else:
            assert self._client is not None
            client = self._client
        connection = _RedisConnection(client, on_message, on_reconnect, self._command_timeout)
        try:
            # Connect before the task group, so a refused connection raises BackendError itself
            # rather than inside an ExceptionGroup.
            await connection.connect()
            # The task group would wrap in a group what the caller's block raises.
            async with single_exception_out(), anyio.create_task_group() as tg:
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
    __slots__ = ("command", "done", "error", "idempotent", "result")

    def __init__(self, command: Callable[[Pipeline], object], idempotent: bool) -> None:
        self.command = command
        # Idempotent commands may be sent again after a connection failure: running them
        # twice changes nothing (our protocol takes a PUBLISHed message twice as once).
        self.idempotent = idempotent
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _settle(
    batch: list[_Pending], which: Callable[[_Pending], bool] | None, error: BackendError
) -> None:
    for pending in batch:
        if which is None or which(pending):
            pending.error = error
            pending.done.set()


def _reply(pending: _Pending) -> Any:
    """A command's reply; its error reply (or the batch's failure) as `BackendError`."""
    error = pending.error
    if error is None:
        return pending.result
    if isinstance(error, BackendError):
        raise error
    raise BackendError(f"Redis error: {error}") from error


class _RedisConnection:
    def __init__(
        self,
        client: Redis,
        on_message: MessageHandler,
        on_reconnect: ReconnectHandler | None,
        command_timeout: float,
    ) -> None:
        self._client = client
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        # Set when redis-py reconnected the subscriber (it does so by itself, resubscribing
        # what it knew of): messages published meanwhile were lost.
        self._reconnected = False
        self._timeout = command_timeout
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
        with map_exceptions(), self._deadline("connect"):
            await self._pubsub.connect()  # type: ignore[no-untyped-call]
        connection = self._pubsub.connection
        assert connection is not None
        connection.register_connect_callback(self._connected_again)

    def _connected_again(self, connection: object) -> None:
        self._reconnected = True

    def start(self, tg: TaskGroup) -> None:
        tg.start_soon(self._send_commands)
        tg.start_soon(self._read_messages)
        tg.start_soon(self._check_eviction_policy)

    def closing(self) -> None:
        self._closed = True
        self._fail_pending(BackendError("the context was closed"))

    async def close(self) -> None:
        self.closing()
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    @contextmanager
    def _deadline(self, what: str) -> Iterator[None]:
        """Bound a Redis operation by `command_timeout`; a stall becomes a `BackendError`."""
        try:
            with anyio.fail_after(self._timeout):
                yield
        except TimeoutError as exc:
            raise BackendError(
                f"Redis did not answer {what} within {self._timeout}s (command_timeout)"
            ) from exc

    # Commands: queued, then sent together by one task.

    def _enqueue(self, command: Callable[[Pipeline], object], idempotent: bool = True) -> _Pending:
        if self._closed:
            raise BackendError("the context was closed")
        pending = _Pending(command, idempotent)
        self._queue.append(pending)
        self._queued.notify()
        return pending

    async def _call(self, command: Callable[[Pipeline], object], idempotent: bool = True) -> Any:
        pending = self._enqueue(command, idempotent)
        await pending.done.wait()
        return _reply(pending)

    async def _send_commands(self) -> None:
        while True:
            while not self._queue:
                await self._queued.wait()
            batch, self._queue = self._queue, []
            await self._send(batch)

    async def _send(self, batch: list[_Pending]) -> None:
        """Send a batch as one pipeline and settle each of its commands."""
        try:
            try:
                results = await self._execute(batch)
            except _Retryable as exc:
                # A connection that broke since its last use (a Redis restart, say) fails its
                # first command; the pipeline reconnects, so what is safe to send twice gets
                # one more try.
                _settle(batch, lambda pending: not pending.idempotent, exc.error)
                batch = [pending for pending in batch if pending.idempotent]
                results = await self._execute(batch) if batch else []
        except _Retryable as exc:
            _settle(batch, None, exc.error)
            return
        except BackendError as exc:
            _settle(batch, None, exc)
            return
        except BaseException:
            _settle(batch, None, BackendError("command aborted"))
            raise
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                pending.error = result
            else:
                pending.result = result
            pending.done.set()

    async def _execute(self, batch: list[_Pending]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for pending in batch:
            pending.command(pipe)
        try:
            with self._deadline("a command"):
                return await pipe.execute(raise_on_error=False)
        except BackendError:
            raise  # the deadline: sending it all again would only double the wait
        except (redis.exceptions.ConnectionError, ConnectionError) as exc:
            raise _Retryable(BackendError(f"Redis connection error: {exc}")) from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            raise BackendError(f"Redis error: {exc}") from exc

    def _fail_pending(self, exc: BackendError) -> None:
        batch, self._queue = self._queue, []
        _settle(batch, None, exc)

    async def _check_eviction_policy(self) -> None:
        """Warn once if Redis may evict our keys (best effort: CONFIG may be forbidden)."""
        try:
            config = await self._call(lambda pipe: pipe.config_get("maxmemory*"))
        except BackendError as exc:
            logger.debug("could not read Redis' eviction policy: %s", exc)
            return
        config = {_text(k): _text(v) for k, v in dict(config).items()}
        policy = config.get("maxmemory-policy")
        if config.get("maxmemory") not in (None, "0") and policy not in (None, *_SAFE_POLICIES):
            logger.warning(
                "Redis evicts keys under memory pressure (maxmemory-policy %s): a running "
                "stream whose keys are evicted cannot be resumed, and readers get "
                "ProducerConflictError if a second producer starts under its id; use "
                "maxmemory-policy noeviction for resumable streams",
                policy,
            )

    async def incr(self, key: str, ttl: int) -> int | None:
        # redis-py's `incr` sends INCRBY; the raw command keeps the protocol to a plain INCR.
        incr = self._enqueue(lambda pipe: pipe.execute_command("INCR", key), idempotent=False)
        expire = self._enqueue(lambda pipe: pipe.expire(key, ttl))
        await incr.done.wait()
        await expire.done.wait()
        if isinstance(incr.error, redis.exceptions.ResponseError) and _holds_no_integer(incr.error):
            _reply(expire)
            return None  # the key holds a terminal state: the stream finished
        value = _reply(incr)
        _reply(expire)
        return int(value)

    async def get(self, key: str) -> str | None:
        return _text(await self._call(lambda pipe: pipe.get(key)))

    async def set(self, key: str, value: str, ttl: int) -> None:
        await self._call(lambda pipe: pipe.set(key, value, ex=ttl))

    async def swap(self, key: str, value: str, ttl: int) -> str | None:
        return _text(
            await self._call(lambda pipe: pipe.set(key, value, ex=ttl, get=True), idempotent=False)
        )

    async def create(self, key: str, value: str, ttl: int) -> bool:
        created = await self._call(
            lambda pipe: pipe.set(key, value, ex=ttl, nx=True), idempotent=False
        )
        return bool(created)

    async def publish(self, channel: str, message: bytes) -> int:
        return int(await self._call(lambda pipe: pipe.publish(channel, message)))

    # Pub/sub: commands written under a lock (redis-py's PubSub is not safe for concurrent
    # subscribes), confirmations and messages read by one task.

    async def subscribe(self, channel: str, *, wait: bool = True) -> None:
        await self._change(b"subscribe", channel, wait)

    async def unsubscribe(self, channel: str) -> None:
        await self._change(b"unsubscribe", channel, wait=False)

    async def _change(self, kind: bytes, channel: str, wait: bool) -> None:
        with self._deadline(kind.decode()):
            await self._change_now(kind, channel, wait)

    async def _change_now(self, kind: bytes, channel: str, wait: bool) -> None:
        confirmed = anyio.Event()
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
            waiters = self._confirmations.setdefault((kind, channel), deque())
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
            try:
                await confirmed.wait()
            except BaseException:
                # A confirmation that comes later may release the next waiter instead: the
                # server handled this command first, so that waiter's wait is over too.
                with contextlib.suppress(ValueError):
                    waiters.remove(confirmed)
                raise
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
                self._reconnected = True
            if self._reconnected:
                self._reconnected = False
                await self._restore_subscriptions()
                if self._on_reconnect is not None:
                    try:
                        self._on_reconnect()
                    except Exception:
                        logger.exception("reconnect handler failed")
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
