"""A simulated Redis, with every fault Redis's own guarantees allow and no more.

`SimRedis` is the server: keys with TTLs on the loop's (virtual) clock, INCR/GET/SET and the
durable log with the semantics of `MemoryBackend`, and pub/sub with a subscription table per
subscriber connection. `SimBackend` is a process's `Backend`: `connect` opens one
`SimConnection`, which (like the Redis backend) is two connections in one: a command
connection and a subscriber connection.

What travels between a connection and the server travels through a `_Pipe`: one direction of
one connection, whose items arrive in the order they were sent, each after its own random
latency. That is all Redis promises: commands of one connection run in the order sent,
replies come back in that order, and a subscriber connection receives messages (and its
subscriptions' confirmations) in the order they were published. Nothing else is ordered:
a command connection and a subscriber connection race each other, as do two processes.

Faults, all drawn from the run's random generator (`_faults.LinkProfile` per process):

- latency per item, with spikes, and "slow links" (a process whose every item is delayed);
- a command that fails before taking effect (`BackendError`), one that takes effect but whose
  reply is lost (`BackendError`), one that gets no reply by its deadline (`BackendError`; it
  may still take effect afterwards, when a stalled server resumes);
- a connection dropped and restored after a gap (either or both of a process's two): in-flight
  commands may or may not have reached the server, their replies are lost, the subscriptions
  are gone and what was published to them meanwhile (and in flight) is lost; when restored,
  the subscriber subscribes again to what it still wants, and once that is confirmed calls
  the `on_reconnect` handler, as the Redis backend does;
- a stall (the server paused): nothing is executed, published or delivered until it resumes;
- a restart without persistence: every key gone, every connection dropped, restored after;
- eviction of one key; a full server (writes refused with an OOM error);
- a process's death: its connections are severed for good (what it sent before may still
  arrive; nothing after), and its subscriptions vanish.

Every key written has a TTL; `Ledger.keys` records each key's writes and losses, which the
model reads.

Where the `Connection` protocol leaves a choice, this backend does what the Redis backend does:

- a subscription that fails (`subscribe`, `begin_subscribe` or its confirmation raising
  `BackendError`) stays wanted: the channel is subscribed when the connection is restored, and
  one whose request reached the server stays subscribed;
- `unsubscribe` returns once sent, and messages published before it took effect still arrive;
- `on_reconnect` is called from the reading task once the restored subscriptions are confirmed
  (the Redis backend calls it once the first reply after a reconnect arrives: channels asked
  for during the outage may not be in place yet, so this backend is slightly kinder);
- `up_since` is None while the subscriber is down or restoring, else the time the last
  restoration was confirmed; a new subscription in flight does not reset it;
- `connect` lets a single exception of the caller's block out as itself (its task group would
  wrap it in a group), as the Redis backend does: `ResumableStreamContext.__aenter__` relies
  on it, or a failure to subscribe its inbox would come out of `async with ctx` as a group.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from resumable_stream import BackendError
from resumable_stream._backend import (
    Connection,
    LogAppend,
    LogEntry,
    LogId,
    MessageHandler,
    ReconnectHandler,
)
from resumable_stream._exceptions import single_exception_out

from ._history import History
from ._ledger import Ledger, Outage

__all__ = ["LinkProfile", "SimBackend", "SimConnection", "SimRedis"]

logger = logging.getLogger("resumable_stream")

# Connection states.
UP, RESTORING, DOWN, DEAD, CLOSED = "up", "restoring", "down", "dead", "closed"

_WRITES = frozenset({"incr", "set", "swap", "replace", "create", "append", "restart_stream"})


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """How one process's link to Redis behaves (seconds, probabilities per command)."""

    latency: float  # one way, the least
    jitter: float  # added, uniform in [0, jitter]
    spike_p: float  # a spike instead: uniform in [latency, spike]
    spike: float
    fail_p: float  # a command fails before taking effect
    lost_p: float  # a command takes effect, its reply is lost
    command_timeout: float  # a command's deadline, as the Redis backend's `command_timeout`


