"""The backend interface, and the in-process backend that implements it."""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import anyio.lowlevel

__all__ = [
    "READY",
    "Backend",
    "Connection",
    "CountedConnection",
    "LogEntry",
    "LogId",
    "MemoryBackend",
    "MessageHandler",
    "ReconnectHandler",
]

logger = logging.getLogger("resumable_stream")

MessageHandler = Callable[[str, bytes], None]
"""Called with (channel, message) for every message on a subscribed channel; must not block."""

LogId = tuple[int, int]
"""An entry's id in a durable stream's log: (offset, seq); the order is the tuple's."""
LogEntry = tuple[int, int, str, bytes]
"""(offset, seq, field, value): an entry of a durable stream's log."""
LogAppend = tuple[LogId, bytes, bytes]
"""(id, value, message): an entry to append, and the message that announces it."""

ReconnectHandler = Callable[[], None]
"""Called once a connection's subscriptions are back after an outage: whatever was published
meanwhile was lost. Must not block."""


class _Ready:
    """An awaitable that is done already (on any event loop), and that need not be awaited."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


READY: Awaitable[None] = _Ready()


class Connection(Protocol):
    """What one context needs: a few key commands, publish, and its own subscriptions.

    Messages to this connection's subscriptions are delivered in the order they were published,
    to the handler given to `Backend.connect`.
    """

    # Whether channels are spread over shards (a cluster): then each stream's channels live in
    # its slot, and one channel for all streams would load one shard with every reply.
    sharded: bool

    @property
    def up_since(self) -> float | None:
        """Since when (`anyio.current_time()`) the subscriber side has been up without a break,
        every subscription in place; None while it is down or restoring subscriptions, and
        `-math.inf` if it never broke since it was opened (opening is not an outage).

        Evidence for a follower whose request reached nobody: right after an outage that this
        connection saw, the producer's connection may still be subscribing again, so "nobody
        listens" means "gone" only once this connection has been up for a while."""

    async def incr(self, key: str, ttl: int) -> int | None:
        """Increment `key` and make it expire after `ttl` s; None if it holds a non-integer."""

    async def get(self, key: str) -> str | None: ...

    async def ttl(self, key: str) -> float | None:
        """Seconds until `key` expires: None if it does not exist, `math.inf` if it never
        expires."""

    async def set(self, key: str, value: str, ttl: int) -> None: ...

    async def swap(self, key: str, value: str, ttl: int) -> str | None:
        """Set `key` and return its previous value, atomically."""

    async def replace(self, key: str, expected: str, value: str, ttl: int) -> bool:
        """Set `key` to `value` (living `ttl` s) only if it still holds `expected`, atomically;
        True if it was set."""

    async def create(self, key: str, value: str, ttl: int) -> bool:
        """Set `key` only if it does not exist; True if it was set."""

    async def publish(self, channel: str, message: bytes) -> int:
        """Send `message`; returns how many connections are subscribed to `channel`."""

    def notify(self, channel: str, message: bytes) -> None:
        """Send `message` on `channel` without waiting for it (nor learning whether it was
        sent): for a notice that nobody may be waiting for."""

    async def numsub(self, channel: str) -> int:
        """How many connections are subscribed to `channel` (`PUBSUB NUMSUB`, or on a cluster
        `PUBSUB SHARDNUMSUB` on the channel's shard)."""

    async def restart(
        self, sentinel: str, restarts: str, text: str, expected: str, ttl: int
    ) -> int | None:
        """Start a stream again if `sentinel` still holds `expected`: atomically, set it running
        ("1"), count one more restart in `restarts` and delete the stored text `text`, each key
        living `ttl` s. Returns the new attempt (2 after the first restart), or None if the
        sentinel changed meanwhile (somebody else restarted it)."""

    async def subscribe(self, *channels: str, wait: bool = True) -> None:
        """Subscribe to `channels` (of one stream: one hash slot); with `wait`, return only once
        messages published from now on arrive."""

    async def begin_subscribe(self, *channels: str) -> Awaitable[None]:
        """Send a subscription to `channels` (of one stream), returning once it is on its way;
        awaiting what it returns waits, as `subscribe` does, until messages published from then
        on arrive (and raises `BackendError` if the subscription failed). Whoever can send its
        next command meanwhile saves a round trip."""

    async def unsubscribe(self, *channels: str) -> None: ...

    # Durable streams: a log of entries per stream, each at an id (offset, seq).

    async def append(
        self,
        key: str,
        entries: Sequence[LogAppend],
        field: str,
        ttl: int,
        channel: str,
        sentinel: str,
        state: str | None = None,
    ) -> LogId | None:
        """Add each entry's value (under `field`) to the log `key` at its id, make `key` expire
        after `ttl` s, set the key `sentinel` to `state` if given (else to "1" if it is absent,
        so that a backend that lost it still knows the stream), with that TTL, then publish
        each entry's message on `channel`: atomically, in one round trip. An entry at or after
        an entry's id being there already, that one is not added (so appending twice is
        appending once). Returns the id of the log's last entry before this call (None if it
        had none), so that the writer can tell that the log lost entries."""

    async def read(self, key: str, offset: int, count: int) -> list[LogEntry]:
        """At most `count` entries of the log `key`, from the last one at or before
        (`offset`, 1) on; none if there is no such log."""

    async def delete(self, key: str) -> None: ...


