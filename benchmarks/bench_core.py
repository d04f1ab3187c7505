"""Core benchmark: throughput against a no-library baseline, and Redis commands per stream.

Usage: python benchmarks/bench_core.py [--chunks 10000] [--width 64] [--runs 5] [--json FILE]

Starts its own redis-server on a free loopback port. The workload is the one shared with the
reference (../shared/benchmarks/WORKLOAD.md): N chunks of W ASCII characters. Figures are
medians of --runs runs in one process; ratios are against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio

import resumable_stream as rs
from resumable_stream.redis import RedisBackend

# The checkout this file belongs to: its `resumable_stream/` is "the code under test".
REPO = Path(__file__).resolve().parent.parent
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_ADMIN = {"info", "client|info", "client|setinfo", "hello", "ping", "select"}
Source = Callable[[], AsyncIterator[str]]


def chunk(i: int, width: int) -> str:
    return f"{i:08d}:" + "".join(ALPHABET[(i + k) % 62] for k in range(width - 9))


def make_source(chunks: list[str], gate: tuple[int, anyio.Event] | None = None) -> Source:
    async def source() -> AsyncIterator[str]:
        for i, c in enumerate(chunks):
            if gate is not None and i == gate[0]:
                await gate[1].wait()
            yield c

    return source


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("redis-server") or sys.exit("redis-server is not installed")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        [binary, *args, "--dir", tempfile.mkdtemp()], stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    process.kill()
    sys.exit("redis-server did not start")


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def code_version(ref: str | None = None) -> str:
    """`ref` as a short commit; without it, the checkout's library: the last commit that changed
    `resumable_stream/` (not HEAD, which moves with every commit to the benchmarks), with
    "-dirty" if the package has uncommitted edits."""
    if ref is not None:
        return git("rev-parse", "--short", f"{ref}^{{commit}}")
    dirty = git("status", "--porcelain", "--", "resumable_stream")
    last = git("log", "-1", "--format=%h", "HEAD", "--", "resumable_stream")
    return last + ("-dirty" if dirty else "")


@contextlib.contextmanager
def library_at(ref: str) -> Iterator[Path]:
    """A directory whose `resumable_stream/` is the library as of git `ref`, for PYTHONPATH.

    `git archive` into a temporary directory outside the repository, rather than a `git
    worktree`: only the package is needed, and a run that is killed leaves no worktree
    registered in a repository that other people work in.
    """
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "resumable_stream"],
        capture_output=True,
        check=True,
    ).stdout
    directory = Path(tempfile.mkdtemp(prefix=f"resumable-stream-{commit[:8]}-"))
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(directory, filter="data")
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def env_importing(root: Path) -> dict[str, str]:
    """The environment for a subprocess whose `import resumable_stream` finds `root`'s copy.

    PYTHONPATH comes before site-packages, where the editable install points at whichever
    checkout it was made from (possibly one that someone else is editing); so the code under
    test is pinned this way too, not only the baseline.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def check_imported(module_file: str, root: Path, who: str) -> None:
    """Exit unless a subprocess imported the library from `root` (it reports its `__file__`)."""
    if not Path(module_file).resolve().is_relative_to(root.resolve()):
        sys.exit(f"{who} imported resumable_stream from {module_file}, not from {root}")


async def commandstats(client: redis.asyncio.Redis) -> Counter[str]:
    info = await client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items()})


