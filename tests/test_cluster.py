"""On a real Redis Cluster (3 masters, 3 replicas) and a real Sentinel setup: streams spread over
every master, and failovers, a killed master and a slot migration end no stream.

The whole contract suite also runs on the cluster (the `cluster` flavor of conftest); the tests
here are about the topology. The harness calls block (they wait for the servers to settle), so
the tests run them in a worker thread while their streams go on.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis.asyncio
from redis.asyncio import RedisCluster
from redis.crc import key_slot

import resumable_stream as rs
from resumable_stream._protocol import Keys
from resumable_stream.redis import RedisBackend

from .cluster import ClusterNode, LocalCluster, LocalSentinel
from .helpers import TestingSource, poll_until, read

pytestmark = pytest.mark.anyio

# Quick to notice a dead producer, but longer than a planned failover takes here.
OPTIONS: dict[str, Any] = {"liveness_timeout": 3.0, "resume_timeout": 3.0, "drain_timeout": 2.0}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def cluster(clean_redis_cluster: LocalCluster) -> LocalCluster:
    """The session's cluster, in its original shape before and after each test here."""
    return clean_redis_cluster


def new_prefix() -> str:
    return f"cluster-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def contexts(
    cluster: LocalCluster, prefix: str, count: int = 2, **options: Any
) -> AsyncIterator[list[rs.ResumableStreamContext]]:
    """`count` contexts, as many workers, each with its own cluster client (every node a seed,
    so that any one of them may be down)."""
    url = "redis+cluster://" + ",".join(u.removeprefix("redis://") for u in cluster.seed_urls)
    made = [
        rs.ResumableStreamContext(
            backend=RedisBackend(url), key_prefix=prefix, **{**OPTIONS, **options}
        )
        for _ in range(count)
    ]
    async with made[0]:
        if count == 1:
            yield made
            return
        async with made[1]:
            if count == 2:
                yield made
                return
            async with made[2]:
                yield made


def stream_on(cluster: LocalCluster, master: ClusterNode, prefix: str, name: str = "s") -> str:
    """A stream id (`<name><n>`) whose keys live on `master` now."""
    keys = Keys(prefix)
    for i in range(10_000):
        stream_id = f"{name}{i}"
        if cluster.node_for_key(keys.sentinel(stream_id)).port == master.port:
            return stream_id
    raise AssertionError(f"no stream id found on {master}")


async def run_blocking(call: Callable[[], Any]) -> Any:
    return await anyio.to_thread.run_sync(call)


async def read_or_error(stream: rs.ResumableStream | None) -> tuple[str, Exception | None]:
    try:
        return await read(stream), None
    except rs.ResumableStreamError as exc:
        return "", exc


# Spread


async def test_streams_spread_over_every_master_in_sharded_channels(cluster: LocalCluster) -> None:
    before = {node.port: _newest_client(node) for node in cluster.nodes}
    prefix = new_prefix()
    async with contexts(cluster, prefix) as (P, C):
        sources = [TestingSource() for _ in range(200)]
        owns = [await P.resumable_stream(f"spread-{i}", s.make) for i, s in enumerate(sources)]
        for source in sources:
            source.write("x")
        followers = [await C.resume_existing_stream(f"spread-{i}") for i in range(200)]
        for follower in followers:
            assert await read(follower, 1) == "x"
        masters = cluster.masters()
        keys = {m.port: len(m.execute("KEYS", f"{prefix}:*")) for m in masters}
        channels = {
            m.port: len(m.execute("PUBSUB", "SHARDCHANNELS", f"{prefix}:*")) for m in masters
        }
        classic = [n.execute("PUBSUB", "CHANNELS", f"{prefix}:*") for n in cluster.live_nodes()]
        ours = {node.port: _clients_since(node, before[node.port]) for node in cluster.nodes}
        for source in sources:
            source.close()
        for own in owns:
            assert await read(own) == "x"
        for follower in followers:
            assert await read(follower) == ""
    assert sum(keys.values()) == 200
    # Every master holds keys and channels, none more than 60% (the slots split evenly).
    for counts in (keys, channels):
        assert all(n > 0 for n in counts.values()), counts
        assert max(counts.values()) <= 0.6 * sum(counts.values()), counts
    assert classic == [[]] * len(classic)  # no classic channel: no broadcast over the bus
    # At most one command and one subscriber connection per master per context.
    replicas = {node.port for node in cluster.replicas()}
    for port, (normal, pubsub) in ours.items():
        if port in replicas:
            assert (normal, pubsub) == (0, 0), port
        else:
            assert normal <= 2, (port, normal)
            assert pubsub <= 2, (port, pubsub)