class Backend(Protocol):
    """A shared store and message bus; `connect` opens one context's connection to it."""

    def connect(
        self, on_message: MessageHandler, on_reconnect: ReconnectHandler | None = None
    ) -> AbstractAsyncContextManager[Connection]: ...


class MemoryBackend:
    """An in-process backend: contexts sharing one instance behave like workers sharing a Redis.

    Streams are then resumable only inside this process. `commands` counts the calls made, by
    command name, like Redis' `INFO commandstats`.
    """

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, float]] = {}
        self._logs: dict[str, tuple[list[LogEntry], float]] = {}
        self._subscribers: dict[str, list[_MemoryConnection]] = {}
        self.commands: Counter[str] = Counter()

    def connect(
        self, on_message: MessageHandler, on_reconnect: ReconnectHandler | None = None
    ) -> AbstractAsyncContextManager[Connection]:
        # In one process nothing is ever lost, so `on_reconnect` is never called.
        return self._connect(on_message)

    @asynccontextmanager
    async def _connect(self, on_message: MessageHandler) -> AsyncIterator[Connection]:
        connection = _MemoryConnection(self, on_message)
        try:
            yield connection
        finally:
            for channel in list(connection.channels):
                self._drop(channel, connection)

    def channels(self) -> dict[str, int]:
        """The channels somebody is subscribed to, with their subscriber counts."""
        return {channel: len(subs) for channel, subs in self._subscribers.items()}

    def ttl(self, key: str) -> float | None:
        """Seconds until `key` expires, or None if it does not exist."""
        if self._log(key) is not None:
            return self._logs[key][1] - time.monotonic()
        entry = self._lookup(key)
        return None if entry is None else entry[1] - time.monotonic()

    def _log(self, key: str) -> list[LogEntry] | None:
        found = self._logs.get(key)
        if found is not None and found[1] <= time.monotonic():
            del self._logs[key]
            return None
        return None if found is None else found[0]

    def _lookup(self, key: str) -> tuple[str, float] | None:
        entry = self._values.get(key)
        if entry is not None and entry[1] <= time.monotonic():
            del self._values[key]
            return None
        return entry

    def _drop(self, channel: str, connection: _MemoryConnection) -> None:
        subscribers = self._subscribers.get(channel)
        if subscribers and connection in subscribers:
            subscribers.remove(connection)
            if not subscribers:
                del self._subscribers[channel]
        connection.channels.discard(channel)