async def baseline(chunks: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    n = 0
    async for _ in make_source(chunks)():
        n += 1
    total = time.perf_counter() - start
    return {"total_ms": total * 1e3, "chunks_per_s": n / total}


async def produce_consume(ctx: rs.ResumableStreamContext, chunks: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    stream = await ctx.resumable_stream(uuid.uuid4().hex, make_source(chunks))
    assert stream is not None
    first = await stream.__anext__()
    ttfc = time.perf_counter() - start
    text = [first] + [c async for c in stream]
    total = time.perf_counter() - start
    return {
        "ttfc_ms": ttfc * 1e3,
        "total_ms": total * 1e3,
        "chunks_per_s": len(chunks) / total,
        "ok": text == chunks,
    }


async def resume_gated(
    p_ctx: rs.ResumableStreamContext,
    c_ctx: rs.ResumableStreamContext,
    chunks: list[str],
    width: int,
) -> dict[str, Any]:
    k = len(chunks) // 2
    gate = anyio.Event()
    stream_id = uuid.uuid4().hex
    own = await p_ctx.resumable_stream(stream_id, make_source(chunks, (k, gate)))
    assert own is not None
    got = [await own.__anext__() for _ in range(k)]
    offset = k * width - 17
    start = time.perf_counter()
    follower = await c_ctx.resumable_stream(stream_id, make_source([]), offset)
    ack = time.perf_counter() - start
    assert follower is not None
    gate_open = time.perf_counter()
    gate.set()
    got += [c async for c in own]
    producer_done = time.perf_counter() - gate_open
    text = "".join([c async for c in follower])
    return {
        "resume_ack_ms": ack * 1e3,
        "producer_live_chunks_per_s_with_1_listener": (len(chunks) - k) / producer_done,
        "follower_ok": text == "".join(chunks)[offset:],
        "producer_ok": got == chunks,
    }


async def commands_with_followers(
    url: str, admin: redis.asyncio.Redis, followers: int, live: int
) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex}"
    async with (
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix) as p_ctx,
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix) as c_ctx,
    ):
        gate = anyio.Event()
        chunks = [f"{i};" for i in range(live + 1)]
        before = await commandstats(admin)
        own = await p_ctx.resumable_stream("s", make_source(chunks, (1, gate)))
        assert own is not None
        await own.__anext__()
        readers = [await c_ctx.resumable_stream("s", make_source([])) for _ in range(followers)]
        gate.set()
        rest = [c async for c in own]
        for reader in readers:
            assert reader is not None
            assert "".join([c async for c in reader]) == "".join(chunks)
        delta = await commandstats(admin) - before
    delta = Counter({k: v for k, v in delta.items() if k not in _ADMIN})
    return {
        "followers": followers,
        "live_chunks": len(rest),
        "commands": dict(sorted(delta.items())),
        "publish_per_live_chunk": delta["publish"] / max(len(rest), 1),
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key: the median of numbers, whether all runs were true for flags; others dropped."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if isinstance(values[0], bool):
            out[key] = all(values)
        elif isinstance(values[0], int | float):
            out[key] = statistics.median(values)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    chunks = [chunk(i, args.width) for i in range(args.chunks)]
    process, url = start_redis()
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, result: dict[str, Any]) -> None:
        runs.setdefault(name, []).append(result)

    try:
        admin = redis.asyncio.Redis.from_url(url)
        memory = rs.MemoryBackend()
        async with (
            rs.ResumableStreamContext(backend=memory) as mem_p,
            rs.ResumableStreamContext(backend=memory) as mem_c,
            rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix="b") as red_p,
            rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix="b") as red_c,
        ):
            for ctx in (mem_p, red_p):  # warm-up
                await produce_consume(ctx, chunks[:3])
            for _ in range(args.runs):
                record("baseline_no_library", await baseline(chunks))
                record("produce_consume_memory", await produce_consume(mem_p, chunks))
                record("produce_consume_redis", await produce_consume(red_p, chunks))
                record("resume_gated_memory", await resume_gated(mem_p, mem_c, chunks, args.width))
                record("resume_gated_redis", await resume_gated(red_p, red_c, chunks, args.width))
        fanout = [await commands_with_followers(url, admin, n, 1000) for n in (0, 1, 20)]
        await admin.aclose()
    finally:
        process.terminate()
    medians = {name: median_of(results) for name, results in runs.items()}
    base = medians["baseline_no_library"]["chunks_per_s"]
    print(f"{'scenario':26} {'metric (median)':44} {'value':>12}")
    for name, metrics in medians.items():
        for metric, value in metrics.items():
            shown = f"{value:12.2f}" if isinstance(value, float) else f"{value!s:>12}"
            print(f"{name:26} {metric:44} {shown}")
        if "chunks_per_s" in metrics and name != "baseline_no_library":
            ratio = metrics["chunks_per_s"] / base
            print(f"{name:26} {'chunks/s ratio to baseline (same run)':44} {ratio:12.3f}")
    print()
    for row in fanout:
        print(
            f"followers={row['followers']:>2}  live chunks={row['live_chunks']}  "
            f"publish per live chunk={row['publish_per_live_chunk']:.3f}  {row['commands']}"
        )
    if args.json:
        report = {
            "impl": f"python:resumable-streams@{rs.__version__}",
            "params": vars(args),
            "results": {k: {"runs": v, "median": medians[k]} for k, v in runs.items()},
            "fanout": fanout,
        }
        await anyio.Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    anyio.run(main)
