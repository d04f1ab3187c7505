"""How a campaign process reaches Redis: what the orchestrator hands it (a JSON-able `Link`),
and the `redis=` argument of a context made from it.

Every connection a process opens carries its name (`CLIENT SETNAME campaign-<process>`), so
that the campaign can find and kill that process's subscriber connection (`CLIENT KILL`). A
process behind a proxy reaches every node through it: a server's URL names the proxy; a
cluster client remaps the addresses the cluster gives out (`address_remap`, which redirects
follow too); a Sentinel client remaps the master's address the sentinels give out.
Processes that are not behind a proxy use the URL forms the README shows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel

__all__ = ["HOST", "Argument", "Link", "client_name", "close_clients", "redis_argument"]

HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Link:
    topology: str  # server | sentinel | cluster
    nodes: tuple[int, ...]  # the data nodes' ports (a cluster's seeds)
    remap: tuple[tuple[int, int], ...] = ()  # (node port, proxy port): behind a proxy
    sentinels: tuple[int, ...] = ()
    service: str = "mymaster"

    def port(self, port: int) -> int:
        return dict(self.remap).get(port, port)


def client_name(process: str) -> str:
    return f"campaign-{process}"


class _RemappedSentinel(Sentinel):
    """A Sentinel client whose master is reached through a proxy."""

    def __init__(self, remap: dict[int, int], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        self._remap = remap

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        host, port = await super().discover_master(service_name)
        return host, self._remap.get(int(port), int(port))


Argument = str | Redis | RedisCluster


def redis_argument(link: Link, process: str) -> tuple[Argument, list[Redis | RedisCluster]]:
    """The `redis=` of a context of `process`, and the clients made for it (the caller's to
    close once the context is closed: `close_clients`)."""
    name = client_name(process)
    if link.topology == "server":
        return f"redis://{HOST}:{link.port(link.nodes[0])}/0?client_name={name}", []
    if link.topology == "cluster":
        if not link.remap:
            seeds = ",".join(f"{HOST}:{port}" for port in link.nodes)
            return f"redis+cluster://{seeds}/0?client_name={name}", []
        remap = dict(link.remap)

        def address(host_port: tuple[str, int]) -> tuple[str, int]:
            host, port = host_port
            return host, remap.get(int(port), int(port))

        cluster = RedisCluster(
            startup_nodes=[ClusterNode(HOST, link.port(port)) for port in link.nodes],
            address_remap=address,
            client_name=name,
        )
        return cluster, [cluster]
    sentinel = _RemappedSentinel(
        dict(link.remap), [(HOST, port) for port in link.sentinels], socket_timeout=1.0
    )
    master: Redis = sentinel.master_for(link.service, client_name=name, socket_timeout=None)
    return master, [master, *sentinel.sentinels]


async def close_clients(clients: list[Redis | RedisCluster]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):  # closing what may be broken: nothing to do
            await client.aclose()