def _client_list(node: ClusterNode) -> list[dict[str, str]]:
    # Typed `Awaitable[Any] | Any` before redis-py 8, although this client is synchronous.
    listing: Any = node.client.client_list()
    return list(listing)


def _newest_client(node: ClusterNode) -> int:
    return max(int(c["id"]) for c in _client_list(node))


def _clients_since(node: ClusterNode, newest: int) -> tuple[int, int]:
    """(command, subscriber) connections opened since `newest`, but for the harness's own."""
    clients = [
        c
        for c in _client_list(node)
        if int(c["id"]) > newest and c.get("cmd") not in ("client|list", "client")
    ]
    pubsub = [c for c in clients if int(c.get("sub", 0)) or int(c.get("ssub", 0))]
    return len(clients) - len(pubsub), len(pubsub)


# Failovers


async def test_a_planned_failover_ends_no_stream(cluster: LocalCluster) -> None:
    prefix = new_prefix()
    async with contexts(cluster, prefix, 3) as (P, C, D):
        master = cluster.masters()[0]
        stream_id = stream_on(cluster, master, prefix)
        source = TestingSource()
        own = await P.resumable_stream(stream_id, source.make)
        followers = [await C.resume_existing_stream(stream_id) for _ in range(2)]
        followers.append(await D.resume_existing_stream(stream_id))
        source.write("before; ")
        for reader in [own, *followers]:
            assert await read(reader, 1) == "before; "
        [replica] = cluster.replicas_of(master)
        with anyio.fail_after(30):
            await run_blocking(lambda: cluster.failover(replica))
        source.write("during; ")
        with anyio.fail_after(30):
            source.write("after")
            source.close()
            assert await read(own) == "during; after"
            for follower in followers:
                assert await read(follower) == "during; after"
        # New streams work after it, on the new master too.
        new_id = stream_on(cluster, replica, prefix, name="after-")
        again = TestingSource()
        own = await P.resumable_stream(new_id, again.make)
        follower = await C.resume_existing_stream(new_id)
        again.write("fresh")
        again.close()
        assert await read(own) == "fresh"
        assert await read(follower) == "fresh"


async def test_a_killed_master_ends_no_stream_or_says_why(cluster: LocalCluster) -> None:
    prefix = new_prefix()
    async with contexts(cluster, prefix) as (P, C):
        master = cluster.masters()[1]
        stream_id = stream_on(cluster, master, prefix)
        source = TestingSource()
        own = await P.resumable_stream(stream_id, source.make)
        followers = [await C.resume_existing_stream(stream_id) for _ in range(2)]
        source.write("before; ")
        for reader in [own, *followers]:
            assert await read(reader, 1) == "before; "
        killed_at = anyio.current_time()
        await run_blocking(lambda: cluster.kill(master))
        source.write("during; ")
        with anyio.fail_after(40):
            promoted = await run_blocking(cluster.wait_for_promotion)
        failover_time = anyio.current_time() - killed_at
        source.write("after")
        source.close()
        assert await read(own) == "during; after"  # the producer's own reader: its buffer
        bound = OPTIONS["liveness_timeout"] + failover_time + 10
        for follower in followers:
            with anyio.fail_after(bound):
                text, error = await read_or_error(follower)
            # Exact, or a typed error; never a hang, never other text.
            assert (text, error) == ("during; after", None) or isinstance(
                error, rs.ProducerUnavailableError | rs.StreamIncompleteError | rs.BackendError
            ), (text, error)
        assert promoted.role() == "master"


