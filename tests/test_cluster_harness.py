"""The cluster and Sentinel harness (tests/cluster.py) does what it says, on real servers.

Each check goes through a real client (redis-py's RedisCluster, or its Sentinel client) as
well as through the harness's own view, so that "settled" means what a client sees. Each test
that changes the shape takes a `clean_` fixture, which puts the shape back before and after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from .cluster import ClusterNode, HarnessError, LocalCluster, LocalSentinel

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio


@pytest.fixture
async def client(clean_redis_cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(clean_redis_cluster.seed_url)
    yield client
    await client.aclose()


def replicate(master: ClusterNode) -> None:
    """Block until the writes on `master` reached its replica (WAIT), so that a kill or a
    failover right after cannot lose them: these tests are about the harness."""
    assert master.execute("WAIT", 1, 5000) == 1


def owner_ports(cluster: LocalCluster, slot: int) -> set[int]:
    """The master port that each node's own CLUSTER SLOTS gives for `slot`."""
    return {
        int(master[1])
        for node in cluster.live_nodes()
        for start, end, master, *_ in node.execute("CLUSTER", "SLOTS")
        if start <= slot <= end
    }


async def test_the_cluster_starts_in_its_shape_and_keys_land_where_node_for_key_says(
    redis_cluster: LocalCluster, client: RedisCluster
) -> None:
    cluster = redis_cluster
    print(f"cluster started in {cluster.started_in:.2f} s")
    assert cluster.started_in is not None
    assert cluster.started_in < 15
    masters, replicas = cluster.masters(), cluster.replicas()
    assert masters == cluster.original_masters
    assert replicas == cluster.original_replicas
    for master, replica in zip(masters, replicas, strict=True):
        assert cluster.replicas_of(master) == [replica]
        assert replica.execute("ROLE")[2] == master.port
    holders = set()
    for i in range(30):
        key = f"harness:{i}"
        await client.set(key, f"value {i}")
        holder = cluster.node_for_key(key)
        holders.add(holder.port)
        assert holder.client.get(key) == f"value {i}"  # a GET elsewhere would answer MOVED
        for other in masters:
            if other is not holder:
                # MovedError from redis-py 6 on; a plain ResponseError "MOVED ..." before.
                with pytest.raises(redis.exceptions.ResponseError) as moved:
                    other.client.get(key)
                assert isinstance(moved.value, redis.exceptions.MovedError) or str(
                    moved.value
                ).startswith("MOVED")
    assert holders == {m.port for m in masters}


async def test_failover_swaps_the_roles_and_the_client_follows(
    redis_cluster: LocalCluster, client: RedisCluster
) -> None:
    cluster = redis_cluster
    master = cluster.original_masters[0]
    key = cluster.key_for(master)
    await client.set(key, "before")
    replicate(master)
    (replica,) = cluster.replicas_of(master)

    cluster.failover(replica)

    assert (replica.role(), master.role()) == ("master", "replica")
    assert cluster.node_for_key(key) is replica
    assert owner_ports(cluster, cluster.keyslot(key)) == {replica.port}
    # The client still routes to the old master, which answers MOVED; it follows.
    assert await client.get(key) == b"before"
    await client.set(key, "after")
    assert replica.client.get(key) == "after"
    with pytest.raises(HarnessError, match="is not a replica"):
        cluster.failover(replica)


async def test_kill_then_promotion_then_restart_then_reset(
    redis_cluster: LocalCluster, client: RedisCluster
) -> None:
    cluster = redis_cluster
    master = cluster.original_masters[1]  # not the seed: the client's first node stays up
    key = cluster.key_for(master)
    await client.set(key, "kept")
    replicate(master)
    (replica,) = cluster.replicas_of(master)

    cluster.kill(master)
    assert not master.alive
    promoted = cluster.wait_for_promotion()

    assert promoted is replica
    assert promoted.role() == "master"
    assert cluster.node_for_key(key) is promoted
    assert master not in cluster.masters()
    assert await client.get(key) == b"kept"  # the client finds the new master

    cluster.restart(master)
    assert master.role() == "replica"
    assert cluster.replicas_of(promoted) == [master]

    cluster.reset()
    assert cluster.masters() == cluster.original_masters
    assert cluster.node_for_key(key) is master
    assert await client.get(key) == b"kept"


async def test_migrate_slot_step_by_step_then_whole_and_reset_moves_it_back(
    redis_cluster: LocalCluster, client: RedisCluster
) -> None:
    cluster = redis_cluster
    source, destination = cluster.original_masters[0], cluster.original_masters[2]
    key = cluster.key_for(source, "migrated")
    slot = cluster.keyslot(key)
    await client.set(key, "moving")
    # A second key in the slot, so that the move takes more than one batch. (Earlier tests may
    # have left keys in this slot too: key_for() picks the first hash tag that fits.)
    await client.set(key + ":2", "moving too")
    in_slot = source.execute("CLUSTER", "COUNTKEYSINSLOT", slot)
    assert in_slot >= 2

    migration = cluster.migration(slot, destination)
    migration.importing()
    migration.migrating()
    assert await client.get(key) == b"moving"  # still on the source
    assert migration.move_keys(batch=1) == in_slot
    assert await client.get(key) == b"moving"  # via ASK to the destination
    # AskError from redis-py 6 on; a plain ResponseError "ASK ..." before.
    with pytest.raises(redis.exceptions.ResponseError) as ask:
        source.client.get(key)
    assert isinstance(ask.value, redis.exceptions.AskError) or str(ask.value).startswith("ASK")
    migration.assign()
    assert cluster.node_for_key(key) is destination
    assert owner_ports(cluster, slot) == {destination.port}
    assert destination.client.get(key) == "moving"
    assert await client.get(key) == b"moving"  # via MOVED, then the new slot map

    cluster.migrate_slot(slot, source)  # the whole sequence, back
    assert cluster.node_for_key(key) is source
    assert await client.get(key + ":2") == b"moving too"

    # A migration left half-done: reset() finishes it, then moves the slot back.
    half = cluster.migration(slot, destination)
    half.importing()
    half.migrating()
    cluster.reset()
    assert cluster.node_for_key(key) is source
    assert await client.get(key) == b"moving"


async def test_sentinel_failover_moves_the_master_a_sentinel_client_reaches(
    clean_redis_sentinel: LocalSentinel,
) -> None:
    setup = clean_redis_sentinel
    print(f"sentinel setup started in {setup.started_in:.2f} s")
    sentinel = Sentinel(setup.sentinels, socket_timeout=5)
    client = sentinel.master_for(setup.service_name, socket_timeout=5)
    fresh_sentinel = Sentinel(setup.sentinels, socket_timeout=5)
    try:
        before = setup.master_port()
        assert (await client.info("server"))["tcp_port"] == before
        await client.set("harness:sentinel", "kept")
        assert await client.execute_command("WAIT", 1, 5000) == 1

        after = setup.failover()

        assert after != before
        assert setup.master().role() == "master"
        # A new client: the old one may still be connected to the demoted master, which
        # stays a master until Sentinel reconfigures it (see LocalSentinel.settle).
        fresh = fresh_sentinel.master_for(setup.service_name)
        try:
            assert (await fresh.info("server"))["tcp_port"] == after
            assert await fresh.get("harness:sentinel") == b"kept"
            await fresh.set("harness:sentinel", "after")
        finally:
            await fresh.aclose()
    finally:
        await client.aclose()
        for connection in sentinel.sentinels + fresh_sentinel.sentinels:
            await connection.aclose()
