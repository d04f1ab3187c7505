"""What one context's producers and followers share, and all they see of their context.

A producer or a follower gets the hub, never the context: the settings, the key names, the
backend connection, a task group for helper tasks, and the routes by which the messages the
backend delivers reach them. Dependencies point one way: the context builds producers and
followers, and they know the hub only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
from anyio.abc import TaskGroup

from . import _protocol as p
from ._backend import READY, Connection
from ._exceptions import BackendError, ResumableStreamError
from ._options import Settings
from ._telemetry import NOOP, Telemetry

__all__ = ["Hub", "MessageSink", "RequestHandler"]

logger = logging.getLogger("resumable_stream")

_UNSUBSCRIBE_TIMEOUT = 2.0


class RequestHandler(Protocol):
    """A producer, as far as message routing goes."""

    @property
    def stream_id(self) -> str: ...

    def on_request(self, request: p.Request) -> None: ...

    def on_follow(self) -> None: ...

    def stop(self) -> None: ...

    def resync(self) -> None: ...

    def superseded(self) -> None: ...


class MessageSink(Protocol):
    """A follower, as far as message routing goes."""

    @property
    def stream_id(self) -> str: ...

    def deliver(self, message: p.Message) -> None: ...

    def fail(self, error: ResumableStreamError) -> None: ...

    def resync(self) -> None: ...


class Hub:
    def __init__(self, settings: Settings, keys: p.Keys, telemetry: Telemetry = NOOP) -> None:
        self.settings = settings
        self.keys = keys
        self.telemetry = telemetry
        self._context_id = uuid.uuid4().hex
        self._inbox = keys.inbox(self._context_id)  # replies on a backend that is not sharded
        self._connection: Connection | None = None
        self._tg: TaskGroup | None = None
        self._producers: dict[str, RequestHandler] = {}  # by request channel
        # By live channel; each channel's followers in a dict used as an ordered set: messages
        # reach them in the order they joined, the same on every run (a set of objects would
        # iterate in an order that depends on their addresses).
        self._live: dict[str, dict[MessageSink, None]] = {}
        self._listeners: dict[str, MessageSink] = {}  # by the listener id of a request
        # fast_acquire: an uncontended lock costs no loop turn (every resume takes it).
        self._live_lock = anyio.Lock(fast_acquire=True)

    async def open(self, connection: Connection, tg: TaskGroup, *, inbox: bool = True) -> None:
        """Start serving on `connection`; without `inbox` (a compat context, whose streams
        never use this protocol's names), nothing is subscribed."""
        self._connection, self._tg = connection, tg
        if inbox and not connection.sharded:
            # Replies to every follower of this context come to one channel, subscribed for
            # the context's life: a resume then subscribes to one channel, not two.
            await connection.subscribe(self._inbox)

    def closing(self) -> None:
        """The context is closing: no helper task is started from now on."""
        self._tg = None

    def close(self) -> None:
        self._connection = self._tg = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise RuntimeError("the context is not open: use `async with ctx:` first")
        return self._connection

    def spawn(self, stream_id: str, task: Callable[..., Awaitable[None]], *args: object) -> bool:
        """Run a helper task of `stream_id`; False if the context is closing.

        Helpers run in the context's task group (a task group per stream would cost more memory
        than the rest of an idle stream), so they must never raise into it: a failure is
        logged, and every other stream carries on.
        """
        if self._tg is None:
            return False
        self._tg.start_soon(_contained, stream_id, task, *args)
        return True

    # Producers

    def add_producer(self, producer: RequestHandler) -> None:
        channel = self.keys.request(producer.stream_id)
        earlier = self._producers.get(channel)
        if earlier is not None and earlier is not producer:
            # A new attempt of a stream whose earlier producer lingers here: the request
            # channel (one subscription) is the new one's now.
            earlier.superseded()
        self._producers[channel] = producer

    def remove_producer(self, producer: RequestHandler) -> None:
        channel = self.keys.request(producer.stream_id)
        if self._producers.get(channel) is producer:
            del self._producers[channel]

    def producer(self, stream_id: str) -> RequestHandler | None:
        """The producer of `stream_id` in this context, running or lingering, if any."""
        return self._producers.get(self.keys.request(stream_id))

    # Followers

    def reply_channel(self, stream_id: str) -> str:
        """Where producers answer this context's followers of `stream_id`: the context's inbox,
        or on a sharded backend a channel in the stream's slot (one channel per context would
        put every stream's replies on one shard)."""
        if self.connection.sharded:
            return self.keys.reply(stream_id, self._context_id)
        return self._inbox

    def _stream_channels(self, stream_id: str) -> tuple[str, ...]:
        """What the followers of `stream_id` in this context subscribe to."""
        live = self.keys.live(stream_id)
        if self.connection.sharded:
            return live, self.reply_channel(stream_id)
        return (live,)

    async def follow(self, follower: MessageSink) -> Awaitable[None]:
        """Route the stream's live messages and replies to `follower`, subscribing (in one
        command) for the first follower of the stream. Returns once the subscription is on its
        way: what it returns waits for its confirmation (raising `BackendError` if it failed).

        A follower sends its request meanwhile. The answer comes to the inbox, subscribed
        already; a live batch published before the subscription took effect (the producer
        starts publishing when it gets the request, so hardly ever) is a gap in the offsets,
        which the follower recovers as any other.
        """
        stream_id = follower.stream_id
        channel = self.keys.live(stream_id)
        async with self._live_lock:
            followers = self._live.get(channel)
            confirmation = READY
            if followers is None:
                channels = self._stream_channels(stream_id)
                try:
                    confirmation = await self.connection.begin_subscribe(*channels)
                except BaseException:
                    # A subscription that failed stays wanted by the backend (it subscribes
                    # it again once connected): nobody here wants it.
                    # If this fails too, it was not subscribed, and is no longer wanted.
                    with (
                        anyio.CancelScope(shield=True),
                        anyio.move_on_after(_UNSUBSCRIBE_TIMEOUT),
                        contextlib.suppress(BackendError),
                    ):
                        await self.connection.unsubscribe(*channels)
                    raise
                followers = self._live[channel] = {}
            followers[follower] = None
        return confirmation

    async def unfollow(self, follower: MessageSink) -> None:
        """Stop routing to `follower`; unsubscribe with the last one. Shielded and bounded."""
        stream_id = follower.stream_id
        channel = self.keys.live(stream_id)
        with anyio.CancelScope(shield=True), anyio.move_on_after(_UNSUBSCRIBE_TIMEOUT):
            async with self._live_lock:
                followers = self._live.get(channel)
                if followers is None or follower not in followers:
                    return
                del followers[follower]
                if followers:
                    return
                del self._live[channel]
                if self._connection is not None:
                    try:
                        await self._connection.unsubscribe(*self._stream_channels(stream_id))
                    except BackendError as exc:
                        logger.warning(
                            "could not unsubscribe %r: %s",
                            channel,
                            exc,
                            extra={"stream_id": stream_id},
                        )

    def listen(self, listener: str, follower: MessageSink) -> None:
        """Route the answers to the request `listener` to `follower`."""
        self._listeners[listener] = follower

    def forget(self, listener: str | None) -> None:
        if listener is not None:
            self._listeners.pop(listener, None)

    def followers(self) -> list[MessageSink]:
        return list({id(f): f for fs in self._live.values() for f in fs}.values())

    def follower_count(self) -> int:
        return sum(map(len, self._live.values()))

    def resync(self) -> None:
        """The backend's reconnect handler. Messages may have been lost, so every follower
        asks again from its position; writes just before may have been lost too (a failover),
        so every producer writes its stream's state again."""
        for producer in list(self._producers.values()):
            producer.resync()
        for follower in self.followers():
            follower.resync()

    # The backend, for both

    async def state(self, stream_id: str) -> str | None:
        """The stream's state in the backend: a terminal state, `RUNNING`, or None if absent."""
        return p.stream_state(await self.sentinel(stream_id))

    async def sentinel(self, stream_id: str) -> str | None:
        """The stream's sentinel as it is (see `state`), to compare-and-set it later."""
        return await self.connection.get(self.keys.sentinel(stream_id))

    def may_declare_lost(self, nobody_since: float, span: float) -> bool:
        """Whether requests that have reached nobody since `nobody_since` show, by now, that
        the stream's producer is gone (not merely subscribing again): `span` seconds of it.

        A producer's subscriber drops with Redis (a restart, a failover, a killed connection)
        and takes a while to come back, with backoff. So "nobody subscribed" counts only once
        this context's own subscriber has been up for `liveness_timeout` (an outage it saw, the
        producer's likely saw too), and only for `span` of such silence: never on a timer alone.
        """
        up_since = self.connection.up_since
        if up_since is None:
            return False  # this side is down or restoring: it proves nothing
        settled = up_since + self.settings.liveness_timeout
        now = anyio.current_time()
        return now >= settled and now - max(nobody_since, settled) >= span

    @property
    def lost_after(self) -> float:
        """How long requests must reach nobody (a settled connection on this side) before the
        producer counts as gone: a resume's time, and at least the liveness timeout, so that a
        producer's connection that drops and comes back within it is not a death."""
        settings = self.settings
        return max(settings.resume_timeout, settings.liveness_timeout)

    @property
    def lost_bound(self) -> float:
        """How long requests may reach nobody before a reader gives up even without proof that
        the producer is gone (`may_declare_lost`): then it is only unavailable."""
        settings = self.settings
        return settings.resume_timeout + settings.liveness_timeout + settings.heartbeat

    async def attempt(self, stream_id: str) -> int:
        """Which attempt of `stream_id` the backend knows (1 if it was never restarted)."""
        restarts = await self.connection.get(self.keys.restarts(stream_id))
        try:
            return 1 + max(0, int(restarts or 0))
        except ValueError:
            return 1

    async def lingering(self, stream_id: str) -> bool:
        """Whether the producer of `stream_id`, which ended well, should still keep its text
        for late readers (`linger`), by how long ago its end was written (the sentinel's TTL
        was set then)."""
        left = await self.connection.ttl(self.keys.sentinel(stream_id))
        if left is None or math.isinf(left):
            return False
        # The end is written just before the linger begins (with the same `ttl` and `linger`
        # on every context of a key prefix, as they should be).
        return self.settings.ttl - left < self.settings.linger

    async def record_lost(self, stream_id: str, running: str) -> bool:
        """Record that the producer of `stream_id` died, if its sentinel still holds `running`
        (the value read when it was found silent): never over an end written meanwhile. The
        id stays taken for `lost_ttl` seconds, so late readers learn what happened. False if
        the sentinel changed."""
        lost = p.sentinel_value(p.LOST)
        key = self.keys.sentinel(stream_id)
        return await self.connection.replace(key, running, lost, self.settings.lost_ttl)

    def dispatch(self, channel: str, data: bytes) -> None:
        """The backend's message handler: hand each message to whoever it is for."""
        try:
            message = p.parse(data)
        except ValueError:
            logger.warning("ignored a malformed message on %r", channel)
            return
        if type(message) is p.Request:
            producer = self._producers.get(channel)
            if producer is not None:
                producer.on_request(message)
        elif type(message) is p.Cancel:
            producer = self._producers.get(channel)
            if producer is not None:
                producer.stop()
        elif type(message) is p.Follow:
            producer = self._producers.get(channel)
            if producer is not None:
                producer.on_follow()
        elif type(message) is p.Replay or (type(message) is p.End and message.listener):
            follower = self._listeners.get(message.listener)  # type: ignore[arg-type]
            if follower is not None:
                follower.deliver(message)
        else:
            for follower in tuple(self._live.get(channel, ())):
                follower.deliver(message)


async def _contained(stream_id: str, task: Callable[..., Awaitable[None]], *args: object) -> None:
    try:
        with anyio.CancelScope() as scope:
            if anyio.current_effective_deadline() == -math.inf:
                # Started (from shielded cleanup) in a task group under a scope cancelled
                # earlier (the context's block was cancelled: a shutdown): on asyncio, anyio
                # delivers that cancellation only to the tasks there were then, and this one's
                # first checkpoint would spin on it for ever. Cancelled here, it ends at once.
                scope.cancel()
            await task(*args)
    except Exception:
        logger.exception(
            "a helper task of stream %r failed", stream_id, extra={"stream_id": stream_id}
        )
