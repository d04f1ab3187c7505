"""The subscriber of one context on a Redis Cluster: sharded pub/sub, one link per master.

A stream's channels share its hash slot, so they are `SSUBSCRIBE`d together on the master that
owns the slot: at most one connection per master, each read by a task of its own (no polling of
the nodes in turn). Nothing of redis-py's cluster pub/sub is used: it loses sharded
subscriptions for good at a planned failover.

A failover or a slot migration moves a slot; the server then sends `sunsubscribe` to the
subscribers of its channels, and a killed master drops its connections. In each case, and when
the slot map cached by the cluster client no longer names the node a channel is subscribed on
(checked every second, without a command), the channel is subscribed again on the slot's
master, with backoff, after the slot map was refreshed. A replica accepts `SSUBSCRIBE` (and
`SPUBLISH`) silently, and right after a failover the slot map may still name the demoted
master: a node's `ROLE` is checked before anything is subscribed on it. Whatever was published
while a channel was not subscribed is lost, so the context then hears `on_reconnect`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from typing import Any

import anyio
import redis.exceptions
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection as RedisConnection
from redis.crc import key_slot

from .._backend import MessageHandler, ReconnectHandler
from .._buffer import Signal
from .._exceptions import BackendError
from ._errors import deadline, delay_after, text
from ._tasks import Tasks

logger = logging.getLogger("resumable_stream")

_CHECK_EVERY = 1.0  # seconds between checks of the slot map, and pings of idle links


class _NotMaster(Exception):
    pass


class _Link:
    """One subscriber connection to one master, and the channels subscribed on it."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.name: str = node.name
        # No timeout on reads: a subscriber waits for messages as long as it lives (its
        # liveness is checked with pings instead). RESP2: pushes come as plain replies, and
        # redis-py 8's maintenance notifications (RESP3 only) are not for this connection.
        kwargs = {
            **{k: v for k, v in node.connection_kwargs.items() if "maint" not in k},
            "socket_timeout": None,
            "protocol": 2,
        }
        self.connection: RedisConnection = node.connection_class(**kwargs)
        self.channels: set[str] = set()
        self.confirmations: dict[tuple[bytes, str], deque[anyio.Event]] = {}
        self.unsubscribing: dict[str, int] = {}  # unsubscribes asked for, not yet confirmed
        self.write_lock = anyio.Lock(fast_acquire=True)  # no loop turn when uncontended
        self.pongs = 0
        self.broken = False
        self.scope = anyio.CancelScope()

    async def open(self) -> None:
        await self.connection.connect()  # type: ignore[no-untyped-call]
        await self.connection.send_command("ROLE")
        role = await self.connection.read_response()
        if text(role[0]) != "master":
            raise _NotMaster(f"{self.name} is a {text(role[0])}, not a master")

    async def send(self, *args: str) -> None:
        async with self.write_lock:
            await self.connection.send_command(*args)

    def expect(self, kind: bytes, channels: tuple[str, ...]) -> list[anyio.Event]:
        events = []
        for channel in channels:
            event = anyio.Event()
            self.confirmations.setdefault((kind, channel), deque()).append(event)
            events.append(event)
        return events

    def confirm(self, kind: bytes, channel: str) -> None:
        waiters = self.confirmations.get((kind, channel))
        if waiters:
            waiters.popleft().set()
            if not waiters:
                del self.confirmations[(kind, channel)]

    def release_all(self) -> None:
        for waiters in self.confirmations.values():
            for event in waiters:
                event.set()
        self.confirmations.clear()

    async def close(self) -> None:
        self.scope.cancel()
        self.release_all()
        with contextlib.suppress(Exception):
            await self.connection.disconnect()