async def test_a_slot_migrated_mid_stream_ends_no_stream(cluster: LocalCluster) -> None:
    prefix = new_prefix()
    async with contexts(cluster, prefix) as (P, C):
        source_master, destination = cluster.masters()[:2]
        stream_id = stream_on(cluster, source_master, prefix)
        slot = cluster.keyslot(Keys(prefix).sentinel(stream_id))
        source = TestingSource()
        own = await P.resumable_stream(stream_id, source.make)
        followers = [await C.resume_existing_stream(stream_id) for _ in range(2)]
        source.write("0;")
        for reader in [own, *followers]:
            assert await read(reader, 1) == "0;"
        migration = cluster.migration(slot, destination)
        steps: list[Callable[[], object]] = [
            migration.importing,
            migration.migrating,
            migration.move_keys,
            migration.assign,
        ]
        for i, step in enumerate(steps, 1):
            with anyio.fail_after(30):
                await run_blocking(step)
            source.write(f"{i};")
        source.close()
        with anyio.fail_after(30):
            assert await read(own) == "1;2;3;4;"
            for follower in followers:
                assert await read(follower) == "1;2;3;4;"
        assert cluster.master_of_slot(slot).port == destination.port
        assert await C.has_existing_stream(stream_id) == "DONE"


# Sentinel


async def test_a_sentinel_failover_ends_no_stream(clean_redis_sentinel: LocalSentinel) -> None:
    redis_sentinel = clean_redis_sentinel
    hosts = ",".join(f"{host}:{port}" for host, port in redis_sentinel.sentinels)
    url = f"redis+sentinel://{hosts}/{redis_sentinel.service_name}/0"
    prefix = f"sentinel-{uuid.uuid4().hex[:8]}"
    old_master = redis_sentinel.master_port()
    async with (
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix, **OPTIONS) as P,
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix, **OPTIONS) as C,
    ):
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        followers = [await C.resume_existing_stream("s") for _ in range(2)]
        source.write("before; ")
        for reader in [own, *followers]:
            assert await read(reader, 1) == "before; "
        with anyio.fail_after(40):
            new_master = await run_blocking(redis_sentinel.failover)
        assert new_master != old_master
        source.write("during; ")
        source.write("after")
        source.close()
        with anyio.fail_after(30):
            assert await read(own) == "during; after"
            for follower in followers:
                assert await read(follower) == "during; after"
        # The end was written to the old master, which takes writes until Sentinel demotes it
        # (~10 s) and then drops them; when it does, it drops its clients too, the producer's
        # context reconnects to the new master and writes the end again there.
        client = redis.asyncio.Redis(port=new_master)
        try:
            await poll_until(lambda: client.get(Keys(prefix).sentinel("s")), b"DONE", 30)
        finally:
            await client.aclose()


async def test_sentinels_window_gives_a_typed_error_then_heals(
    clean_redis_sentinel: LocalSentinel,
) -> None:
    sentinel = clean_redis_sentinel
    hosts = ",".join(f"{host}:{port}" for host, port in sentinel.sentinels)
    url = f"redis+sentinel://{hosts}/{sentinel.service_name}/0"
    prefix = f"window-{uuid.uuid4().hex[:8]}"
    async with rs.ResumableStreamContext(
        backend=RedisBackend(url), key_prefix=prefix, **OPTIONS
    ) as P:
        source = TestingSource()
        own = await P.resumable_stream("w", source.make)
        source.write("before; ")
        assert await read(own, 1) == "before; "
        with anyio.fail_after(40):
            await run_blocking(sentinel.failover)
        # The old master may still take the producer's connections (for up to ~10 s); a
        # context that starts now is on the new master, where then nobody answers for the
        # stream: a typed error, never other text. (If Sentinel demoted the old master at
        # once, the producer is there already and answers.)
        async with rs.ResumableStreamContext(
            backend=RedisBackend(url), key_prefix=prefix, **OPTIONS
        ) as N:
            early: rs.ResumableStream | None = None
            with anyio.fail_after(OPTIONS["resume_timeout"] + 5):
                try:
                    early = await N.resume_existing_stream("w")
                except rs.ProducerUnavailableError:
                    early = None
            # Once Sentinel demotes the old master, the producer's context reconnects to the
            # new one and says it is alive: the same reader now gets the text.
            with anyio.fail_after(40):
                await run_blocking(sentinel.settle)
            # It was recorded as lost; the producer's context, reconnected, says it runs.
            await poll_until(lambda: N.has_existing_stream("w"), True, 20)
            follower = await N.resume_existing_stream("w")
            source.write("after")
            source.close()
            assert await read(own) == "after"
            assert await read(follower) == "before; after"
            if early is not None:
                assert await read(early) == "before; after"