class _Failure:
    """A command's or a subscription's failure, carried as a future's result: a future nobody
    awaits any more then never logs "exception was never retrieved"."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _settle(future: asyncio.Future[Any], value: object) -> None:
    if not future.done():
        future.set_result(value)


def _outcome(value: object) -> Any:
    if isinstance(value, _Failure):
        raise BackendError(value.message)
    return value


class _Pipe:
    """One direction of one connection: items arrive in the order sent, each after its delay;
    held while the server is stalled."""

    __slots__ = ("_handle", "_items", "_last", "_loop", "_server")

    def __init__(self, server: SimRedis) -> None:
        self._server = server
        self._loop = server.loop
        self._items: deque[tuple[float, Callable[..., None], tuple[Any, ...]]] = deque()
        self._handle: asyncio.TimerHandle | None = None
        self._last = 0.0

    def send(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        due = max(self._loop.time() + delay, self._last)
        self._last = due
        self._items.append((due, fn, args))
        if self._handle is None and len(self._items) == 1:
            if self._server.stalled:
                self._server.hold(self)
            else:
                self._handle = self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._handle = None
        server = self._server
        items = self._items
        now = self._loop.time()
        while items and items[0][0] <= now:
            if server.stalled:
                server.hold(self)
                return
            _, fn, args = items.popleft()
            fn(*args)
        if items and self._handle is None:
            self._handle = self._loop.call_at(items[0][0], self._fire)

    def resume(self) -> None:
        if self._items and self._handle is None:
            self._handle = self._loop.call_at(self._items[0][0], self._fire)

    def clear(self) -> list[tuple[Callable[..., None], tuple[Any, ...]]]:
        """Drop what is in flight; returns it, in order."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        dropped = [(fn, args) for _, fn, args in self._items]
        self._items.clear()
        return dropped


