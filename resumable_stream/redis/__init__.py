"""The Redis backend (redis-py's `redis.asyncio`, so asyncio only).

It runs on a Redis (or Valkey) server, on the master a Sentinel setup names, and on a Redis
Cluster. Each context gets one connection for commands, driven by a task that sends every
command queued meanwhile as one pipeline, and one subscriber connection read by its own task:
on a cluster, one of each per master (sharded pub/sub, a stream's traffic in its shard).

    RedisBackend("redis://host:6379/0")                      # a server (rediss:// for TLS)
    RedisBackend("redis+cluster://seed:7000,seed2:7001")     # a cluster (or ?cluster=true)
    RedisBackend("redis+sentinel://s1:26379,s2:26379/mymaster/0")
    RedisBackend(client)  # a redis.asyncio.Redis, RedisCluster, or Sentinel(...).master_for(...)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel

from .._backend import READY, Connection, MessageHandler, ReconnectHandler
from .._exceptions import single_exception_out
from ._commands import Commands
from ._pubsub import Subscriber
from ._sharded import ShardedSubscriber
from ._tasks import Tasks

__all__ = ["DEFAULT_COMMAND_TIMEOUT", "RedisBackend"]

logger = logging.getLogger("resumable_stream")

DEFAULT_COMMAND_TIMEOUT = 5.0
_CLOSE_TIMEOUT = 2.0


class RedisBackend:
    """A backend on Redis, given as a URL or a client (see the module's docs for the forms).

    A client passed in (fakeredis's included) is used as it is and left open; one made from a URL
    is closed with the last context using it. TLS (`rediss://`, `rediss+cluster://`...) and ACL
    credentials go in the URL.

    Every command gets `command_timeout` seconds, whatever the client's own socket timeouts
    (redis-py's default is none at all): a stalled Redis then fails commands with `BackendError`
    instead of blocking the callers, and the stalled connection is dropped.
    """

    def __init__(
        self,
        redis: str | Redis | RedisCluster,
        *,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        if isinstance(command_timeout, bool) or not command_timeout > 0:
            raise ValueError(f"command_timeout must be > 0 seconds, got {command_timeout!r}")
        if not isinstance(redis, (str, Redis, RedisCluster)):
            raise TypeError(
                "redis must be a URL, a redis.asyncio.Redis or a redis.asyncio.RedisCluster, "
                f"not {type(redis).__name__}"
            )
        self._command_timeout = command_timeout
        self._redis = redis
        if isinstance(redis, str):
            _clients_from_url(redis)  # a malformed URL fails now, not when a context opens

    def __repr__(self) -> str:
        shown = _hide_password(self._redis) if isinstance(self._redis, str) else self._redis
        return f"RedisBackend({shown!r})"

    def connect(
        self, on_message: MessageHandler, on_reconnect: ReconnectHandler | None = None
    ) -> AbstractAsyncContextManager[Connection]:
        return self._connect(on_message, on_reconnect)

    @asynccontextmanager
    async def _connect(
        self, on_message: MessageHandler, on_reconnect: ReconnectHandler | None
    ) -> AsyncIterator[Connection]:
        # Clients made from a URL are this context's to close (a Sentinel's included).
        owned: list[Redis | RedisCluster] = []
        if isinstance(self._redis, str):
            client, owned = _clients_from_url(self._redis)
        else:
            client = self._redis
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
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
                await connection.close()
            for made in owned:
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
                    await made.aclose()


class _RedisConnection:
    """The `Connection` of one context: its commands and its subscriber."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        on_message: MessageHandler,
        on_reconnect: ReconnectHandler | None,
        timeout: float,
    ) -> None:
        self.sharded = isinstance(client, RedisCluster)
        # Shielded from whatever cancels the block that runs the context: its cleanup still
        # goes through them (see `_tasks`).
        self._tasks = Tasks()
        self._subscriber: Subscriber | ShardedSubscriber
        if isinstance(client, RedisCluster):
            self._subscriber = ShardedSubscriber(client, on_message, on_reconnect, timeout)
        else:
            self._subscriber = Subscriber(client, on_message, on_reconnect, timeout)
        self._commands = Commands(
            client, timeout, sharded=self.sharded, recovered=self._subscriber.poke
        )
        # The commands, as the Connection protocol has them.
        self.incr = self._commands.incr
        self.get = self._commands.get
        self.ttl = self._commands.ttl
        self.set = self._commands.set
        self.swap = self._commands.swap
        self.replace = self._commands.replace
        self.create = self._commands.create
        self.publish = self._commands.publish
        self.notify = self._commands.notify
        self.numsub = self._commands.numsub
        self.restart = self._commands.restart
        self.append = self._commands.append
        self.read = self._commands.read
        self.delete = self._commands.delete

    @property
    def connected(self) -> bool:
        """The subscriber connection is up (what `ctx.stats()` reports)."""
        return self._subscriber.connected

    @property
    def up_since(self) -> float | None:
        return self._subscriber.up_since

    async def connect(self) -> None:
        await self._subscriber.connect()
        # Fail now, as BackendError, if the server refuses us (bad credentials, say): some
        # redis-py versions connect a subscriber without asking anything of the server.
        await self._commands.ping()

    def start(self, tg: TaskGroup) -> None:
        self._tasks.start(tg)
        self._tasks.spawn(self._commands.run)
        self._tasks.spawn(self._commands.check_eviction_policy)
        self._subscriber.start(self._tasks)

    def closing(self) -> None:
        self._commands.close()
        self._subscriber.closing()
        self._tasks.stop()

    async def close(self) -> None:
        self.closing()
        await self._subscriber.close()
        await self._commands.disconnect()

    async def subscribe(self, *channels: str, wait: bool = True) -> None:
        await self._subscriber.subscribe(channels, wait)

    async def begin_subscribe(self, *channels: str) -> Awaitable[None]:
        if isinstance(self._subscriber, Subscriber):
            return await self._subscriber.begin(channels)
        # On a cluster, the subscription is confirmed before anything else is sent.
        await self._subscriber.subscribe(channels, True)
        return READY

    async def unsubscribe(self, *channels: str) -> None:
        await self._subscriber.unsubscribe(channels)


# URLs

# What a client made from a URL leaves out, unless the URL sets it: a socket timeout. Every
# command is bounded already (`command_timeout`: the commands' watchdog, the subscriber's
# deadlines), and under one (redis-py 8 sets 5 s by default) redis-py makes each write an
# `asyncio.wait_for`: on Python 3.11 and older a task and two more loop turns per command,
# 0.1 ms more on a resume while the loop is busy.
_UNTIMED: dict[str, Any] = {"socket_timeout": None}


def _clients_from_url(url: str) -> tuple[Redis | RedisCluster, list[Redis | RedisCluster]]:
    """A client for `url`, and every client made for it (to close): `redis[s]://` (a server),
    `redis[s]+cluster://` or `?cluster=true` (a cluster: each host a seed),
    `redis[s]+sentinel://hosts/service[/db]` (a Sentinel setup's master). Raises ValueError
    for anything else."""
    if not isinstance(url, str):
        raise TypeError("a Redis URL must be a str")
    parts = urlsplit(url)
    scheme, _, topology = parts.scheme.lower().partition("+")
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL: {_hide_password(url)!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    cluster_flag = [value for name, value in query if name == "cluster"]
    query = [(name, value) for name, value in query if name != "cluster"]
    if cluster_flag and cluster_flag[-1].lower() in ("true", "1", "yes"):
        topology = topology or "cluster"
    if topology == "":
        client = Redis.from_url(urlunsplit(parts._replace(query=urlencode(query))), **_UNTIMED)
        return client, [client]
    if topology == "cluster":
        hosts = _hosts(parts.netloc)
        first = parts._replace(scheme=scheme, netloc=_netloc(parts.netloc, hosts[0]))
        first = first._replace(query=urlencode(query))
        seeds = [ClusterNode(host, port) for host, port in hosts[1:]]
        cluster = RedisCluster.from_url(urlunsplit(first), startup_nodes=seeds or None)
        return cluster, [cluster]
    if topology == "sentinel":
        hosts = _hosts(parts.netloc, default_port=26379)
        path = [piece for piece in parts.path.split("/") if piece]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(
                "a Sentinel URL names the service, and optionally the database: "
                "redis+sentinel://host:26379,host2:26379/mymaster/0"
            )
        options: dict[str, Any] = {"db": int(path[1]) if len(path) == 2 else 0}
        if parts.username:
            options["username"] = unquote(parts.username)
        if parts.password:
            options["password"] = unquote(parts.password)
        if scheme == "rediss":
            options["ssl"] = True
        options.update(_UNTIMED)
        sentinel = Sentinel(hosts, sentinel_kwargs={"ssl": scheme == "rediss"})  # type: ignore[no-untyped-call, unused-ignore]
        master: Redis = sentinel.master_for(path[0], **options)
        return master, [master, *sentinel.sentinels]
    raise ValueError(f"unknown Redis URL scheme {parts.scheme!r}")


def _hosts(netloc: str, default_port: int = 6379) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, ""
        if not host or (port and not port.isdigit()):
            raise ValueError(f"not a host:port in a Redis URL: {item!r}")
        hosts.append((host.strip("[]"), int(port) if port else default_port))
    return hosts


def _netloc(netloc: str, host: tuple[str, int]) -> str:
    credentials, at, _ = netloc.rpartition("@")
    return f"{credentials}{at}{host[0]}:{host[1]}"


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    credentials, _, hosts = parts.netloc.rpartition("@")
    user = credentials.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