async def test_a_cluster_client_can_be_passed_in(cluster: LocalCluster) -> None:
    client = RedisCluster.from_url(cluster.seed_url)
    try:
        async with rs.create_resumable_stream_context(client, key_prefix="passed") as ctx:
            source = TestingSource()
            own = await ctx.resumable_stream("s", source.make)
            source.write("through a RedisCluster client")
            source.close()
            assert await read(own) == "through a RedisCluster client"
            assert await ctx.has_existing_stream("s") == "DONE"
    finally:
        await client.aclose()


async def test_the_cluster_query_flag_makes_a_cluster_context(cluster: LocalCluster) -> None:
    """`redis://seed/0?cluster=true`: streams whose slots are on every master work (a plain
    client would get MOVED for two thirds of them), followed from a second context."""
    url = f"{cluster.seed_url}?cluster=true"
    prefix = f"flag-{uuid.uuid4().hex[:8]}"
    ids = [f"s{i}" for i in range(12)]
    masters = {
        cluster.master_of_slot(key_slot(Keys(prefix).sentinel(i).encode())).port for i in ids
    }
    assert len(masters) == 3  # the ids cover every master
    async with (
        rs.create_resumable_stream_context(url, key_prefix=prefix) as P,
        rs.create_resumable_stream_context(url, key_prefix=prefix) as C,
    ):
        for stream_id in ids:
            source = TestingSource()
            own = await P.resumable_stream(stream_id, source.make)
            source.write("a ")
            assert await read(own, 1) == "a "
            follower = await C.resume_existing_stream(stream_id)
            source.write(stream_id)
            source.close()
            assert await read(own) == stream_id
            assert await read(follower) == f"a {stream_id}"


async def test_a_sentinel_master_client_can_be_passed_in(
    clean_redis_sentinel: LocalSentinel,
) -> None:
    sentinel = redis.asyncio.Sentinel(clean_redis_sentinel.sentinels, socket_timeout=5)
    client = sentinel.master_for(clean_redis_sentinel.service_name)
    prefix = f"master-for-{uuid.uuid4().hex[:8]}"
    try:
        async with (
            rs.create_resumable_stream_context(client, key_prefix=prefix) as P,
            rs.create_resumable_stream_context(client, key_prefix=prefix) as C,
        ):
            source = TestingSource()
            own = await P.resumable_stream("s", source.make)
            source.write("through ")
            assert await read(own, 1) == "through "
            follower = await C.resume_existing_stream("s")
            source.write("master_for")
            source.close()
            assert await read(own) == "master_for"
            assert await read(follower) == "through master_for"
        master = redis.asyncio.Redis(port=clean_redis_sentinel.master_port())
        try:
            assert await master.get(Keys(prefix).sentinel("s")) == b"DONE"
        finally:
            await master.aclose()
    finally:
        await client.aclose()
        for sentinel_client in sentinel.sentinels:
            await sentinel_client.aclose()


def test_braces_in_a_key_prefix_are_refused() -> None:
    for prefix in ("app{1}", "app}", "{app"):
        with pytest.raises(ValueError, match="braces"):
            rs.ResumableStreamContext(backend=rs.MemoryBackend(), key_prefix=prefix)


def test_an_id_with_braces_is_tagged_by_a_digest_of_itself() -> None:
    keys = Keys("app")
    names = [keys.sentinel("{a}b"), keys.request("{a}b"), keys.live("{a}b"), keys.text("{a}b")]
    tags = {name[name.index("{") + 1 : name.index("}")] for name in names}
    assert len(tags) == 1  # one slot for all of the stream's names
    [tag] = tags
    assert len(tag) == 24
    assert tag != "a"
    assert all("{a}b" in name for name in names)  # the names still hold the id
    assert Keys("app").sentinel("{c}b") != names[0]
