"""The subscriber of one context on a Redis server (or the master a Sentinel names).

One connection of our own (a redis-py `Connection`, not its `PubSub`), with one owner: a task
that reads it and is the only one to connect it again. (Un)subscriptions are queued and sent
by one task (those queued meanwhile in one command), under a lock that the reconnection holds
too, so nothing is ever written to a connection that is being replaced, and nothing but the
reader ever reads it. (redis-py's `PubSub` reconnects from whichever coroutine finds its
connection broken: a SUBSCRIBE sent during an outage connected it while the reader task read
it, and the reader died of `RuntimeError: readuntil() called while another coroutine is
already waiting`, taking the context down.)

After an outage the reader subscribes again to everything still wanted, in one command, and
once Redis confirmed it all, the context hears `on_reconnect`: whatever was published meanwhile
was lost. A connection that answers nothing (a stalled server, a silent network) is found by
a PING while it is idle, and dropped if the answer takes longer than `command_timeout`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Generator
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry

from .._backend import MessageHandler, ReconnectHandler
from .._buffer import Signal
from .._exceptions import BackendError
from ._done import Done
from ._errors import NoBackoff, deadline, delay_after, text
from ._tasks import Tasks

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
        pool = client.connection_pool
        # No timeout on reads: a subscriber waits for messages as long as it lives (it is
        # checked with pings instead). RESP2: pushes come as plain replies (redis-py 8's
        # maintenance notifications are RESP3 only, and not for this connection). No retries
        # inside redis-py: reconnecting is the reader's, with backoff.
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if "maint" not in k}
        kwargs.update(socket_timeout=None, protocol=2, retry=Retry(NoBackoff(), 0))
        self._connection: AbstractConnection = pool.connection_class(**kwargs)
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._timeout = timeout
        self._closed = False
        # Down since the last failure, until the connection is back (`_error`); then until
        # every wanted channel is confirmed again (`_restoring`): `up_since` is None meanwhile.
        self._error: BaseException | None = None
        self._restoring: set[str] | None = None
        self._up_since: float | None = None
        # Changes are queued and sent by one task, those queued meanwhile together (a burst of
        # new streams costs a few SUBSCRIBE commands, not one each, and nobody waits for a
        # lock). Every write to the connection holds the lock, reconnections included.
        self._changes: list[_Change] = []
        self._queued = Signal()
        # fast_acquire: an uncontended lock costs no loop turn (a follower's resume waits on it).
        self._write_lock = anyio.Lock(fast_acquire=True)
        self._confirmations: dict[tuple[bytes, str], deque[_Change]] = {}
        # Subscriptions waited for when the connection broke (or asked for while it is down):
        # the reconnection's SUBSCRIBE confirms them, its failure fails them. A resume that
        # comes during a blip (Redis dropped us for a reply over its pubsub buffer limit, a
        # restart) waits the few ms the reconnection takes rather than failing.
        self._parked: list[_Change] = []
        # What should be subscribed (ordered: restored in the order asked), so that a
        # reconnection restores what an outage lost.
        self._wanted: dict[str, None] = {}
        self._read_scope = anyio.CancelScope()
        self._heard = 0.0  # when the server last sent anything
        self._ping_sent: float | None = None  # a PING not answered yet, sent then
        self._reconnect_now = anyio.Event()

    async def connect(self) -> None:
        try:
            with deadline(self._timeout, "connect"):
                await self._connection.connect()  # type: ignore[no-untyped-call]
        except BackendError:
            raise
        except Exception as exc:  # redis-py's, OSError, or anything its connect raised
            raise BackendError(f"Redis connection error: {exc}") from exc
        self._heard = anyio.current_time()
        self._up_since = -math.inf  # opening is not a break (see `Connection.up_since`)

    @property
    def connected(self) -> bool:
        return self._error is None and not self._closed

    @property
    def up_since(self) -> float | None:
        if self._closed or self._error is not None or self._restoring is not None:
            return None
        return self._up_since

    def start(self, tasks: Tasks) -> None:
        tasks.spawn(self._run)
        tasks.spawn(self._send_changes)
        tasks.spawn(self._watch)

    def closing(self) -> None:
        self._closed = True
        self._fail_parked(BackendError("the Redis subscriber connection is closed"))

    async def close(self) -> None:
        self.closing()
        with contextlib.suppress(Exception):
            await self._connection.disconnect()

    # Subscribing

    async def subscribe(self, channels: tuple[str, ...], wait: bool) -> None:
        if not wait:
            self._want(channels)
            self._queue(b"subscribe", channels, wait)
            return
        await (await self.begin(channels))

    async def begin(self, channels: tuple[str, ...]) -> Awaitable[None]:
        """Send SUBSCRIBE `channels`; returns, once it is written (or queued behind another),
        what to await for its confirmation."""
        self._want(channels)
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

    async def unsubscribe(self, channels: tuple[str, ...]) -> None:
        """Returns once the command is sent (not confirmed); while the connection is down
        nothing is sent: the reconnection subscribes only what is still wanted."""
        for channel in channels:
            self._wanted.pop(channel, None)
        if self._closed:
            return  # the subscriptions end with the connection
        change = self._queue(b"unsubscribe", channels, wait=False)
        with deadline(self._timeout, "UNSUBSCRIBE"):
            await change.done.wait()

    def _want(self, channels: tuple[str, ...]) -> None:
        for channel in channels:
            self._wanted[channel] = None

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
        """Send one command for `group`, within `command_timeout`; while the connection is
        down, nothing (the reconnection restores what is wanted), and whoever waits for a
        confirmation learns that it is down."""
        channels = [channel for change in group for channel in change.channels]
        what = kind.decode().upper()
        async with self._write_lock:
            if self._error is not None:
                for change in group:
                    if change.waiting:
                        self._parked.append(change)  # the reconnection subscribes it
                    else:
                        change.done.set()
                return
            for change in group:
                if change.waiting:
                    for channel in change.channels:
                        self._confirmations.setdefault((kind, channel), deque()).append(change)
            try:
                if not self._connection.is_connected:
                    # Dropped under us (a read failed): redis-py would connect it again here,
                    # while its reader may still be using it.
                    raise BackendError("the Redis subscriber connection was dropped")
                with deadline(self._timeout, what):
                    await self._connection.send_command(what, *channels)
            except BaseException as exc:
                # The connection is the reader's to drop and connect again: tell it.
                self._broken(exc)
                error = exc if isinstance(exc, BackendError) else None
                failure = error or BackendError(f"Redis subscriber error: {exc!r}")
                for change in group:
                    self._forget(change)
                    change.fail(failure)
                if not isinstance(exc, Exception):
                    raise  # a cancellation
                return
        for change in group:
            if not change.waiting:
                change.done.set()  # nothing to wait for but the sending

    def _forget(self, change: _Change) -> None:
        with contextlib.suppress(ValueError):
            self._parked.remove(change)
        for channel in change.channels:
            with contextlib.suppress(KeyError, ValueError):
                self._confirmations[(change.kind, channel)].remove(change)

    def _confirm(self, kind: bytes, channel: str) -> None:
        waiters = self._confirmations.get((kind, channel))
        if waiters:
            waiters.popleft().confirmed()
            if not waiters:
                del self._confirmations[(kind, channel)]
        restoring = self._restoring
        if restoring is not None and kind == b"subscribe":
            restoring.discard(channel)
            if not restoring:
                self._restored()

    # The connection's owner: reads it, and connects it again when it breaks

    def _broken(self, exc: BaseException) -> None:
        """The connection failed (found by a write, a read, or a ping): the reader drops it."""
        if self._error is None:
            self._error = exc
            self._restoring = None
            for waiters in self._confirmations.values():
                for change in waiters:
                    if change not in self._parked:  # a change waits under each channel
                        self._parked.append(change)
            self._confirmations.clear()
        self._read_scope.cancel()

    async def _run(self) -> None:
        failures = 0
        while True:
            if self._error is not None:
                delay = delay_after(failures)
                failures += 1
                logger.warning(
                    "Redis subscriber connection failed (%s); retrying in %ss", self._error, delay
                )
                with anyio.move_on_after(delay):
                    await self._reconnect_now.wait()
                self._reconnect_now = anyio.Event()
                if not await self._reconnect():
                    continue
                logger.warning("Redis subscriber connection restored")
                failures = 0
            with anyio.CancelScope() as self._read_scope:
                if self._error is not None:
                    continue  # broken meanwhile
                try:
                    while True:
                        response = await self._connection.read_response()
                        self._heard = anyio.current_time()
                        self._ping_sent = None
                        self._handle(response)
                except Exception as exc:
                    # Whatever redis-py raised (a connection error, or an error of its own
                    # state, as a RuntimeError): the connection is dropped and made again.
                    self._broken(exc)

    def poke(self) -> None:
        """Reconnect now rather than after the backoff: Redis answers again."""
        if self._error is not None:
            self._reconnect_now.set()

    async def _reconnect(self) -> bool:
        """Connect again and subscribe what is wanted, in one command; True once sent."""
        async with self._write_lock:
            try:
                with deadline(self._timeout, "connect"):
                    await self._connection.disconnect()
                    await self._connection.connect()  # type: ignore[no-untyped-call]
                    wanted = tuple(self._wanted)
                    if wanted:
                        await self._connection.send_command("SUBSCRIBE", *wanted)
            except Exception as exc:
                self._error = exc
                with contextlib.suppress(Exception):
                    await self._connection.disconnect()
                self._fail_parked(BackendError(f"the Redis subscriber connection is down: {exc}"))
                return False
            self._error = None
            parked, self._parked = self._parked, []
            sent = set(wanted)
            for change in parked:
                if sent.issuperset(change.channels):
                    change.waiting = len(change.channels)
                    for channel in change.channels:
                        self._confirmations.setdefault((b"subscribe", channel), deque()).append(
                            change
                        )
                else:  # unsubscribed meanwhile: nobody waits for it any more
                    change.fail(BackendError("unsubscribed before it was confirmed"))
            self._heard = anyio.current_time()
            self._ping_sent = None
            self._restoring = set(wanted)
            if not wanted:
                self._restored()
            return True

    def _fail_parked(self, error: BackendError) -> None:
        parked, self._parked = self._parked, []
        for change in parked:
            change.fail(error)

    def _restored(self) -> None:
        """Every wanted channel is subscribed again: what was published meanwhile is lost."""
        self._restoring = None
        self._up_since = anyio.current_time()
        if self._on_reconnect is not None:
            try:
                self._on_reconnect()
            except Exception:
                logger.exception("reconnect handler failed")

    async def _watch(self) -> None:
        """Ping an idle connection; drop one whose PING takes longer than `command_timeout`."""
        interval = self._timeout / 2
        while True:
            await anyio.sleep(interval)
            if self._error is not None:
                continue
            now = anyio.current_time()
            if self._ping_sent is not None:
                if now - self._ping_sent >= self._timeout:
                    self._broken(BackendError(f"no answer to a PING within {self._timeout}s"))
                continue
            if now - self._heard < interval:
                continue  # it spoke lately
            self._ping_sent = now
            if self._write_lock.locked():
                continue  # a write is under way: its answer will do
            async with self._write_lock:
                if self._error is not None:
                    continue
                try:
                    if not self._connection.is_connected:
                        raise BackendError("the Redis subscriber connection was dropped")
                    with deadline(self._timeout, "PING"):
                        await self._connection.send_command("PING")
                except Exception as exc:
                    self._broken(exc)

    def _handle(self, response: Any) -> None:
        if not isinstance(response, list) or not response:
            return  # a bare PONG: the connection subscribes to nothing
        kind = response[0]
        if isinstance(kind, str):
            kind = kind.encode()
        kind = kind.lower()
        if kind == b"message":
            channel, data = response[1], response[2]
            if isinstance(data, str):
                data = data.encode("utf-8", "surrogatepass")
            try:
                self._on_message(text(channel) or "", data)
            except Exception:
                logger.exception("message handler failed")
        elif kind in (b"subscribe", b"unsubscribe"):
            self._confirm(kind, text(response[1]) or "")