class ShardedSubscriber:
    def __init__(
        self,
        client: RedisCluster,
        on_message: MessageHandler,
        on_reconnect: ReconnectHandler | None,
        timeout: float,
    ) -> None:
        self._client = client
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._timeout = timeout
        self._wanted: dict[str, int] = {}  # channel -> its slot: what should be subscribed
        self._links: dict[str, _Link] = {}  # by node name
        self._where: dict[str, _Link] = {}  # channel -> the link it is subscribed on
        self._lost: set[str] = set()  # wanted channels to subscribe again
        self._lost_signal = Signal()
        # Opening a link (connect, ROLE) takes round trips: one at a time per master, so that
        # concurrent subscribes share it. Everything else needs no lock: sends are serialized
        # per link, and the bookkeeping between awaits is synchronous.
        self._opening: dict[str, anyio.Lock] = {}
        self._tasks: Tasks | None = None
        self._closed = False
        self._up_since: float | None = None  # when every wanted channel was last in place

    async def connect(self) -> None:
        try:
            with deadline(self._timeout, "connect"):
                await self._client.initialize()
                await _close_seed_connections(self._client)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise BackendError(f"Redis Cluster error: {exc}") from exc
        self._up_since = -math.inf  # opening is not a break (see `Connection.up_since`)

    @property
    def connected(self) -> bool:
        """No subscription is waiting to be restored."""
        return not self._lost and not self._closed

    @property
    def up_since(self) -> float | None:
        return self._up_since if self.connected else None

    def poke(self) -> None:
        """Redis answers commands again (subscriptions are restored with their own backoff)."""

    def start(self, tasks: Tasks) -> None:
        self._tasks = tasks
        tasks.spawn(self._restore_lost)
        tasks.spawn(self._check)

    def closing(self) -> None:
        self._closed = True

    async def close(self) -> None:
        self._closed = True
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()

    # Subscribing

    async def subscribe(self, channels: tuple[str, ...], wait: bool) -> None:
        slot = key_slot(channels[0].encode())
        for channel in channels:
            self._wanted[channel] = slot
        if not wait:
            # Whoever does not wait gets it done in the background, as soon as it can be.
            try:
                with deadline(self._timeout, "SSUBSCRIBE"):
                    await self._subscribe_on_master(channels, slot)
            except BackendError:
                self._lose(channels)
            return
        subscribed = False
        try:
            with deadline(self._timeout, "SSUBSCRIBE"):
                failures = 0
                while True:
                    try:
                        events = await self._subscribe_on_master(channels, slot)
                        break
                    except BackendError as exc:
                        # A failover under way: the slot map names a demoted master, or the
                        # slot's master is gone. Ask again for the map, a little later.
                        logger.debug("SSUBSCRIBE on slot %s failed: %s", slot, exc)
                        await anyio.sleep(delay_after(failures))
                        failures += 1
                        await self._refresh()
                subscribed = True
                for event in events:
                    await event.wait()
        finally:
            if not subscribed:
                self._lose(channels)

    async def _refresh(self) -> None:
        try:
            await self._client.nodes_manager.initialize()
            await _close_seed_connections(self._client)
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.debug("could not refresh the Redis Cluster slot map: %s", exc)

    async def unsubscribe(self, channels: tuple[str, ...]) -> None:
        by_link: dict[str, list[str]] = {}
        for channel in channels:
            self._wanted.pop(channel, None)
            self._lost.discard(channel)
            link = self._where.pop(channel, None)
            if link is not None:
                link.channels.discard(channel)
                by_link.setdefault(link.name, []).append(channel)
                link.unsubscribing[channel] = link.unsubscribing.get(channel, 0) + 1
        if self._closed:
            return  # the subscriptions end with the connections
        with deadline(self._timeout, "SUNSUBSCRIBE"):
            for name, names in by_link.items():
                link = self._links.get(name)
                if link is not None and not link.broken:
                    with contextlib.suppress(redis.exceptions.RedisError, OSError):
                        await link.send("SUNSUBSCRIBE", *names)

    async def _subscribe_on_master(self, channels: tuple[str, ...], slot: int) -> list[anyio.Event]:
        """SSUBSCRIBE on the slot's master (checked by ROLE); the confirmations to wait for."""
        try:
            link = await self._link_for(slot)
            events = link.expect(b"ssubscribe", channels)
            try:
                await link.send("SSUBSCRIBE", *channels)
            except BaseException:
                for channel, event in zip(channels, events, strict=True):
                    waiters = link.confirmations.get((b"ssubscribe", channel))
                    if waiters and event in waiters:
                        waiters.remove(event)
                raise
        except _NotMaster as exc:
            raise BackendError(f"the slot map is out of date: {exc}") from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            raise BackendError(f"Redis Cluster subscriber error: {exc}") from exc
        for channel in channels:
            self._where[channel] = link
            link.channels.add(channel)
        return events

    async def _link_for(self, slot: int) -> _Link:
        node = self._client.nodes_manager.get_node_from_slot(slot)
        link = self._links.get(node.name)
        if link is not None and not link.broken:
            return link
        async with self._opening.setdefault(node.name, anyio.Lock()):
            link = self._links.get(node.name)
            if link is not None and not link.broken:
                return link  # another task opened it meanwhile
            link = _Link(node)
            try:
                await link.open()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await link.close()
                raise
            self._links[link.name] = link
            assert self._tasks is not None
            self._tasks.spawn(self._read, link)
            return link

    # Losing and restoring subscriptions

    def _lose(self, channels: tuple[str, ...] | list[str] | set[str]) -> None:
        for channel in channels:
            if channel in self._wanted:
                self._lost.add(channel)
                link = self._where.pop(channel, None)
                if link is not None:
                    link.channels.discard(channel)
        if self._lost:
            self._lost_signal.notify()

    async def _restore_lost(self) -> None:
        """Subscribe what was lost again on its slot's master, with backoff; then tell the
        context that messages may have been lost meanwhile."""
        failures = 0
        while True:
            while not self._lost:
                await self._lost_signal.wait()
            if failures:
                await anyio.sleep(delay_after(failures - 1))
            try:
                with deadline(self._timeout, "a resubscription"):
                    await self._refresh()
                    lost, self._lost = self._lost, set()
                    by_slot: dict[int, list[str]] = {}
                    for channel in lost:
                        slot = self._wanted.get(channel)
                        if slot is not None:
                            by_slot.setdefault(slot, []).append(channel)
                    try:
                        # All sent first, then all confirmations awaited: one round trip.
                        events = []
                        for slot, names in by_slot.items():
                            events += await self._subscribe_on_master(tuple(names), slot)
                        for event in events:
                            await event.wait()
                    except BaseException:
                        self._lost.update(c for cs in by_slot.values() for c in cs)
                        raise
            except (BackendError, redis.exceptions.RedisError, OSError) as exc:
                failures += 1
                logger.warning(
                    "Redis Cluster: could not subscribe again (%s); retrying in %ss",
                    exc,
                    delay_after(failures - 1),
                )
                continue
            if failures:
                logger.warning("Redis Cluster: subscriptions restored")
            failures = 0
            if not self._lost:
                self._up_since = anyio.current_time()
            if self._on_reconnect is not None:
                try:
                    self._on_reconnect()
                except Exception:
                    logger.exception("reconnect handler failed")

    async def _check(self) -> None:
        """Every second: channels whose slot moved in the cached slot map are subscribed again,
        and each link that has not answered the last ping is dropped."""
        nodes = self._client.nodes_manager
        while True:
            await anyio.sleep(_CHECK_EVERY)
            moved = [
                channel
                for channel, link in self._where.items()
                if _owner(nodes, self._wanted.get(channel, 0)) not in (None, link.name)
            ]
            if moved:
                self._lose(moved)
            for link in list(self._links.values()):
                if link.broken:
                    continue
                if link.pongs < 0:  # the last ping got no answer in a whole interval
                    self._drop(link, "no answer to a ping")
                    continue
                link.pongs = -1
                try:
                    await link.send("PING")
                except (redis.exceptions.RedisError, OSError) as exc:
                    self._drop(link, str(exc))

    def _drop(self, link: _Link, why: str) -> None:
        if link.broken:
            return
        link.broken = True
        logger.warning("Redis Cluster: subscriber connection to %s lost (%s)", link.name, why)
        if self._links.get(link.name) is link:
            del self._links[link.name]
        self._lose(set(link.channels))
        link.release_all()
        link.scope.cancel()
        assert self._tasks is not None
        self._tasks.spawn(_disconnect, link)

    async def _read(self, link: _Link) -> None:
        with link.scope:
            while True:
                try:
                    response = await link.connection.read_response()
                except (redis.exceptions.RedisError, OSError) as exc:
                    self._drop(link, str(exc))
                    return
                self._handle(link, response)

    def _handle(self, link: _Link, response: Any) -> None:
        if not isinstance(response, list) or not response:
            return
        kind = response[0]
        if isinstance(kind, str):
            kind = kind.encode()
        kind = kind.lower()
        if kind == b"smessage":
            data = response[2]
            if isinstance(data, str):
                data = data.encode("utf-8", "surrogatepass")
            try:
                self._on_message(text(response[1]) or "", data)
            except Exception:
                logger.exception("message handler failed")
        elif kind == b"ssubscribe":
            link.confirm(kind, text(response[1]) or "")
        elif kind == b"sunsubscribe":
            channel = text(response[1]) or ""
            asked = link.unsubscribing.get(channel, 0)
            if asked:
                if asked == 1:
                    del link.unsubscribing[channel]
                else:
                    link.unsubscribing[channel] = asked - 1
            elif self._where.get(channel) is link:
                # Not asked for: the slot moved (a failover, a migration). Subscribe again.
                logger.info("Redis Cluster: %s was unsubscribed by the server", channel)
                self._lose([channel])
        elif kind == b"pong":
            link.pongs = 1


async def _close_seed_connections(client: RedisCluster) -> None:
    """redis-py reads the slot map through a seed node object of its own, and keeps its
    connection open beside the one its node cache uses: one connection too many."""
    manager = client.nodes_manager
    for name, node in list(manager.startup_nodes.items()):
        if manager.nodes_cache.get(name) is not node:
            await node.disconnect()


def _owner(nodes: Any, slot: int) -> str | None:
    """The name of the master the cached slot map gives `slot`; None if it gives none."""
    try:
        return str(nodes.get_node_from_slot(slot).name)
    except (redis.exceptions.RedisError, LookupError):
        return None


async def _disconnect(link: _Link) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
        await link.close()