class _MemoryConnection:
    sharded = False

    def __init__(self, backend: MemoryBackend, on_message: MessageHandler) -> None:
        self._backend = backend
        self._on_message = on_message
        self.channels: set[str] = set()
        # In one process it is never down (opening is not a break: see `Connection.up_since`).
        self.up_since: float | None = -math.inf

    async def incr(self, key: str, ttl: int) -> int | None:
        await anyio.lowlevel.checkpoint()
        backend = self._backend
        backend.commands.update(("incr", "expire"))
        entry = backend._lookup(key)
        try:
            value = int(entry[0]) + 1 if entry else 1
        except ValueError:
            value = None
        if value is not None:
            backend._values[key] = (str(value), time.monotonic() + ttl)
        elif entry is not None:
            backend._values[key] = (entry[0], time.monotonic() + ttl)
        return value

    async def get(self, key: str) -> str | None:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["get"] += 1
        entry = self._backend._lookup(key)
        return None if entry is None else entry[0]

    async def ttl(self, key: str) -> float | None:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["pttl"] += 1
        return self._backend.ttl(key)

    async def set(self, key: str, value: str, ttl: int) -> None:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["set"] += 1
        self._backend._values[key] = (value, time.monotonic() + ttl)

    async def swap(self, key: str, value: str, ttl: int) -> str | None:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["set"] += 1
        entry = self._backend._lookup(key)
        self._backend._values[key] = (value, time.monotonic() + ttl)
        return None if entry is None else entry[0]

    async def replace(self, key: str, expected: str, value: str, ttl: int) -> bool:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["eval"] += 1
        entry = self._backend._lookup(key)
        if entry is None or entry[0] != expected:
            return False
        self._backend._values[key] = (value, time.monotonic() + ttl)
        return True

    async def create(self, key: str, value: str, ttl: int) -> bool:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["set"] += 1
        if self._backend._lookup(key) is not None:
            return False
        self._backend._values[key] = (value, time.monotonic() + ttl)
        return True

    async def publish(self, channel: str, message: bytes) -> int:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["publish"] += 1
        return self._deliver(channel, message)

    def notify(self, channel: str, message: bytes) -> None:
        self._backend.commands["publish"] += 1
        self._deliver(channel, message)

    async def numsub(self, channel: str) -> int:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["pubsub"] += 1
        return len(self._backend._subscribers.get(channel, ()))

    async def restart(
        self, sentinel: str, restarts: str, text: str, expected: str, ttl: int
    ) -> int | None:
        await anyio.lowlevel.checkpoint()
        backend = self._backend
        backend.commands["eval"] += 1
        entry = backend._lookup(sentinel)
        if entry is None or entry[0] != expected:
            return None
        expiry = time.monotonic() + ttl
        backend._values[sentinel] = ("1", expiry)
        found = backend._lookup(restarts)
        count = int(found[0]) + 1 if found else 1
        backend._values[restarts] = (str(count), expiry)
        backend._logs.pop(text, None)
        return count + 1

    def _deliver(self, channel: str, message: bytes) -> int:
        subscribers = self._backend._subscribers.get(channel, ())
        for connection in tuple(subscribers):
            try:
                connection._on_message(channel, message)
            except Exception:
                logger.exception("message handler failed on channel %r", channel)
        return len(subscribers)

    async def subscribe(self, *channels: str, wait: bool = True) -> None:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["subscribe"] += 1
        for channel in channels:
            if channel not in self.channels:
                self.channels.add(channel)
                self._backend._subscribers.setdefault(channel, []).append(self)

    async def begin_subscribe(self, *channels: str) -> Awaitable[None]:
        await self.subscribe(*channels)
        return READY

    async def unsubscribe(self, *channels: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["unsubscribe"] += 1
        for channel in channels:
            self._backend._drop(channel, self)

    async def append(
        self,
        key: str,
        entries: Sequence[LogAppend],
        field: str,
        ttl: int,
        channel: str,
        sentinel: str,
        state: str | None = None,
    ) -> LogId | None:
        await anyio.lowlevel.checkpoint()
        backend = self._backend
        backend.commands["eval"] += 1
        log = backend._log(key) or []
        last = (log[-1][0], log[-1][1]) if log else None
        for entry, value, _ in entries:
            if not log or entry > (log[-1][0], log[-1][1]):
                log.append((*entry, field, value))
        expiry = time.monotonic() + ttl
        backend._logs[key] = (log, expiry)
        if state is not None or backend._lookup(sentinel) is None:
            backend._values[sentinel] = (state or "1", expiry)
        for _, _, message in entries:
            self._deliver(channel, message)
        return last

    async def read(self, key: str, offset: int, count: int) -> list[LogEntry]:
        await anyio.lowlevel.checkpoint()
        self._backend.commands.update(("xrevrange", "xrange"))
        log = self._backend._log(key) or []
        first = bisect.bisect_right(log, (offset, 1, "\uffff")) - 1
        return log[max(first, 0) : max(first, 0) + count]

    async def delete(self, key: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._backend.commands["del"] += 1
        self._backend._logs.pop(key, None)
        self._backend._values.pop(key, None)


class CountedConnection:
    """A connection that reports every command it is asked for to `count`, by the name of the
    Redis command it amounts to (those `MemoryBackend.commands` counts, too): one place, at the
    backend boundary, whatever the backend. A context wraps its connection in one only when
    telemetry is on. Each method counts and returns the wrapped connection's own awaitable (no
    coroutine of its own: this is on every command's path)."""

    __slots__ = ("_connection", "_count", "sharded")

    def __init__(self, connection: Connection, count: Callable[[str], None]) -> None:
        self._connection = connection
        self._count = count
        self.sharded = connection.sharded

    @property
    def up_since(self) -> float | None:
        return self._connection.up_since

    def incr(self, key: str, ttl: int) -> Coroutine[Any, Any, int | None]:
        self._count("incr")
        self._count("expire")
        return self._connection.incr(key, ttl)

    def get(self, key: str) -> Coroutine[Any, Any, str | None]:
        self._count("get")
        return self._connection.get(key)

    def ttl(self, key: str) -> Coroutine[Any, Any, float | None]:
        self._count("pttl")
        return self._connection.ttl(key)

    def set(self, key: str, value: str, ttl: int) -> Coroutine[Any, Any, None]:
        self._count("set")
        return self._connection.set(key, value, ttl)

    def swap(self, key: str, value: str, ttl: int) -> Coroutine[Any, Any, str | None]:
        self._count("set")
        return self._connection.swap(key, value, ttl)

    def replace(self, key: str, expected: str, value: str, ttl: int) -> Coroutine[Any, Any, bool]:
        self._count("eval")
        return self._connection.replace(key, expected, value, ttl)

    def create(self, key: str, value: str, ttl: int) -> Coroutine[Any, Any, bool]:
        self._count("set")
        return self._connection.create(key, value, ttl)

    def publish(self, channel: str, message: bytes) -> Coroutine[Any, Any, int]:
        self._count("publish")
        return self._connection.publish(channel, message)

    def notify(self, channel: str, message: bytes) -> None:
        self._count("publish")
        self._connection.notify(channel, message)

    def numsub(self, channel: str) -> Coroutine[Any, Any, int]:
        self._count("pubsub")
        return self._connection.numsub(channel)

    def restart(
        self, sentinel: str, restarts: str, text: str, expected: str, ttl: int
    ) -> Coroutine[Any, Any, int | None]:
        self._count("eval")
        return self._connection.restart(sentinel, restarts, text, expected, ttl)

    def subscribe(self, *channels: str, wait: bool = True) -> Coroutine[Any, Any, None]:
        self._count("subscribe")
        return self._connection.subscribe(*channels, wait=wait)

    def begin_subscribe(self, *channels: str) -> Coroutine[Any, Any, Awaitable[None]]:
        self._count("subscribe")
        return self._connection.begin_subscribe(*channels)

    def unsubscribe(self, *channels: str) -> Coroutine[Any, Any, None]:
        self._count("unsubscribe")
        return self._connection.unsubscribe(*channels)

    def append(
        self,
        key: str,
        entries: Sequence[LogAppend],
        field: str,
        ttl: int,
        channel: str,
        sentinel: str,
        state: str | None = None,
    ) -> Coroutine[Any, Any, LogId | None]:
        self._count("eval")
        return self._connection.append(key, entries, field, ttl, channel, sentinel, state)

    def read(self, key: str, offset: int, count: int) -> Coroutine[Any, Any, list[LogEntry]]:
        self._count("xrevrange")
        self._count("xrange")
        return self._connection.read(key, offset, count)

    def delete(self, key: str) -> Coroutine[Any, Any, None]:
        self._count("del")
        return self._connection.delete(key)
