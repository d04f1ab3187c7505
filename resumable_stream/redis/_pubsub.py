"""The subscriber of one context on a Redis server (or the master a Sentinel names).

One connection, redis-py's `PubSub`: (un)subscriptions are queued and sent by one task (those
queued meanwhile in one command), and one task reads confirmations and messages and dispatches
them. redis-py reconnects it by itself and resubscribes what it knew of; after that the context
hears `on_reconnect`, since whatever was published meanwhile was lost.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Generator
from typing import Any

import anyio
import redis.exceptions
from anyio.abc import TaskGroup
from redis.asyncio import Redis

from .._backend import MessageHandler, ReconnectHandler
from .._buffer import Signal
from .._exceptions import BackendError
from ._done import Done
from ._errors import broken_connection, deadline, delay_after, map_exceptions, text

logger = logging.getLogger("resumable_stream")


class _Change:
    """An (un)subscription asked for, and its waiter, if any: `done` once the server confirmed
    every channel, or the change failed (`error`)."""

    __slots__ = ("channels", "done", "error", "kind", "waiting")

    def __init__(self, kind: bytes, channels: tuple[str, ...], wait: bool) -> None:
        self.kind = kind
        self.channels = channels
        self.waiting = len(channels) if wait else 0
        self.done = Done()
        self.error: BackendError | None = None

    def confirmed(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.done.set()

    def fail(self, error: BackendError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _Confirmation:
    """What `Subscriber.begin` returns: its coroutine is made only if it is awaited."""

    __slots__ = ("_change", "_subscriber")

    def __init__(self, subscriber: Subscriber, change: _Change) -> None:
        self._subscriber = subscriber
        self._change = change

    def __await__(self) -> Generator[Any, None, None]:
        return self._subscriber.confirmed(self._change).__await__()


class Subscriber:
    def __init__(
        self,
        client: Redis,
        on_message: MessageHandler,
        on_reconnect: ReconnectHandler | None,
        timeout: float,
    ) -> None:
        self._pubsub = client.pubsub()
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._timeout = timeout
        # Set when redis-py reconnected the subscriber (it does so by itself, resubscribing
        # what it knew of): messages published meanwhile were lost.
        self._reconnected = False
        self._closed = False
        # Changes are queued and sent by one task, those queued meanwhile together (a burst
        # of new streams costs a few SUBSCRIBE commands, not one each, and nobody waits for
        # a lock); writes on the PubSub are serialized (it is not safe for concurrent ones).
        self._changes: list[_Change] = []
        self._queued = Signal()
        # fast_acquire: an uncontended lock costs no loop turn (a follower's resume waits on it).
        self._write_lock = anyio.Lock(fast_acquire=True)
        self._confirmations: dict[tuple[bytes, str], deque[_Change]] = {}
        self._error: BaseException | None = None
        # What we want to be subscribed to, so a reconnect can restore what an outage lost.
        self._wanted: set[str] = set()

    async def connect(self) -> None:
        with map_exceptions(), deadline(self._timeout, "connect"):
            await self._pubsub.connect()  # type: ignore[no-untyped-call]
        # Every redis-py connection has it; fakeredis's, with older redis-py, has not (and
        # never loses what it was sent).
        register = getattr(self._pubsub.connection, "register_connect_callback", None)
        if register is not None:
            register(self._connected_again)

    @property
    def connected(self) -> bool:
        return self._error is None and not self._closed

    def _connected_again(self, connection: object) -> None:
        self._reconnected = True

    def start(self, tg: TaskGroup) -> None:
        tg.start_soon(self._read)
        tg.start_soon(self._send_changes)

    def closing(self) -> None:
        self._closed = True

    async def close(self) -> None:
        self._closed = True
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, channels: tuple[str, ...], wait: bool) -> None:
        if not wait:
            self._wanted.update(channels)
            self._queue(b"subscribe", channels, wait)
            return
        await (await self.begin(channels))

    async def begin(self, channels: tuple[str, ...]) -> Awaitable[None]:
        """Send SUBSCRIBE `channels`; returns, once it is written (or queued behind another),
        what to await for its confirmation."""
        self._wanted.update(channels)
        if self._changes or self._write_lock.locked():
            return _Confirmation(self, self._queue(b"subscribe", channels, True))
        # Nothing queued or being sent: send it from here, without a hop through the sending
        # task (a follower waits for this before it can ask for its text).
        change = _Change(b"subscribe", channels, True)
        try:
            await self._send(b"subscribe", [change])
        except BaseException:
            self._forget(change)  # a later confirmation is not this one's
            raise
        return _Confirmation(self, change)

    async def confirmed(self, change: _Change) -> None:
        try:
            with deadline(self._timeout, "SUBSCRIBE"):
                await change.done.wait()
        except BaseException:
            self._forget(change)
            raise
        if change.error is not None:
            raise change.error
        if self._error is not None:
            raise BackendError("the Redis subscriber connection is down") from self._error

    async def unsubscribe(self, channels: tuple[str, ...]) -> None:
        """Returns once the command is sent (not confirmed); a failure is left to the
        reconnect, which forgets what is no longer wanted."""
        self._wanted.difference_update(channels)
        if self._closed:
            return  # the subscriptions end with the connection
        change = self._queue(b"unsubscribe", channels, wait=False)
        with deadline(self._timeout, "UNSUBSCRIBE"):
            await change.done.wait()

    def _queue(self, kind: bytes, channels: tuple[str, ...], wait: bool) -> _Change:
        change = _Change(kind, channels, wait)
        self._changes.append(change)
        self._queued.notify()
        return change

    async def _send_changes(self) -> None:
        while True:
            while not self._changes:
                await self._queued.wait()
            changes, self._changes = self._changes, []
            for kind, group in itertools.groupby(changes, key=lambda change: change.kind):
                await self._send(kind, list(group))
            # Not kept while waiting for the next changes (see Commands._send_all).
            del changes, group

    async def _send(self, kind: bytes, group: list[_Change]) -> None:
        """Send one command for `group`, within `command_timeout`."""
        channels = [channel for change in group for channel in change.channels]
        if kind == b"unsubscribe" and self._error is not None:
            # Down: the reconnect forgets what is no longer wanted.
            for channel in channels:
                self._pubsub.channels.pop(channel.encode(), None)
            for change in group:
                change.done.set()
            return
        for change in group:
            if change.waiting:
                for channel in change.channels:
                    self._confirmations.setdefault((kind, channel), deque()).append(change)
        try:
            # Even while the connection is down: redis-py connects again to send this (with
            # nothing subscribed, nothing else would make it try).
            what = kind.decode().upper()
            async with self._write_lock:
                with deadline(self._timeout, what), map_exceptions(), broken_connection():
                    if kind == b"subscribe":
                        await self._pubsub.subscribe(*channels)
                    else:
                        await self._pubsub.unsubscribe(*channels)
        except BackendError as exc:
            # Still wanted: the reconnect subscribes them. Whoever waits learns it now.
            for change in group:
                self._forget(change)
                change.fail(exc)
            return
        for change in group:
            if not change.waiting:
                change.done.set()  # nothing to wait for but the sending

    def _forget(self, change: _Change) -> None:
        for channel in change.channels:
            with contextlib.suppress(KeyError, ValueError):
                self._confirmations[(change.kind, channel)].remove(change)

    async def _restore(self) -> None:
        # redis-py resubscribes what it knew of; whatever was asked for during the outage is
        # subscribed here, and what was dropped meanwhile is let go.
        async with self._write_lock:
            known = {text(name) for name in self._pubsub.channels}
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
            waiters.popleft().confirmed()
            if not waiters:
                del self._confirmations[(kind, channel)]

    async def _read(self) -> None:
        pubsub = self._pubsub
        failures = 0
        while True:
            try:
                response = await pubsub.parse_response(block=True)
            except (redis.exceptions.RedisError, OSError) as exc:
                self._error = exc
                down = BackendError(f"the Redis subscriber connection is down: {exc}")
                for waiters in self._confirmations.values():
                    for change in waiters:
                        change.fail(down)
                self._confirmations.clear()
                delay = delay_after(failures)
                failures += 1
                logger.warning(
                    "Redis subscriber connection failed (%s); retrying in %ss", exc, delay
                )
                await anyio.sleep(delay)
                continue
            if self._error is not None:
                logger.warning("Redis subscriber connection restored")
                self._error = None
                self._reconnected = True
            if self._reconnected:
                self._reconnected = False
                await self._restore()
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
                    self._on_message(text(channel) or "", data)
                except Exception:
                    logger.exception("message handler failed")
            elif kind in (b"subscribe", b"unsubscribe"):
                await pubsub.handle_message(response)  # type: ignore[no-untyped-call]
                self._confirm(kind, text(response[1]) or "")