class SimRedis:
    """The server: keys, logs, channels; faults that hit the server as a whole."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        history: History,
        ledger: Ledger,
    ) -> None:
        self.loop = loop
        self.rng = rng
        self.history = history
        self.ledger = ledger
        self.values: dict[str, tuple[str, float]] = {}
        self.logs: dict[str, tuple[list[LogEntry], float]] = {}
        # Subscribers of each channel (dicts as ordered sets: published in a fixed order).
        self.channels: dict[str, dict[SimConnection, None]] = {}
        self.connections: list[SimConnection] = []
        self.stalled = False
        self._stall_end = -math.inf
        self._stall_handle: asyncio.TimerHandle | None = None
        self._held: dict[_Pipe, None] = {}
        self.down = False  # restarting
        self.oom = False

    def now(self) -> float:
        return self.loop.time()

    # Keys

    def _value(self, key: str) -> tuple[str, float] | None:
        entry = self.values.get(key)
        if entry is not None and entry[1] <= self.now():
            del self.values[key]
            return None
        return entry

    def _log(self, key: str) -> list[LogEntry] | None:
        found = self.logs.get(key)
        if found is not None and found[1] <= self.now():
            del self.logs[key]
            return None
        return None if found is None else found[0]

    def _write(self, key: str, value: str, ttl: float) -> None:
        expiry = self.now() + ttl
        self.values[key] = (value, expiry)
        self.ledger.timeline(key).wrote(self.now(), expiry)
        if value == "LOST":
            self.ledger.lost_writes.append((self.now(), key))

    def exists(self, key: str) -> bool:
        return self._value(key) is not None or self._log(key) is not None

    def live_keys(self) -> list[str]:
        return [key for key in [*self.values, *self.logs] if self.exists(key)]

    def ttl_of(self, key: str) -> float | None:
        if self._log(key) is not None:
            return self.logs[key][1] - self.now()
        entry = self._value(key)
        return None if entry is None else entry[1] - self.now()

    # Commands, executed atomically when they arrive. Each returns its reply, or a
    # `_Failure` for an error reply.

    def incr(self, key: str, ttl: int) -> int | None:
        if key.endswith(":restarts"):
            # A writer's retry after its stream's state expired: a later attempt too.
            sentinel = key.removesuffix(":restarts") + ":sentinel"
            self.ledger.restarts.append((self.now(), sentinel))
        entry = self._value(key)
        try:
            value: int | None = int(entry[0]) + 1 if entry else 1
        except ValueError:
            value = None
        self._write(key, str(value) if value is not None else entry[0] if entry else "", ttl)
        return value

    def get(self, key: str) -> str | None:
        entry = self._value(key)
        return None if entry is None else entry[0]

    def set(self, key: str, value: str, ttl: int) -> None:
        self._write(key, value, ttl)

    def swap(self, key: str, value: str, ttl: int) -> str | None:
        entry = self._value(key)
        self._write(key, value, ttl)
        return None if entry is None else entry[0]

    def replace(self, key: str, expected: str, value: str, ttl: int) -> bool:
        entry = self._value(key)
        if entry is None or entry[0] != expected:
            return False
        self._write(key, value, ttl)
        return True

    def create(self, key: str, value: str, ttl: int) -> bool:
        if self._value(key) is not None:
            return False
        self._write(key, value, ttl)
        return True

    def publish(self, channel: str, message: bytes) -> int:
        subscribers = self.channels.get(channel)
        if not subscribers:
            return 0
        for connection in subscribers:
            connection.deliver_later(channel, message)
        return len(subscribers)

    def append(
        self,
        key: str,
        entries: Sequence[LogAppend],
        field: str,
        ttl: int,
        channel: str,
        sentinel: str,
        state: str | None,
    ) -> LogId | None:
        log = self._log(key) or []
        last = (log[-1][0], log[-1][1]) if log else None
        for entry, value, _ in entries:
            if not log or entry > (log[-1][0], log[-1][1]):
                log.append((*entry, field, value))
        expiry = self.now() + ttl
        self.logs[key] = (log, expiry)
        self.ledger.timeline(key).wrote(self.now(), expiry)
        if state is not None or self._value(sentinel) is None:
            self._write(sentinel, state or "1", ttl)
        for _, _, message in entries:
            self.publish(channel, message)
        return last

    def numsub(self, channel: str) -> int:
        return len(self.channels.get(channel, ()))

    def restart_stream(
        self, sentinel: str, restarts: str, text: str, expected: str, ttl: int
    ) -> int | None:
        entry = self._value(sentinel)
        if entry is None or entry[0] != expected:
            return None
        self._write(sentinel, "1", ttl)
        self.ledger.restarts.append((self.now(), sentinel))
        found = self._value(restarts)
        count = int(found[0]) + 1 if found else 1
        self._write(restarts, str(count), ttl)
        self.delete(text)
        return count + 1

    def read(self, key: str, offset: int, count: int) -> list[LogEntry]:
        log = self._log(key) or []
        first = bisect.bisect_right(log, (offset, 1, "\uffff")) - 1
        return log[max(first, 0) : max(first, 0) + count]

    def delete(self, key: str) -> None:
        if self.values.pop(key, None) is not None or self.logs.pop(key, None) is not None:
            self.ledger.timeline(key).gone(self.now())

    # Subscriptions

    def subscribe(self, connection: SimConnection, channels: Sequence[str]) -> None:
        for channel in channels:
            self.channels.setdefault(channel, {})[connection] = None

    def unsubscribe(self, connection: SimConnection, channels: Sequence[str]) -> None:
        for channel in channels:
            subscribers = self.channels.get(channel)
            if subscribers is not None and connection in subscribers:
                del subscribers[connection]
                if not subscribers:
                    del self.channels[channel]

    def drop_subscriber(self, connection: SimConnection) -> None:
        for channel in [c for c, subs in self.channels.items() if connection in subs]:
            self.unsubscribe(connection, (channel,))

    def subscriptions_of(self, connection: SimConnection) -> list[str]:
        return [c for c, subs in self.channels.items() if connection in subs]

    # Faults of the server

    def hold(self, pipe: _Pipe) -> None:
        self._held[pipe] = None

    def stall(self, duration: float) -> None:
        """Pause the server for `duration` seconds (SIGSTOP): nothing runs or is delivered."""
        end = self.now() + duration
        self.history.add("redis", "stall", duration)
        self.ledger.count("stall")
        self.ledger.outages.append(Outage(None, "stall", self.now(), end))
        if end <= self._stall_end:
            return
        self._stall_end = end
        self.stalled = True
        if self._stall_handle is not None:
            self._stall_handle.cancel()
        self._stall_handle = self.loop.call_at(end, self._resume)

    def _resume(self) -> None:
        self.stalled = False
        self._stall_handle = None
        self.history.add("redis", "resumed")
        held, self._held = self._held, {}
        for pipe in held:
            pipe.resume()

    def evict(self, key: str) -> bool:
        if not self.exists(key):
            return False
        self.values.pop(key, None)
        self.logs.pop(key, None)
        self.ledger.timeline(key).gone(self.now())
        self.ledger.losses.append((self.now(), key, "evicted"))
        self.history.add("redis", "evicted", key)
        self.ledger.count("evict")
        return True

    def restart(self, downtime: float) -> None:
        """A restart without persistence: every key gone, every connection dropped, each back
        a little after the server is."""
        now = self.now()
        self.history.add("redis", "restart", downtime)
        self.ledger.count("restart")
        self.ledger.outages.append(Outage(None, "restart", now, now + downtime))
        # Connections first: what was in flight may have run just before the crash, and is
        # lost with everything else.
        for connection in self.connections:
            gap = downtime + self.rng.uniform(0.0, 0.2)
            connection.drop("cmd", gap, count=False)
            connection.drop("sub", gap, count=False)
        for key in self.live_keys():
            self.ledger.timeline(key).gone(now)
            self.ledger.losses.append((now, key, "restart"))
        self.values.clear()
        self.logs.clear()
        self.channels.clear()
        self.down = True
        self.loop.call_later(downtime, self._up)

    def _up(self) -> None:
        self.down = False
        self.history.add("redis", "up")

    def set_oom(self, duration: float) -> None:
        self.history.add("redis", "oom", duration)
        self.ledger.count("oom")
        self.oom = True
        self.loop.call_later(duration, self._not_oom)

    def _not_oom(self) -> None:
        self.oom = False
        self.history.add("redis", "oom-over")


class _Command:
    __slots__ = ("args", "done", "election", "fate", "future", "key", "name")

    def __init__(
        self, name: str, key: str, args: tuple[Any, ...], fate: str, future: asyncio.Future[Any]
    ) -> None:
        self.name = name
        self.key = key
        self.args = args
        self.fate = fate
        self.future = future
        self.election = False  # it made a stream's producer (INCR to 1, SET of a new stream)
        self.done = False  # executed by the server


class _Confirmation:
    """What `begin_subscribe` returns: its coroutine is made only if it is awaited (a
    subscription whose confirmation nobody waits for leaves no coroutine unawaited)."""

    __slots__ = ("_connection", "_future")

    def __init__(self, connection: SimConnection, future: asyncio.Future[Any]) -> None:
        self._connection = connection
        self._future = future

    def __await__(self) -> Generator[Any, None, None]:
        return self._connection.confirmed(self._future).__await__()


class SimConnection:
    """One process's `Connection`: a command connection and a subscriber connection."""

    sharded = False

    def __init__(
        self,
        server: SimRedis,
        proc: str,
        link: LinkProfile,
        rng: random.Random,
        on_message: MessageHandler,
        on_reconnect: ReconnectHandler | None,
    ) -> None:
        self.server = server
        self.proc = proc
        self.link = link
        self.rng = rng
        self._loop = server.loop
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self.cmd_out, self.cmd_in = _Pipe(server), _Pipe(server)
        self.sub_out, self.sub_in = _Pipe(server), _Pipe(server)
        self.cmd_state = UP
        self.sub_state = UP
        # Opening is not a break (see `Connection.up_since`): only a restoration sets it.
        self._up_since: float | None = -math.inf
        self.wanted: dict[str, None] = {}  # what the subscriber should be subscribed to
        self._in_flight: dict[_Command, None] = {}
        self._confirmations: dict[asyncio.Future[Any], None] = {}
        self._restore: dict[str, asyncio.TimerHandle] = {}  # by connection kind
        self._outage: dict[str, Outage] = {}
        self.slow_until = -math.inf
        self.slow_delay = 0.0
        # What the subscriber connection received, handed to the handlers by one task (as the
        # Redis backend's reading task does): handlers run in a task, in arrival order.
        self._received: deque[tuple[str, bytes] | None] = deque()  # None: reconnected
        self._wakeup: asyncio.Future[None] | None = None

    async def dispatch(self) -> None:
        """The subscriber's reading task: dispatch what arrives, in order."""
        received = self._received
        while True:
            while not received:
                self._wakeup = self._loop.create_future()
                await self._wakeup
            item = received.popleft()
            if item is None:
                self._history("reconnected")
                if self._on_reconnect is not None:
                    try:
                        self._on_reconnect()
                    except Exception:
                        logger.exception("reconnect handler failed")
                continue
            channel, message = item
            kind = message[:1].decode("ascii", "replace")
            self._history("deliver", channel, kind, len(message))
            try:
                self._on_message(channel, message)
            except Exception:
                logger.exception("message handler failed on channel %r", channel)

    def _receive(self, item: tuple[str, bytes] | None) -> None:
        self._received.append(item)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    # What the engine may ask of a connection, besides the protocol

    @property
    def connected(self) -> bool:
        return self.sub_state == UP

    @property
    def up_since(self) -> float | None:
        """Since when the subscriber has been up with every wanted subscription in place (the
        loop's clock); None while it is down or restoring."""
        return self._up_since if self.sub_state == UP else None

    # Latency and fates

    def _delay(self) -> float:
        link, rng = self.link, self.rng
        delay = link.latency + rng.random() * link.jitter
        if link.spike_p and rng.random() < link.spike_p:
            delay = rng.uniform(link.latency, link.spike)
        if self._loop.time() < self.slow_until:
            delay += self.slow_delay
        return delay

    def _fate(self) -> str:
        link, rng = self.link, self.rng
        if link.fail_p and rng.random() < link.fail_p:
            return "fail"
        if link.lost_p and rng.random() < link.lost_p:
            return "lost"
        return "ok"

    def _history(self, kind: str, *details: object) -> None:
        self.server.history.add(self.proc, kind, *details)

    def _fault(self, name: str, what: str) -> None:
        self.server.ledger.command_faults.append((self._loop.time(), self.proc, name, what))
        self.server.ledger.count(f"command-{what}")
        self._history("cmd-fault", name, what)

    # Commands

    async def _call(self, name: str, key: str, *args: Any) -> Any:
        loop = self._loop
        if self.cmd_state != UP:
            await asyncio.sleep(self._delay())  # a connection attempt, refused
            self._history("cmd-refused", name, key, self.cmd_state)
            raise BackendError(f"{name}: the connection is {self.cmd_state}")
        fate = self._fate()
        future: asyncio.Future[Any] = loop.create_future()
        if fate == "fail":
            self._fault(name, "fail")
            loop.call_later(self._delay(), _settle, future, _Failure(f"{name}: connection reset"))
            return _outcome(await future)
        command = _Command(name, key, args, fate, future)
        self._in_flight[command] = None
        self.cmd_out.send(self._delay(), self._arrive, command)
        timeout = loop.call_later(self.link.command_timeout, self._timed_out, command)
        try:
            return _outcome(await future)
        finally:
            timeout.cancel()

    def _timed_out(self, command: _Command) -> None:
        if not command.future.done():
            self._fault(command.name, "timeout")
            command.future.set_result(_Failure(f"{command.name}: no reply in time"))

    def _arrive(self, command: _Command) -> None:
        server = self.server
        name = command.name
        if server.oom and name in _WRITES:
            result: object = _Failure("OOM command not allowed when used memory > 'maxmemory'")
            self._fault(name, "oom")
        else:
            result = getattr(server, name)(*command.args)
            command.election = (
                (name == "incr" and result == 1)
                or (name == "swap" and command.args[1] == "1")
                or (name == "restart_stream" and result is not None)
                or (name == "create" and command.args[1] == "1" and result is True)
            )
        command.done = True
        self._history("cmd", name, command.key, _brief(result))
        if command.future.done():
            self._unanswered(command)  # the caller gave up (a deadline) before it ran
        self.cmd_in.send(self._delay(), self._reply, command, result)

    def _reply(self, command: _Command, result: object) -> None:
        self._in_flight.pop(command, None)
        if command.future.done():
            return
        if command.fate == "lost":
            self._fault(command.name, "lost")
            self._unanswered(command)
            command.future.set_result(_Failure(f"{command.name}: connection lost (reply lost)"))
        else:
            command.future.set_result(result)

    def _unanswered(self, command: _Command) -> None:
        """A command took effect, but its caller never learns it did."""
        if command.election:
            command.election = False
            self.server.ledger.ghosts.append((self._loop.time(), command.key))
            self._history("ghost-election", command.key)

    async def incr(self, key: str, ttl: int) -> int | None:
        result: int | None = await self._call("incr", key, key, ttl)
        return result

    async def get(self, key: str) -> str | None:
        result: str | None = await self._call("get", key, key)
        return result

    async def set(self, key: str, value: str, ttl: int) -> None:
        await self._call("set", key, key, value, ttl)

    async def swap(self, key: str, value: str, ttl: int) -> str | None:
        result: str | None = await self._call("swap", key, key, value, ttl)
        return result

    async def replace(self, key: str, expected: str, value: str, ttl: int) -> bool:
        result: bool = await self._call("replace", key, key, expected, value, ttl)
        return result

    async def create(self, key: str, value: str, ttl: int) -> bool:
        result: bool = await self._call("create", key, key, value, ttl)
        return result

    async def publish(self, channel: str, message: bytes) -> int:
        result: int = await self._call("publish", channel, channel, message)
        return result

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
        args = (key, list(entries), field, ttl, channel, sentinel, state)
        result: LogId | None = await self._call("append", key, *args)
        return result

    async def read(self, key: str, offset: int, count: int) -> list[LogEntry]:
        result: list[LogEntry] = await self._call("read", key, key, offset, count)
        return result

    async def delete(self, key: str) -> None:
        await self._call("delete", key, key)

    def notify(self, channel: str, message: bytes) -> None:
        """A publish nobody waits for: sent if the command connection is up, its reply
        dropped; it may fail or be lost on the way like any command."""
        if self.cmd_state != UP:
            return
        fate = self._fate()
        if fate == "fail":
            self._fault("publish", "fail")
            return
        command = _Command("publish", channel, (channel, message), fate, self._loop.create_future())
        command.future.set_result(None)  # nobody waits for its reply
        self._in_flight[command] = None
        self.cmd_out.send(self._delay(), self._arrive, command)

    async def numsub(self, channel: str) -> int:
        result: int = await self._call("numsub", channel, channel)
        return result

    async def restart(
        self, sentinel: str, restarts: str, text: str, expected: str, ttl: int
    ) -> int | None:
        args = (sentinel, restarts, text, expected, ttl)
        result: int | None = await self._call("restart_stream", sentinel, *args)
        return result

    async def ttl(self, key: str) -> float | None:
        """Seconds until `key` expires; None if it does not exist (every key here expires)."""
        result: float | None = await self._call("ttl_of", key, key)
        return result

    # Subscriptions

    def _subscribe_now(self, channels: tuple[str, ...]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        self._confirmations[future] = None
        self.sub_out.send(self._delay(), self._subscribed, channels, future)
        return future

    def _subscribed(self, channels: tuple[str, ...], future: asyncio.Future[Any]) -> None:
        self.server.subscribe(self, channels)
        self._history("subscribed", *channels)
        self.sub_in.send(self._delay(), self._confirm, future)

    def _confirm(self, future: asyncio.Future[Any]) -> None:
        self._confirmations.pop(future, None)
        _settle(future, None)

    async def confirmed(self, future: asyncio.Future[Any]) -> None:
        timeout = self._loop.call_later(self.link.command_timeout, self._unconfirmed, future)
        try:
            _outcome(await future)
        finally:
            timeout.cancel()

    def _unconfirmed(self, future: asyncio.Future[Any]) -> None:
        if not future.done():
            self._fault("subscribe", "timeout")
            future.set_result(_Failure("SUBSCRIBE: no reply in time"))

    async def subscribe(self, *channels: str, wait: bool = True) -> None:
        for channel in channels:
            self.wanted[channel] = None
        if self.sub_state not in (UP, RESTORING):
            if wait:
                await asyncio.sleep(self._delay())
                self._history("sub-refused", *channels)
                raise BackendError(f"SUBSCRIBE: the subscriber connection is {self.sub_state}")
            return  # subscribed when the connection is restored
        future = self._subscribe_now(channels)
        if wait:
            await self.confirmed(future)

    async def begin_subscribe(self, *channels: str) -> Awaitable[None]:
        for channel in channels:
            self.wanted[channel] = None
        if self.sub_state not in (UP, RESTORING):
            await asyncio.sleep(self._delay())
            # Still wanted, as the Redis backend keeps it: restored with the connection.
            self._history("sub-refused", *channels)
            raise BackendError(f"SUBSCRIBE: the subscriber connection is {self.sub_state}")
        return _Confirmation(self, self._subscribe_now(channels))

    async def unsubscribe(self, *channels: str) -> None:
        for channel in channels:
            self.wanted.pop(channel, None)
        if self.sub_state in (UP, RESTORING):
            self.sub_out.send(self._delay(), self._unsubscribed, channels)
        await asyncio.sleep(0)  # returns once sent, not confirmed (as the Redis backend)

    def _unsubscribed(self, channels: tuple[str, ...]) -> None:
        self.server.unsubscribe(self, channels)
        self._history("unsubscribed", *channels)

    def deliver_later(self, channel: str, message: bytes) -> None:
        self.sub_in.send(self._delay(), self._receive, (channel, message))

    # Faults of this connection

    def drop(self, kind: str, gap: float, *, count: bool = True) -> None:
        """Drop the command ("cmd") or subscriber ("sub") connection; restore it after `gap`."""
        if self.cmd_state in (DEAD, CLOSED):
            return
        now = self._loop.time()
        if count:
            self.server.ledger.count(f"{kind}-drop")
        self._history("drop", kind, gap)
        if kind not in self._outage:
            outage = Outage(self.proc, kind, now)
            self._outage[kind] = outage
            self.server.ledger.outages.append(outage)
        if kind == "cmd":
            self.cmd_state = DOWN
            self._cut_commands()
        else:
            self.sub_state = DOWN
            self._cut_subscriber()
        previous = self._restore.get(kind)
        if previous is not None:
            if previous.when() >= now + gap:
                return
            previous.cancel()
        self._restore[kind] = self._loop.call_later(gap, self._restored, kind)

    def _cut_commands(self) -> None:
        """What was in flight: sent but not arrived (it may have reached the server, or not),
        or executed with its reply on the way (lost)."""
        for fn, args in self.cmd_out.clear():
            if self.rng.random() < 0.5:
                fn(*args)  # it reached the server before the connection broke
        self.cmd_in.clear()
        for command in self._in_flight:
            if not command.future.done():
                self._fault(command.name, "dropped")
                if command.done:
                    self._unanswered(command)
                command.future.set_result(_Failure(f"{command.name}: connection lost"))
        self._in_flight.clear()

    def _cut_subscriber(self) -> None:
        self._up_since = None
        self.server.drop_subscriber(self)
        self.sub_out.clear()
        self.sub_in.clear()  # messages in flight to it are lost
        confirmations, self._confirmations = self._confirmations, {}
        for future in confirmations:
            _settle(future, _Failure("the subscriber connection is down"))

    def _restored(self, kind: str) -> None:
        self._restore.pop(kind, None)
        if kind == "cmd":
            if self.cmd_state == DOWN:
                self.cmd_state = UP
                self._end_outage("cmd")
                self._history("restored", "cmd")
            return
        if self.sub_state != DOWN:
            return
        self.sub_state = RESTORING
        self._history("restoring", "sub", *self.wanted)
        future = self._subscribe_now(tuple(self.wanted))
        future.add_done_callback(self._resubscribed)

    def _resubscribed(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or isinstance(future.result(), _Failure):
            return  # dropped again meanwhile: that drop restores it
        if self.sub_state != RESTORING:
            return
        self.sub_state = UP
        self._up_since = self._loop.time()
        self._end_outage("sub")
        self._history("restored", "sub")
        self._receive(None)  # the reading task calls the reconnect handler

    def _end_outage(self, kind: str) -> None:
        outage = self._outage.pop(kind, None)
        if outage is not None:
            outage.end = self._loop.time()

    def slow(self, duration: float, delay: float) -> None:
        """Every item of this process's link takes `delay` seconds longer for `duration`."""
        self.server.ledger.count("slow-link")
        self._history("slow-link", duration, delay)
        self.slow_until = self._loop.time() + duration
        self.slow_delay = delay
        now = self._loop.time()
        self.server.ledger.slow_links.append((self.proc, now, now + duration, delay))

    def kill(self) -> None:
        """The process died: its connections are severed for good."""
        if self.cmd_state in (DEAD, CLOSED):
            return
        self._history("severed")
        self.cmd_state = self.sub_state = DEAD
        self._cut_commands()
        self._cut_subscriber()
        self._received.clear()  # received, not handled yet: it is dead
        for handle in self._restore.values():
            handle.cancel()
        self._restore.clear()

    def close(self) -> None:
        """The context closed its connection: its subscriptions end with it (as in Redis)."""
        if self.cmd_state == CLOSED:
            return
        self._history("closed", *self.server.subscriptions_of(self))
        dead = self.cmd_state == DEAD
        self.cmd_state = self.sub_state = CLOSED
        if not dead:
            self._cut_subscriber()
        for handle in self._restore.values():
            handle.cancel()
        self._restore.clear()
        for outage in self._outage.values():
            outage.end = self._loop.time()
        self._outage.clear()


def _brief(result: object) -> object:
    """A command's reply, short enough for the history."""
    if isinstance(result, _Failure):
        return f"ERR {result.message}"
    if isinstance(result, list):
        return f"[{len(result)} entries]"
    if isinstance(result, float):
        return round(result, 6)
    return result


class SimBackend:
    """One process's `Backend` on the simulated server."""

    def __init__(self, server: SimRedis, proc: str, link: LinkProfile, rng: random.Random) -> None:
        self.server = server
        self.proc = proc
        self.link = link
        self.rng = rng
        self.connection: SimConnection | None = None

    def connect(
        self, on_message: MessageHandler, on_reconnect: ReconnectHandler | None = None
    ) -> AbstractAsyncContextManager[Connection]:
        return self._connect(on_message, on_reconnect)

    @asynccontextmanager
    async def _connect(
        self, on_message: MessageHandler, on_reconnect: ReconnectHandler | None
    ) -> AsyncIterator[Connection]:
        if self.server.down:
            raise BackendError("connection refused (Redis is restarting)")
        connection = SimConnection(
            self.server, self.proc, self.link, self.rng, on_message, on_reconnect
        )
        self.connection = connection
        self.server.connections.append(connection)
        try:
            # As the Redis backend does: its task group would wrap in a group what the
            # caller's block raises.
            async with single_exception_out(), anyio.create_task_group() as tg:
                tg.start_soon(connection.dispatch)
                try:
                    yield connection
                finally:
                    tg.cancel_scope.cancel()
        finally:
            connection.close()
            self.server.connections.remove(connection)
