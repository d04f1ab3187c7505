"""What one compat context's producers and followers share, and all they see of their context.

The native hub's settings, backend connection, helper tasks and telemetry, plus the
reference's names and the routes by which messages on those names reach their producer or
follower. Dependencies point one way, as in native mode: `_vercel` (the context's side) builds
producers and followers, and they know this hub only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from ._backend import Connection
from ._exceptions import ResumableStreamError
from ._hub import Hub
from ._options import Settings
from ._telemetry import Telemetry
from ._vercel_wire import Request, VercelNames, parse_request

__all__ = ["ChunkSink", "RequestHandler", "VercelHub"]

logger = logging.getLogger("resumable_stream")


class RequestHandler(Protocol):
    """A producer, as far as message routing goes."""

    @property
    def stream_id(self) -> str: ...

    def on_request(self, request: Request, late: bool) -> None: ...

    def stop(self) -> None: ...

    def resync(self) -> None: ...


class ChunkSink(Protocol):
    """A follower, as far as message routing goes."""

    @property
    def stream_id(self) -> str: ...

    def deliver(self, listener: str, data: bytes) -> None: ...

    def fail(self, error: ResumableStreamError) -> None: ...

    def resync(self) -> None: ...


class VercelHub:
    def __init__(self, hub: Hub, names: VercelNames) -> None:
        self._hub = hub
        self.names = names
        self.settings: Settings = hub.settings
        self.telemetry: Telemetry = hub.telemetry
        self._producers: dict[str, RequestHandler] = {}  # by stream id
        self._listeners: dict[str, ChunkSink] = {}  # by listener id (a chunk channel's)
        self._followers: dict[int, ChunkSink] = {}  # every follower, by id()

    @property
    def connection(self) -> Connection:
        return self._hub.connection

    def spawn(self, stream_id: str, task: Callable[..., Awaitable[None]], *args: object) -> bool:
        """Run a helper task of `stream_id` (see `Hub.spawn`); False if the context is closing."""
        return self._hub.spawn(stream_id, task, *args)

    def may_declare_lost(self, nobody_since: float, span: float) -> bool:
        """Whether nobody listening since `nobody_since` shows, by now, that a producer is gone
        (see `Hub.may_declare_lost`: only once this side's connection has been up a while)."""
        return self._hub.may_declare_lost(nobody_since, span)

    @property
    def lost_bound(self) -> float:
        """How long requests may reach nobody before a reader gives up without proof that
        the producer is gone: then it is only unavailable (see `Hub.lost_bound`)."""
        return self._hub.lost_bound

    # Producers

    def add_producer(self, producer: RequestHandler) -> None:
        self._producers[producer.stream_id] = producer

    def remove_producer(self, producer: RequestHandler) -> None:
        """Stop routing to `producer` (unless another producer of its id replaced it)."""
        if self._producers.get(producer.stream_id) is producer:
            del self._producers[producer.stream_id]

    def owns(self, producer: RequestHandler) -> bool:
        return self._producers.get(producer.stream_id) is producer

    # Followers

    def add_follower(self, follower: ChunkSink) -> None:
        self._followers[id(follower)] = follower

    def remove_follower(self, follower: ChunkSink) -> None:
        self._followers.pop(id(follower), None)

    def listen(self, listener: str, follower: ChunkSink) -> None:
        self._listeners[listener] = follower

    def forget(self, listener: str | None) -> None:
        if listener is not None:
            self._listeners.pop(listener, None)

    def followers(self) -> list[ChunkSink]:
        return list(self._followers.values())

    def follower_count(self) -> int:
        return len(self._followers)

    def resync(self) -> None:
        """The backend reconnected: messages may have been lost, writes too (a failover)."""
        for producer in list(self._producers.values()):
            producer.resync()
        for follower in self.followers():
            follower.resync()

    def dispatch(self, channel: str, data: bytes) -> None:
        """The backend's message handler: route by channel. Text on a chunk channel is never
        parsed: it is whatever the producer's source yielded."""
        names = self.names
        if channel.startswith(names.chunk_prefix):
            listener = channel[len(names.chunk_prefix) :]
            follower = self._listeners.get(listener)
            if follower is not None:
                follower.deliver(listener, data)
            return
        if channel.startswith(names.request_prefix):
            stream_id, late = channel[len(names.request_prefix) :], False
        elif channel.startswith(names.tail_prefix):
            stream_id, late = channel[len(names.tail_prefix) :], True
        elif channel.startswith(names.cancel_prefix):
            producer = self._producers.get(channel[len(names.cancel_prefix) :])
            if producer is not None:
                producer.stop()
            return
        else:
            return
        producer = self._producers.get(stream_id)
        if producer is None:
            return
        request = parse_request(data)
        if request is None:
            # A Node producer would crash on it (an unhandled rejection): logged and dropped.
            logger.warning(
                "ignored a malformed resume request on %r", channel, extra={"stream_id": stream_id}
            )
            return
        producer.on_request(request, late)
