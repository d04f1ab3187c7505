"""Writers against generators, side by side in one run (issue 23).

Usage: python benchmarks/bench_writer.py [--chunks 200000] [--rounds 5] [--resumes 40]
                                          [--redis URL] [--json FILE]

Throughput: N chunks of 12 ASCII characters, each stream read whole by one reader of the
producing context (its `next_batch`, as an SSE response reads), timed from the call that starts
the stream to its reader's end (the end recorded):
- `generator`: `ctx.resumable_stream(id, make_stream)` with a generator that yields each chunk;
- `async writer`: `async with ctx.writer(id) as w: await w.write(chunk)`;
- `sync writer`: `with sync_ctx.writer(id) as w: w.write(chunk)` from one thread, its reader
  another thread's `sync_ctx.resume_existing_stream(id, resume_at=0)`.
Variants alternate within each round, and each figure is the median of the rounds.

Resume latency: a running stream (a generator, or a writer, each waiting after its first chunk)
resumed at offset 0 from a second context on the same backend (another process, as far as
the protocol goes): the time from the call to the first batch, alternating the two kinds.

On the in-memory backend, and on Redis with `--redis` (or `REDIS_URL`). Prints a table; `--json`
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

import resumable_stream as rs
from resumable_stream.redis import RedisBackend

CHUNK = "tok-0123456 "


def backend_of(url: str | None) -> rs.Backend:
    return rs.MemoryBackend() if url is None else RedisBackend(url)


async def read_all(stream: rs.ResumableStream | None) -> int:
    assert stream is not None
    count = 0
    while True:
        try:
            count += len(await stream.next_batch())
        except StopAsyncIteration:
            return count


async def generator_run(ctx: rs.ResumableStreamContext, n: int) -> float:
    async def source() -> AsyncIterator[str]:
        for _ in range(n):
            yield CHUNK

    start = time.perf_counter()
    stream = await ctx.resumable_stream(f"gen-{uuid.uuid4().hex}", source)
    assert await read_all(stream) == n
    return time.perf_counter() - start


async def async_writer_run(ctx: rs.ResumableStreamContext, n: int) -> float:
    sid = f"aw-{uuid.uuid4().hex}"
    start = time.perf_counter()
    async with anyio.create_task_group() as tg, ctx.writer(sid) as w:
        stream = await ctx.resume_existing_stream(sid, resume_at=0)
        counted: list[int] = []

        async def read() -> None:
            counted.append(await read_all(stream))

        tg.start_soon(read)
        for _ in range(n):
            await w.write(CHUNK)
    assert counted == [n]
    return time.perf_counter() - start


def sync_writer_run(ctx: rs.SyncResumableStreamContext, n: int) -> float:
    sid = f"sw-{uuid.uuid4().hex}"
    counted: list[int] = []
    start = time.perf_counter()
    with ctx.writer(sid) as w:
        stream = ctx.resume_existing_stream(sid, resume_at=0)
        assert stream is not None

        def read() -> None:
            total = 0
            with stream:
                while True:
                    try:
                        total += len(stream.next_batch())
                    except StopIteration:
                        break
            counted.append(total)

        reader = threading.Thread(target=read)
        reader.start()
        for _ in range(n):
            w.write(CHUNK)
    reader.join()
    elapsed = time.perf_counter() - start
    assert counted == [n]
    return elapsed


async def resume_latency(
    producing: rs.ResumableStreamContext, following: rs.ResumableStreamContext, kind: str
) -> float:
    """Seconds from a resume call in another context to its first batch, for a running stream
    produced by `kind` ("generator" or "writer")."""
    sid = f"lat-{kind}-{uuid.uuid4().hex}"
    release = anyio.Event()
    if kind == "generator":

        async def source() -> AsyncIterator[str]:
            yield "first words "
            await release.wait()

        own = await producing.resumable_stream(sid, source)
        assert own is not None
        await own.aclose()
        elapsed = await _time_first_batch(following, sid)
        release.set()
        return elapsed
    async with producing.writer(sid) as w:
        await w.write("first words ")
        return await _time_first_batch(following, sid)


async def _time_first_batch(ctx: rs.ResumableStreamContext, sid: str) -> float:
    start = time.perf_counter()
    stream = await ctx.resume_existing_stream(sid, resume_at=0)
    assert stream is not None
    batch = await stream.next_batch()
    elapsed = time.perf_counter() - start
    assert batch[0][0] == "first words "
    await stream.aclose()
    return elapsed


def run(url: str | None, chunks: int, rounds: int, resumes: int) -> dict[str, Any]:
    prefix = f"bench-writer-{uuid.uuid4().hex}"
    times: dict[str, list[float]] = {"generator": [], "async writer": [], "sync writer": []}
    latency: dict[str, list[float]] = {"generator": [], "writer": []}
    sync_ctx = rs.create_sync_context(
        url, backend=rs.MemoryBackend() if url is None else None, key_prefix=prefix, telemetry=False
    )

    async def main() -> None:
        backend = backend_of(url)
        async with (
            rs.ResumableStreamContext(backend=backend, key_prefix=prefix, telemetry=False) as P,
            rs.ResumableStreamContext(
                backend=backend if url is None else backend_of(url),
                key_prefix=prefix,
                telemetry=False,
            ) as C,
        ):
            # Warm-up: one small run of each.
            await generator_run(P, 1000)
            await async_writer_run(P, 1000)
            await anyio.to_thread.run_sync(sync_writer_run, sync_ctx, 1000)
            for r in range(rounds):
                variants: list[tuple[str, Callable[[], Any]]] = [
                    ("generator", lambda: generator_run(P, chunks)),
                    ("async writer", lambda: async_writer_run(P, chunks)),
                    (
                        "sync writer",
                        lambda: anyio.to_thread.run_sync(sync_writer_run, sync_ctx, chunks),
                    ),
                ]
                if r % 2:
                    variants.reverse()
                for name, variant in variants:
                    times[name].append(await variant())
            for i in range(resumes):
                for kind in ("generator", "writer") if i % 2 == 0 else ("writer", "generator"):
                    latency[kind].append(await resume_latency(P, C, kind))

    with sync_ctx:
        anyio.run(main)
    rates = {name: chunks / statistics.median(values) for name, values in times.items()}
    return {
        "backend": "memory" if url is None else "redis",
        "chunks": chunks,
        "rounds": rounds,
        "chunks_per_s": rates,
        "all_chunks_per_s": {k: [round(chunks / t) for t in v] for k, v in times.items()},
        "async_writer_over_generator": rates["async writer"] / rates["generator"],
        "sync_writer_over_async_writer": rates["sync writer"] / rates["async writer"],
        "resume_ms": {
            kind: {
                "median": statistics.median(values) * 1000,
                "p10": _quantile(values, 0.1) * 1000,
                "p90": _quantile(values, 0.9) * 1000,
            }
            for kind, values in latency.items()
        },
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resumes", type=int, default=40)
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--json")
    args = parser.parse_args()
    results = [run(None, args.chunks, args.rounds, args.resumes)]
    if args.redis:
        results.append(run(args.redis, args.chunks, args.rounds, args.resumes))
    for result in results:
        print(f"\n{result['backend']}: {result['chunks']:,} chunks, median of {result['rounds']}")
        for name, rate in result["chunks_per_s"].items():
            print(f"  {name:<13} {rate / 1000:8.1f}k chunks/s  {result['all_chunks_per_s'][name]}")
        print(f"  async writer / generator:    {result['async_writer_over_generator']:.2f}")
        print(f"  sync writer / async writer:  {result['sync_writer_over_async_writer']:.2f}")
        for kind, figures in result["resume_ms"].items():
            print(
                f"  resume of a running {kind:<9} median {figures['median']:.3f} ms"
                f"  (p10 {figures['p10']:.3f}, p90 {figures['p90']:.3f})"
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.version.split()[0], "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
