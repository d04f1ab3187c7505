"""Further scenarios (issue 5): fan-out, 10,000 live streams, SSE over HTTP, 40 MiB replay.

Usage: python benchmarks/bench_scenarios.py [--quick] [--only fanout,scale,http,replay]
       [--runs N] [--json FILE] [--profile DIR] [--baseline REF]

Starts its own redis-server on a free loopback port (and, for the HTTP scenario, a uvicorn server
in a subprocess: this file with `--serve`), prints one table per scenario and writes every run to
`benchmarks/results/scenarios.json` (`scenarios-quick.json` with `--quick`). Figures are medians
of the runs; ratios are taken within one run, then their median is reported.

1. fan-out: 1 to 1,000 followers of one live stream, spread round-robin over four consumer
   contexts and the producer's own context, all on Redis. Redis commands per live chunk, chunks/s
   delivered to every follower, and latency from the source yielding a chunk to each follower
   reading it; the source yields flat out, or one loop turn after every chunk (`await
   anyio.sleep(0)`), or 100 chunks/s like an LLM.
2. scale: 10,000 streams live at once in one context, each read by its own task: Redis
   connections used, Python memory per stream (tracemalloc) beyond its text, CPU per chunk.
3. http: SSE through uvicorn to an httpx client: `EventStreamResponse` (in-memory and Redis
   backends) against a plain Starlette `StreamingResponse` of the same generator that formats the
   same frames; the generator takes a loop turn every 64 chunks, or after every chunk.
4. replay: a 40 MiB stream, running or finished-and-lingering, resumed at offset 0 from another
   context: call -> last byte, through the iterator, and over HTTP for the finished one.

`--profile DIR` runs no timed scenario: it writes pyinstrument reports of the fan-out and HTTP
hot paths into DIR (`pip install pyinstrument`).

`--baseline REF` runs each scenario twice, in child processes against one redis-server: once
with the library as of git REF ("before", extracted into a temporary directory) and once with
this checkout's ("after"), each imported through PYTHONPATH and checked, alternating which runs
first; then prints before and after side by side and writes `scenarios.json` (after),
`scenarios-before.json` and `scenarios-compare.json` (the side-by-side tables).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import operator
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import redis.asyncio
from bench_core import (
    REPO,
    check_imported,
    code_version,
    commandstats,
    env_importing,
    library_at,
    median_of,
    start_redis,
)

import resumable_stream as rs
from resumable_stream._protocol import Keys
from resumable_stream.redis import RedisBackend

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# Commands the admin connection sends itself, and connection handshakes.
ADMIN_COMMANDS = {"info", "client|info", "client|list", "client|setinfo", "hello", "ping", "select"}
SCENARIOS = ("fanout", "scale", "http", "replay")
HTTP_YIELD_EVERY = 64  # both HTTP variants' generator yields to the loop every so many chunks
now = time.perf_counter


def make_chunk(i: int, width: int) -> str:
    """`bench_core.chunk(i, width)` (the shared workload's chunk), without its per-char loop."""
    start = i % 62
    repeated = ALPHABET * ((width - 9) // 62 + 2)
    return f"{i:08d}:" + repeated[start : start + width - 9]


def make_chunks(count: int, width: int) -> list[str]:
    return [make_chunk(i, width) for i in range(count)]


async def never() -> AsyncIterator[str]:
    """The make_stream of a reader that must follow, never produce."""
    raise AssertionError("a follower was elected producer")
    yield ""  # pragma: no cover


def redis_context(
    url: str, prefix: str, backend_options: dict[str, Any] | None = None, **options: Any
) -> rs.ResumableStreamContext:
    options.setdefault("resume_timeout", 60.0)
    backend = RedisBackend(url, **(backend_options or {}))
    return rs.ResumableStreamContext(backend=backend, key_prefix=prefix, **options)


# The memory run of the scale scenario runs under tracemalloc, about ten times slower: a
# producer's SUBSCRIBE then waits seconds for the subscriber lock behind the other elections in
# flight, and since the redesign that wait counts against the backend's `command_timeout` (5 s),
# so most of the 10,000 streams failed with "Redis did not answer subscribe". Only that run gives
# commands more time, where the backend has the option; the timed runs keep the defaults.
TRACED_COMMAND_TIMEOUT = 600.0


def traced_backend_options() -> dict[str, Any]:
    accepts = "command_timeout" in inspect.signature(RedisBackend).parameters
    return {"command_timeout": TRACED_COMMAND_TIMEOUT} if accepts else {}


async def warm_up(ctx: rs.ResumableStreamContext) -> None:
    async def three() -> AsyncIterator[str]:
        for c in ("a", "b", "c"):
            yield c

    stream = await ctx.resumable_stream(uuid.uuid4().hex, three)
    assert stream is not None
    assert "".join([c async for c in stream]) == "abc"


def command_delta(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {k: v for k, v in sorted((after - before).items()) if k not in ADMIN_COMMANDS}


def quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def si(value: float) -> str:
    """1234567 -> '1.23M', for rates."""
    for factor, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


# 1. Fan-out


async def fanout_once(
    producer: rs.ResumableStreamContext,
    homes: list[rs.ResumableStreamContext],
    admin: redis.asyncio.Redis,
    followers: int,
    chunks: list[str],
    pace: float | None,
) -> dict[str, Any]:
    """One stream, `followers` readers attached while it waits after chunk 0; then it goes live.

    `pace`: None yields flat out, 0 one loop turn after every chunk, else that many chunks/s.
    """
    stream_id = uuid.uuid4().hex
    produced = [0.0] * len(chunks)
    gate = anyio.Event()

    async def source() -> AsyncIterator[str]:
        for i, c in enumerate(chunks):
            if i == 1:
                await gate.wait()
                opened = now()
            elif i > 1 and pace:
                await anyio.sleep(max(0.0, opened + (i - 1) / pace - now()))
            produced[i] = now()
            yield c
            if pace == 0:
                await anyio.lowlevel.checkpoint()

    own = await producer.resumable_stream(stream_id, source)
    assert own is not None
    await own.__anext__()
    attached = 0
    all_attached = anyio.Event()
    arrivals: list[list[float]] = [[] for _ in range(followers)]
    texts: dict[int, list[str]] = {}

    async def follow(j: int) -> None:
        nonlocal attached
        reader = await homes[j % len(homes)].resumable_stream(stream_id, never, 0)
        assert reader is not None
        attached += 1
        if attached == followers:
            all_attached.set()
        stamp = arrivals[j].append
        if j < len(homes):  # one reader per context keeps its text, to check it
            keep = texts[j] = []
            async for c in reader:
                stamp(now())
                keep.append(c)
        else:
            async for _ in reader:
                stamp(now())

    async def drain_own() -> None:
        async for _ in own:
            pass

    async with anyio.create_task_group() as tg:
        for j in range(followers):
            tg.start_soon(follow, j)
        await all_attached.wait()
        before = await commandstats(admin)
        opened = now()
        gate.set()
        tg.start_soon(drain_own)
    delta = command_delta(await commandstats(admin), before)
    live = len(chunks) - 1
    last = max(times[-1] for times in arrivals)
    latencies: list[float] = []
    for times in arrivals:
        latencies.extend(map(operator.sub, times[1:], produced[1:]))
    latencies.sort()
    return {
        "followers": followers,
        "live_chunks": live,
        "source_chunks_per_s": (live - 1) / (produced[-1] - produced[1]),
        "chunks_per_s_to_every_follower": live / (last - opened),
        "deliveries_per_s": followers * live / (last - opened),
        "latency_p50_ms": quantile(latencies, 0.5) * 1e3,
        "latency_p99_ms": quantile(latencies, 0.99) * 1e3,
        "latency_max_ms": latencies[-1] * 1e3,
        "publish_per_live_chunk": delta.get("publish", 0) / live,
        "commands_per_live_chunk": sum(delta.values()) / live,
        "commands": delta,
        "ok": all(len(times) == len(chunks) for times in arrivals)
        and all(text == chunks for text in texts.values()),
    }


FANOUT_MODES = {
    "flat_out": "flat out",
    "loop_turn": "one loop turn per chunk",
    "rate_100": "100 chunks/s (LLM-like)",
}


async def fanout(
    url: str, admin: redis.asyncio.Redis, counts: list[int], sizes: dict[str, int], runs: int
) -> dict[str, Any]:
    prefix = f"fanout-{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {mode: {} for mode in FANOUT_MODES}
    paces: dict[str, float | None] = {"flat_out": None, "loop_turn": 0, "rate_100": 100}
    async with contextlib.AsyncExitStack() as stack:
        producer = await stack.enter_async_context(redis_context(url, prefix))
        consumers = [await stack.enter_async_context(redis_context(url, prefix)) for _ in range(4)]
        for ctx in (producer, *consumers):
            await warm_up(ctx)
        homes = [*consumers, producer]
        for mode, pace in paces.items():
            chunks = make_chunks(sizes[mode], 64)
            for n in counts:
                all_runs = [
                    await fanout_once(producer, homes, admin, n, chunks, pace) for _ in range(runs)
                ]
                results[mode][str(n)] = {"runs": all_runs, "median": median_of(all_runs)}
    rows = []
    for mode, by_n in results.items():
        for n, entry in by_n.items():
            m = entry["median"]
            rows.append(
                [
                    FANOUT_MODES[mode],
                    n,
                    f"{m['live_chunks']:,}",
                    f"{m['publish_per_live_chunk']:.3f}",
                    f"{m['commands_per_live_chunk']:.3f}",
                    si(m["source_chunks_per_s"]),
                    si(m["chunks_per_s_to_every_follower"]),
                    si(m["deliveries_per_s"]),
                    f"{m['latency_p50_ms']:.2f}",
                    f"{m['latency_p99_ms']:.2f}",
                    "yes" if m["ok"] else "NO",
                ]
            )
    print_table(
        f"fan-out: one live stream on Redis, followers over 5 contexts (medians of {runs})",
        [
            "source",
            "followers",
            "live chunks",
            "PUBLISH / live chunk",
            "commands / live chunk",
            "source chunks/s",
            "chunks/s to every follower",
            "deliveries/s (all followers)",
            "latency p50 ms",
            "latency p99 ms",
            "texts exact",
        ],
        rows,
    )
    return results


# 2. Scale: many live streams in one process


def clients(listing: Any) -> int:
    return len(listing) if isinstance(listing, list) else len(str(listing).splitlines())


async def scale(
    url: str,
    admin: redis.asyncio.Redis,
    streams: int,
    first: int,
    more: int,
    library: bool,
    trace: bool,
) -> dict[str, Any]:
    """`streams` sources that yield `first` chunks, wait, yield `more` (one loop turn each), wait.

    With `library`, each is a stream of one Redis context read by its own task; without, the same
    sources are read by bare tasks that keep the text in a list (what any server would hold).
    With `trace`, measures Python memory only (tracemalloc slows everything down); else times.
    """
    tail = make_chunk(0, 64)[8:]
    go_on, finish = anyio.Event(), anyio.Event()
    live, done = anyio.Event(), anyio.Event()
    counts = {"live": 0, "done": 0}

    def make(i: int) -> Callable[[], AsyncIterator[str]]:
        async def source() -> AsyncIterator[str]:
            for j in range(first):
                yield f"{i:05d}{j:03d}" + tail  # a fresh 64-char str per chunk and stream
            await go_on.wait()
            for j in range(first, first + more):
                await anyio.lowlevel.checkpoint()
                yield f"{i:05d}{j:03d}" + tail
            await finish.wait()

        return source

    def seen(n: int) -> None:
        if n == first:
            counts["live"] += 1
            if counts["live"] == streams:
                live.set()
        elif n == first + more:
            counts["done"] += 1
            if counts["done"] == streams:
                done.set()

    async def read(stream: Any) -> None:
        n = 0
        async for _ in stream:
            n += 1
            seen(n)

    async def bare(i: int) -> None:
        text: list[str] = []
        async for c in make(i)():
            text.append(c)
            seen(len(text))

    result: dict[str, Any] = {}
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        ctx = None
        if library:
            backend_options = traced_backend_options() if trace else {}
            result.update(backend_options)
            ctx = redis_context(url, prefix, backend_options, linger=0)
            await stack.enter_async_context(ctx)
            await warm_up(ctx)
        gc.collect()
        if trace:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        started = now()
        async with anyio.create_task_group() as tg:
            if ctx is None:
                for i in range(streams):
                    tg.start_soon(bare, i)
            else:

                async def open_one(i: int) -> None:
                    assert ctx is not None
                    stream = await ctx.resumable_stream(f"s{i}", make(i))
                    tg.start_soon(read, stream)

                for lo in range(0, streams, 1000):  # 1,000 elections in flight at a time
                    async with anyio.create_task_group() as opening:
                        for i in range(lo, min(lo + 1000, streams)):
                            opening.start_soon(open_one, i)
            await live.wait()
            if trace:
                gc.collect()
                used = tracemalloc.get_traced_memory()[0] - base
                tracemalloc.stop()
                text_bytes = first * sys.getsizeof(tail + "12345678")
                result["text_bytes_per_stream"] = text_bytes
                result["bytes_per_stream"] = used / streams
                result["bytes_per_stream_beyond_text"] = used / streams - text_bytes
            else:
                result["start_all_s"] = now() - started
                if ctx is not None:
                    result["redis_connections"] = clients(await admin.client_list()) - 1
                    channels = await admin.pubsub_channels(Keys(prefix).request("*"))
                    result["request_channels_subscribed"] = len(channels)
                gc.collect()
                cpu, wall = time.process_time(), now()
            go_on.set()
            await done.wait()
            if not trace:
                cpu, wall = time.process_time() - cpu, now() - wall
                result["cpu_us_per_chunk"] = cpu / (streams * more) * 1e6
                result["chunks_per_s"] = streams * more / wall
            ending = now()
            finish.set()
        if not trace:
            result["end_all_s"] = now() - ending
    return result


async def scale_scenario(
    url: str, admin: redis.asyncio.Redis, streams: int, first: int, more: int, runs: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"params": {"streams": streams, "first": first, "more": more}}
    for name, library in (("bare_tasks", False), ("library_redis", True)):
        traced = await scale(url, admin, streams, first, more, library, trace=True)
        timed = [await scale(url, admin, streams, first, more, library, False) for _ in range(runs)]
        out[name] = {"memory_run": traced, "runs": timed, "median": median_of(timed) | traced}
    bare, lib = out["bare_tasks"]["median"], out["library_redis"]["median"]
    kib = 1024
    rows = [
        ["Redis connections (CLIENT LIST, admin excluded)", "-", f"{lib['redis_connections']:g}"],
        [
            "streams live (their request channels subscribed, PUBSUB CHANNELS)",
            "-",
            f"{lib['request_channels_subscribed']:,.0f}",
        ],
        [
            "Python memory per stream, all included (tracemalloc)",
            f"{bare['bytes_per_stream'] / kib:.2f} KiB",
            f"{lib['bytes_per_stream'] / kib:.2f} KiB",
        ],
        [
            f"same, beyond its text ({first} chunks: {lib['text_bytes_per_stream']} B as str)",
            f"{bare['bytes_per_stream_beyond_text'] / kib:.2f} KiB",
            f"{lib['bytes_per_stream_beyond_text'] / kib:.2f} KiB",
        ],
        [
            "the library's share (library - bare tasks)",
            "",
            f"{(lib['bytes_per_stream'] - bare['bytes_per_stream']) / kib:.2f} KiB",
        ],
        [
            f"CPU per chunk ({more} more chunks per stream, one loop turn each)",
            f"{bare['cpu_us_per_chunk']:.2f} µs",
            f"{lib['cpu_us_per_chunk']:.2f} µs",
        ],
        ["chunks/s in that phase", si(bare["chunks_per_s"]), si(lib["chunks_per_s"])],
        [
            "time to start all streams",
            f"{bare['start_all_s']:.2f} s",
            f"{lib['start_all_s']:.2f} s",
        ],
        ["time to end all streams", f"{bare['end_all_s']:.2f} s", f"{lib['end_all_s']:.2f} s"],
    ]
    print_table(
        f"scale: {streams:,} live streams in one process (memory: one traced run; "
        f"times: medians of {runs})",
        ["metric", "bare tasks, no library", "library on Redis"],
        rows,
    )
    return out


# 3. End to end over HTTP (the server runs in a subprocess: this file with --serve)


def serve(args: argparse.Namespace) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    from resumable_stream.starlette import EventStreamResponse

    chunks = make_chunks(args.http_chunks, args.width)
    big: dict[tuple[int, int], list[str]] = {}

    def generator(items: list[str], every: int) -> Callable[[], AsyncIterator[str]]:
        """The one generator of every variant: a loop turn after every `every` chunks."""

        async def gen() -> AsyncIterator[str]:
            for i, c in enumerate(items, 1):
                yield c
                if i % every == 0:
                    await anyio.lowlevel.checkpoint()

        return gen

    def every(request: Request) -> int:
        return int(request.query_params.get("every", HTTP_YIELD_EVERY))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        prefix = f"http-{uuid.uuid4().hex[:8]}"
        async with (
            rs.ResumableStreamContext(backend=rs.MemoryBackend()) as memory,
            redis_context(args.redis_url, prefix) as producer,
            redis_context(args.redis_url, prefix) as resumer,
        ):
            yield {"memory": memory, "producer": producer, "resumer": resumer}

    async def plain(request: Request) -> Response:
        async def frames() -> AsyncIterator[str]:
            offset = 0
            async for c in generator(chunks, every(request))():
                offset += len(c)
                yield f"id: {offset}\ndata: {c}\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    async def ours(request: Request) -> Response:
        ctx = request.state.memory if request.path_params["backend"] == "memory" else None
        ctx = ctx or request.state.producer
        return EventStreamResponse(
            ctx, request.path_params["id"], generator(chunks, every(request))
        )

    async def produce_big(request: Request) -> Response:
        key = (int(request.query_params["count"]), int(request.query_params["width"]))
        if key not in big:
            big[key] = make_chunks(*key)
        make = generator(big[key], every(request))
        return EventStreamResponse(request.state.producer, request.path_params["id"], make)

    async def resume(request: Request) -> Response:
        return EventStreamResponse(request.state.resumer, request.path_params["id"])

    app = Starlette(
        routes=[
            Route("/plain/{id}", plain),
            Route("/ours/{backend}/{id}", ours),
            Route("/big/{id}", produce_big),
            Route("/resume/{id}", resume),
        ],
        lifespan=lifespan,
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=args.serve, log_level="warning")
    server = uvicorn.Server(config)
    profiler = None
    if args.profile:
        profiler = importlib.import_module("pyinstrument").Profiler(
            interval=0.0005, async_mode="disabled"
        )
        profiler.start()
    # uvicorn re-raises the SIGTERM it shut down on: exit cleanly so the profile gets written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        anyio.run(server.serve)
    finally:
        if profiler is not None:
            profiler.stop()
            Path(args.profile).write_text(profiler.output_text(unicode=True, color=False))


@contextlib.contextmanager
def http_server(redis_url: str, chunks: int, width: int, profile: str | None = None) -> Any:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, __file__, "--serve", str(port), "--redis-url", redis_url]
    command += ["--http-chunks", str(chunks), "--width", str(width)]
    if profile:
        command += ["--profile-file", profile]
    process = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def fetch(client: httpx.AsyncClient, url: str) -> tuple[float, bytes, int]:
    """GET `url` and read the whole body: (seconds to last byte, body, status)."""
    parts: list[bytes] = []
    start = now()
    async with client.stream("GET", url) as response:
        async for part in response.aiter_raw():
            parts.append(part)
    return now() - start, b"".join(parts), response.status_code


# Since the redesign, a new reader's response starts with an id-only frame (a cursor, so that a
# reconnect resumes even before the first chunk); the plain response has no such thing. Bodies
# are compared without it: same events, same bytes, whichever version of the library runs.
CURSOR_FRAME = b"id: 0\n\n"


def events_of(body: bytes) -> bytes:
    return body.removeprefix(CURSOR_FRAME)


def sse_body(chunks: list[str]) -> bytes:
    frames, offset = [], 0
    for c in chunks:
        offset += len(c)
        frames.append(f"id: {offset}\ndata: {c}\n\n")
    return "".join(frames).encode()


VARIANTS = {
    "plain": ("/plain/{id}", "plain Starlette StreamingResponse"),
    "ours_memory": ("/ours/memory/{id}", "EventStreamResponse, in-memory backend"),
    "ours_redis": ("/ours/redis/{id}", "EventStreamResponse, Redis backend"),
}
HTTP_EVERY = (HTTP_YIELD_EVERY, 1)


async def http_scenario(redis_url: str, count: int, width: int, runs: int) -> dict[str, Any]:
    expected = sse_body(make_chunks(count, width))
    out: dict[str, Any] = {"params": {"chunks": count, "width": width}}
    names = list(VARIANTS)
    with http_server(redis_url, count, width) as base:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            for path, _ in VARIANTS.values():  # warm-up
                await fetch(client, path.format(id=uuid.uuid4().hex))
            for every in HTTP_EVERY:
                runs_out: list[dict[str, Any]] = []
                for r in range(runs):
                    run: dict[str, Any] = {}
                    for name in names[r % 3 :] + names[: r % 3]:  # rotate the order
                        url = VARIANTS[name][0].format(id=uuid.uuid4().hex) + f"?every={every}"
                        seconds, body, status = await fetch(client, url)
                        run[f"{name}_events_per_s"] = count / seconds
                        run[f"{name}_mb_per_s"] = len(body) / seconds / 1e6
                        run[f"{name}_ok"] = status == 200 and events_of(body) == expected
                    for name in names[1:]:
                        plain = run["plain_events_per_s"]
                        run[f"{name}_ratio"] = run[f"{name}_events_per_s"] / plain
                    runs_out.append(run)
                out[f"every_{every}"] = {"runs": runs_out, "median": median_of(runs_out)}
    rows = []
    for every in HTTP_EVERY:
        median = out[f"every_{every}"]["median"]
        for name, (_, label) in VARIANTS.items():
            ratio = median.get(f"{name}_ratio")
            rows.append(
                [
                    f"{every}" if name == "plain" else "",
                    label,
                    si(median[f"{name}_events_per_s"]),
                    f"{median[f'{name}_mb_per_s']:.1f}",
                    "1" if ratio is None else f"{ratio:.2f}",
                    "yes" if median[f"{name}_ok"] else "NO",
                ]
            )
    print_table(
        f"http: {count:,} SSE events of {width} chars through uvicorn to httpx (medians of {runs})",
        [
            "loop turn every N chunks",
            "response",
            "events/s",
            "MB/s",
            "ratio to plain (median of per-run ratios)",
            "events byte-identical (cursor frame aside)",
        ],
        rows,
    )
    return out


# 4. 40 MiB replay


async def replay_once(
    producer: rs.ResumableStreamContext,
    resumer: rs.ResumableStreamContext,
    chunks: list[str],
    finished: bool,
) -> dict[str, Any]:
    """Resume at 0 from `resumer` a stream of `chunks` that `producer` finished or still runs."""
    stream_id = uuid.uuid4().hex
    gate = anyio.Event()
    size = sum(map(len, chunks))

    async def source() -> AsyncIterator[str]:
        for c in chunks:
            yield c
        await gate.wait()

    own = await producer.resumable_stream(stream_id, source)
    assert own is not None
    got = 0
    while got < size:
        got += len(await own.__anext__())
    if finished:
        gate.set()
        assert [c async for c in own] == []  # readers end once DONE is recorded
    parts: list[str] = []
    received = 0
    start = now()
    follower = await resumer.resumable_stream(stream_id, never, 0)
    ack = now() - start
    assert follower is not None
    while received < size:
        part = await follower.__anext__()
        parts.append(part)
        received += len(part)
    last_byte = now() - start
    gate.set()
    parts += [c async for c in follower]
    return {
        "mib": size / 2**20,
        "returned_ms": ack * 1e3,
        "last_byte_ms": last_byte * 1e3,
        "mb_per_s": size / last_byte / 1e6,
        "ok": parts == chunks,
    }


async def replay_scenario(
    url: str, mib: int, widths: list[int], runs: int, http: bool
) -> dict[str, Any]:
    prefix = f"replay-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {}
    async with redis_context(url, prefix) as producer, redis_context(url, prefix) as resumer:
        await warm_up(producer)
        await warm_up(resumer)
        for width in widths:
            chunks = make_chunks(-(-mib * 2**20 // width), width)
            for finished in (False, True):
                key = f"{'finished_lingering' if finished else 'running'}_width_{width}"
                all_runs = [
                    await replay_once(producer, resumer, chunks, finished) for _ in range(runs)
                ]
                out[key] = {"runs": all_runs, "median": median_of(all_runs)}
            del chunks
    if http:
        with http_server(url, 1, 64) as base:
            async with httpx.AsyncClient(base_url=base, timeout=300) as client:
                for width in widths:
                    count = -(-mib * 2**20 // width)
                    expected = sse_body(make_chunks(count, width))
                    all_runs = []
                    for _ in range(runs):
                        stream_id = uuid.uuid4().hex
                        query = f"?count={count}&width={width}"
                        _, body, status = await fetch(client, f"/big/{stream_id}{query}")
                        assert status == 200
                        assert events_of(body) == expected
                        resume = f"/resume/{stream_id}?resumeAt=0"
                        seconds, body, status = await fetch(client, resume)
                        all_runs.append(
                            {
                                "mib": mib,
                                "last_byte_ms": seconds * 1e3,
                                "mb_per_s": len(body) / seconds / 1e6,
                                "ok": status == 200 and events_of(body) == expected,
                            }
                        )
                    del expected
                    out[f"http_finished_lingering_width_{width}"] = {
                        "runs": all_runs,
                        "median": median_of(all_runs),
                    }
    rows = []
    for key, entry in out.items():
        m = entry["median"]
        how, _, width_text = key.partition("_width_")
        rows.append(
            [
                how.replace("http_", "over HTTP: ").replace("_", " "),
                f"{int(width_text):,}",
                f"{m['mib']:.0f}",
                f"{m['returned_ms']:.0f}" if "returned_ms" in m else "-",
                f"{m['last_byte_ms']:.0f}",
                f"{m['mb_per_s']:.0f}",
                "yes" if m["ok"] else "NO",
            ]
        )
    print_table(
        f"replay: resume at offset 0 from another context, on Redis (medians of {runs})",
        [
            "stream",
            "chunk chars",
            "MiB of text",
            "call → returned ms",
            "call → last byte ms",
            "MB/s (text; HTTP: body)",
            "exact",
        ],
        rows,
    )
    return out


# Profiling (no timed scenario)


async def profile(url: str, directory: Path, quick: bool) -> None:
    pyinstrument = importlib.import_module("pyinstrument")
    await anyio.Path(directory).mkdir(parents=True, exist_ok=True)
    admin = redis.asyncio.Redis.from_url(url)
    prefix = f"profile-{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        producer = await stack.enter_async_context(redis_context(url, prefix))
        consumers = [await stack.enter_async_context(redis_context(url, prefix)) for _ in range(4)]
        homes = [*consumers, producer]
        for ctx in homes:
            await warm_up(ctx)
        runs: list[tuple[str, int, int, float | None]] = [
            ("fanout-loop-turn-100", 100, 2000, 0),
            ("fanout-rate100-1000", 1000, 200, 100),
            ("fanout-flat-1000", 1000, 2000, None),
            ("fanout-flat-1", 1, 50_000, None),
        ]
        for name, n, size, pace in runs:
            if quick:
                n, size = min(n, 10), min(size, 500)
            profiler = pyinstrument.Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
            await fanout_once(producer, homes, admin, n, make_chunks(size, 64), pace)
            profiler.stop()
            text = profiler.output_text(unicode=True, color=False)
            await anyio.Path(directory / f"{name}.txt").write_text(text)
    await admin.aclose()
    count = 2000 if quick else 20_000
    for name, (path, _) in VARIANTS.items():
        for every in HTTP_EVERY:
            target = directory / f"http-{name}-every-{every}.txt"
            with http_server(url, count, 64, str(target)) as base:
                async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                    for _ in range(2 if quick else 10):
                        await fetch(client, path.format(id=uuid.uuid4().hex) + f"?every={every}")
    print(f"pyinstrument reports written to {directory}")


# Main


async def main(args: argparse.Namespace) -> None:
    quick = args.quick
    runs = args.runs or (1 if quick else 3)
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    # With --baseline, the parent runs one server for both codes and passes its URL.
    process, url = (None, args.redis_url) if args.redis_url else start_redis()
    started = now()
    report: dict[str, Any] = {
        "impl": f"python:resumable-streams@{rs.__version__}",
        # Which copy of the library ran: a --baseline parent checks it.
        "module_file": rs.__file__,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "params": {"quick": quick, "runs": runs},
        "results": {},
    }
    results = report["results"]
    try:
        admin = redis.asyncio.Redis.from_url(url)
        info = await admin.info("server")
        report["machine"]["redis"] = info.get("redis_version")
        if args.profile:
            await profile(url, Path(args.profile), quick)
            await admin.aclose()
            return
        if "fanout" in only:
            counts = [1, 10, 100] if quick else [1, 10, 100, 1000]
            sizes = {"flat_out": 1000, "loop_turn": 300, "rate_100": 30}
            if not quick:
                sizes = {"flat_out": 2000, "loop_turn": 2000, "rate_100": 200}
            report["params"]["fanout"] = {"followers": counts, "chunks": sizes}
            results["fanout"] = await fanout(url, admin, counts, sizes, runs)
            print(f"[{now() - started:.0f} s]")
        if "scale" in only:
            streams = 1000 if quick else 10_000
            results["scale"] = await scale_scenario(url, admin, streams, 3, 10, runs)
            print(f"[{now() - started:.0f} s]")
        if "http" in only:
            count = 2000 if quick else 20_000
            results["http"] = await http_scenario(url, count, 64, max(runs, 3 if quick else 5))
            print(f"[{now() - started:.0f} s]")
        if "replay" in only:
            mib = 4 if quick else 40
            widths = [64, 65_536]
            results["replay"] = await replay_scenario(url, mib, widths, runs, http=True)
            print(f"[{now() - started:.0f} s]")
        await admin.aclose()
    finally:
        if process is not None:
            process.terminate()
    report["elapsed_s"] = now() - started
    path = Path(args.json or RESULTS_DIR / ("scenarios-quick.json" if quick else "scenarios.json"))
    await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
    await anyio.Path(path).write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {path} in {report['elapsed_s']:.0f} s")


# Side by side with a baseline (--baseline REF): each scenario in a child process per code


def ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}" if before else "-"


def compare_fanout(before: dict[str, Any], after: dict[str, Any]) -> list[list[str]]:
    rows = []
    for mode, by_n in after.items():
        for n, entry in by_n.items():
            a, b = entry["median"], before[mode][n]["median"]
            rows.append(
                [
                    FANOUT_MODES[mode],
                    n,
                    f"{b['publish_per_live_chunk']:.3f} / {a['publish_per_live_chunk']:.3f}",
                    si(b["deliveries_per_s"]),
                    si(a["deliveries_per_s"]),
                    ratio(a["deliveries_per_s"], b["deliveries_per_s"]),
                    f"{b['latency_p50_ms']:.2f}",
                    f"{a['latency_p50_ms']:.2f}",
                    f"{b['latency_p99_ms']:.2f}",
                    f"{a['latency_p99_ms']:.2f}",
                    "yes" if a["ok"] and b["ok"] else f"{b['ok']} / {a['ok']}",
                ]
            )
    return rows


FANOUT_HEADER = [
    "source",
    "followers",
    "PUBLISH / live chunk (before / after)",
    "deliveries/s before",
    "after",
    "after / before",
    "p50 ms before",
    "after",
    "p99 ms before",
    "after",
    "texts exact",
]


def compare_scale(before: dict[str, Any], after: dict[str, Any]) -> list[list[str]]:
    """Bare tasks run in both children: their difference is the noise between the two runs."""
    bare_b, lib_b = before["bare_tasks"]["median"], before["library_redis"]["median"]
    bare_a, lib_a = after["bare_tasks"]["median"], after["library_redis"]["median"]
    kib = 1024
    rows: list[list[str]] = []

    def row(label: str, key: str, show: Callable[[float], str], bare: bool = True) -> None:
        bares = [show(bare_b[key]), show(bare_a[key])] if bare else ["-", "-"]
        values = [show(lib_b[key]), show(lib_a[key]), ratio(lib_a[key], lib_b[key])]
        rows.append([label, *bares, *values])

    def share(lib: dict[str, Any], bare: dict[str, Any]) -> float:
        # Within one child's run: the library's streams minus the same sources read bare.
        value: float = lib["bytes_per_stream"] - bare["bytes_per_stream"]
        return value

    row(
        "Redis connections (CLIENT LIST, admin excluded)", "redis_connections", "{:g}".format, False
    )
    row(
        "streams live (request channels subscribed)",
        "request_channels_subscribed",
        "{:,.0f}".format,
        False,
    )
    row(
        "Python memory per stream, all included", "bytes_per_stream", lambda v: f"{v / kib:.2f} KiB"
    )
    row(
        "same, beyond its text",
        "bytes_per_stream_beyond_text",
        lambda v: f"{v / kib:.2f} KiB",
    )
    shares = share(lib_b, bare_b), share(lib_a, bare_a)
    rows.append(
        [
            "the library's share (library - bare tasks, same run)",
            "",
            "",
            f"{shares[0] / kib:.2f} KiB",
            f"{shares[1] / kib:.2f} KiB",
            ratio(shares[1], shares[0]),
        ]
    )
    row("CPU per chunk (one loop turn each)", "cpu_us_per_chunk", lambda v: f"{v:.2f} µs")
    row("chunks/s in that phase", "chunks_per_s", si)
    row("time to start all streams", "start_all_s", lambda v: f"{v:.2f} s")
    row("time to end all streams", "end_all_s", lambda v: f"{v:.2f} s")
    return rows


SCALE_HEADER = [
    "metric",
    "bare tasks (before's run)",
    "bare tasks (after's run)",
    "library before",
    "library after",
    "after / before (library)",
]


def compare_http(before: dict[str, Any], after: dict[str, Any]) -> list[list[str]]:
    rows = []
    for every in HTTP_EVERY:
        b, a = before[f"every_{every}"]["median"], after[f"every_{every}"]["median"]
        for name, (_, label) in VARIANTS.items():
            key = f"{name}_ratio"
            rows.append(
                [
                    f"{every}" if name == "plain" else "",
                    label,
                    si(b[f"{name}_events_per_s"]),
                    si(a[f"{name}_events_per_s"]),
                    ratio(a[f"{name}_events_per_s"], b[f"{name}_events_per_s"]),
                    "1" if key not in b else f"{b[key]:.2f}",
                    "1" if key not in a else f"{a[key]:.2f}",
                    "" if key not in a else ratio(a[key], b[key]),
                    "yes" if a[f"{name}_ok"] and b[f"{name}_ok"] else "NO",
                ]
            )
    return rows


HTTP_HEADER = [
    "loop turn every N chunks",
    "response",
    "events/s before",
    "after",
    "after / before",
    "ratio to plain before (median of per-run ratios)",
    "after",
    "after / before (ratio to plain)",
    "events byte-identical (cursor frame aside)",
]


def compare_replay(before: dict[str, Any], after: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, entry in after.items():
        a, b = entry["median"], before[key]["median"]
        how, _, width_text = key.partition("_width_")
        returned = "returned_ms" in a
        rows.append(
            [
                how.replace("http_", "over HTTP: ").replace("_", " "),
                f"{int(width_text):,}",
                f"{b['returned_ms']:.0f}" if returned else "-",
                f"{a['returned_ms']:.0f}" if returned else "-",
                f"{b['last_byte_ms']:.0f}",
                f"{a['last_byte_ms']:.0f}",
                ratio(a["last_byte_ms"], b["last_byte_ms"]),
                "yes" if a["ok"] and b["ok"] else f"{b['ok']} / {a['ok']}",
            ]
        )
    return rows


REPLAY_HEADER = [
    "stream",
    "chunk chars",
    "call → returned ms before",
    "after",
    "call → last byte ms before",
    "after",
    "after / before (last byte)",
    "exact",
]

COMPARISONS = {
    "fanout": ("fan-out: one live stream on Redis, followers over 5 contexts", FANOUT_HEADER),
    "scale": ("scale: live streams in one process", SCALE_HEADER),
    "http": ("http: SSE events through uvicorn to httpx", HTTP_HEADER),
    "replay": ("replay: resume at offset 0 from another context, on Redis", REPLAY_HEADER),
}
COMPARE: dict[str, Callable[[dict[str, Any], dict[str, Any]], list[list[str]]]] = {
    "fanout": compare_fanout,
    "scale": compare_scale,
    "http": compare_http,
    "replay": compare_replay,
}


def side_by_side(args: argparse.Namespace) -> None:
    """Every scenario once with the library as of `args.baseline` ("before") and once with this
    checkout's ("after"), each in a child process (this file, `--only SCENARIO`) that imports
    its copy through PYTHONPATH, alternating which goes first, against one redis-server."""
    started = now()
    only = [name for name in SCENARIOS if not args.only or name in args.only.split(",")]
    reports: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        roots = {"before": stack.enter_context(library_at(args.baseline)), "after": REPO}
        versions = {"before": code_version(args.baseline), "after": code_version()}
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        process, url = start_redis()
        stack.callback(process.terminate)
        for i, scenario in enumerate(only):
            for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                out = scratch / f"{name}-{scenario}.json"
                command = [sys.executable, __file__, "--only", scenario, "--redis-url", url]
                command += ["--json", str(out), *(["--quick"] if args.quick else [])]
                command += ["--runs", str(args.runs)] if args.runs else []
                print(f"\n## [{now() - started:.0f} s] {scenario}: {name} ({versions[name]})")
                sys.stdout.flush()
                # The HTTP server this child starts inherits its environment, so its copy too.
                subprocess.run(command, env=env_importing(roots[name]), check=True)
                child = json.loads(out.read_text())
                check_imported(child["module_file"], roots[name], name)
                report = reports.setdefault(name, {"code": versions[name], "results": {}})
                for key in ("impl", "module_file", "date", "machine"):
                    report.setdefault(key, child[key])
                report.setdefault("params", {}).update(child["params"])
                report["results"].update(child["results"])
                report.setdefault("elapsed_s", {})[scenario] = child["elapsed_s"]
    tables: dict[str, Any] = {}
    for scenario in only:
        title, header = COMPARISONS[scenario]
        rows = COMPARE[scenario](
            reports["before"]["results"][scenario], reports["after"]["results"][scenario]
        )
        title = f"{title}: before ({versions['before']}) and after ({versions['after']})"
        print_table(title, header, rows)
        tables[scenario] = {"title": title, "header": header, "rows": rows}
    suffix = "-quick" if args.quick else ""
    combined = {
        "date": time.strftime("%Y-%m-%d"),
        "baseline": args.baseline,
        "codes": versions,
        "elapsed_s": now() - started,
        "tables": tables,
    }
    files = {
        RESULTS_DIR / f"scenarios{suffix}.json": reports["after"],
        RESULTS_DIR / f"scenarios{suffix}-before.json": reports["before"],
        Path(args.json or RESULTS_DIR / f"scenarios{suffix}-compare.json"): combined,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    for path, data in files.items():
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    print(f"\nwritten to {', '.join(map(str, files))} in {now() - started:.0f} s")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke check")
    parser.add_argument("--only", help="comma-separated: fanout,scale,http,replay")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, 1 with --quick)")
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--profile", help="write pyinstrument reports into this directory")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="run every scenario with the library as of this git ref too, side by side",
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--http-chunks", type=int, default=20_000, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--profile-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        args.profile = args.profile_file
        serve(args)
    elif args.baseline:
        if args.profile:
            parser.error("--profile and --baseline do not go together")
        side_by_side(args)
    else:
        anyio.run(main, args)


if __name__ == "__main__":
    cli()
