"""The subscriber of one context on a Redis server (or the master a Sentinel names).

One connection, redis-py's `PubSub`: (un)subscribe commands are written under a lock (it is not
safe for concurrent subscribes), and one task reads confirmations and messages and dispatches
them. redis-py reconnects it by itself and resubscribes what it knew of; after that the context
hears `on_reconnect`, since whatever was published meanwhile was lost.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque

import anyio
import redis.exceptions
from anyio.abc import TaskGroup
from redis.asyncio import Redis

from .._backend import MessageHandler, ReconnectHandler
from .._exceptions import BackendError
from ._errors import broken_connection, deadline, delay_after, map_exceptions, text

logger = logging.getLogger("resumable_stream")


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
        self._lock = anyio.Lock()
        self._confirmations: dict[tuple[bytes, str], deque[anyio.Event]] = {}
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

    def _connected_again(self, connection: object) -> None:
        self._reconnected = True

    def start(self, tg: TaskGroup) -> None:
        tg.start_soon(self._read)

    def closing(self) -> None:
        self._closed = True

    async def close(self) -> None:
        self._closed = True
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, channels: tuple[str, ...], wait: bool) -> None:
        with deadline(self._timeout, "SUBSCRIBE"):
            await self._change(b"subscribe", channels, wait)

    async def unsubscribe(self, channels: tuple[str, ...]) -> None:
        with deadline(self._timeout, "UNSUBSCRIBE"):
            await self._change(b"unsubscribe", channels, wait=False)

    async def _change(self, kind: bytes, channels: tuple[str, ...], wait: bool) -> None:
        confirmed = [(channel, anyio.Event()) for channel in channels]
        async with self._lock:
            if kind == b"subscribe":
                self._wanted.update(channels)
            else:
                self._wanted.difference_update(channels)
            if self._closed and kind == b"unsubscribe":
                return  # the subscriptions end with the connection
            if self._error is not None and kind == b"unsubscribe":
                # Down: the reconnect forgets what is no longer wanted.
                for channel in channels:
                    self._pubsub.channels.pop(channel.encode(), None)
                return
            # Even while the connection is down: redis-py connects again to send this (with
            # nothing subscribed, nothing else would make it try).
            for channel, event in confirmed:
                self._confirmations.setdefault((kind, channel), deque()).append(event)
            try:
                with map_exceptions(), broken_connection():
                    if kind == b"subscribe":
                        await self._pubsub.subscribe(*channels)
                    else:
                        await self._pubsub.unsubscribe(*channels)
            except BackendError:
                self._forget(kind, confirmed)
                if not wait:
                    return  # the reconnect subscribes what is wanted then
                raise
            except BaseException:
                self._forget(kind, confirmed)
                raise
        if wait:
            try:
                for _, event in confirmed:
                    await event.wait()
            except BaseException:
                # A confirmation that comes later may release the next waiter instead: the
                # server handled this command first, so that waiter's wait is over too.
                self._forget(kind, confirmed)
                raise
            if self._error is not None:
                raise BackendError("the Redis subscriber connection is down") from self._error

    def _forget(self, kind: bytes, confirmed: list[tuple[str, anyio.Event]]) -> None:
        for channel, event in confirmed:
            with contextlib.suppress(KeyError, ValueError):
                self._confirmations[(kind, channel)].remove(event)

    async def _restore(self) -> None:
        # redis-py resubscribes what it knew of; whatever was asked for during the outage is
        # subscribed here, and what was dropped meanwhile is let go.
        async with self._lock:
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
            waiters.popleft().set()
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
                for waiters in self._confirmations.values():
                    for event in waiters:
                        event.set()
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
