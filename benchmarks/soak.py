"""Soak: many concurrent streams on a real Redis, with chaos, then a check for leaks.

    python benchmarks/soak.py [--streams 1000] [--duration 60] [--workers 3]

Starts its own redis-server on a free loopback port. Every stream has a known text; readers
drop and resume at random, followers join at random offsets, some streams are cancelled, and
Redis is restarted once in the middle. At the end: every reader that completed got exactly its
expected text, no pub/sub channel is left (PUBSUB CHANNELS), every key has a TTL, and no task
is left running. Prints the figures as JSON; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import anyio
import redis.asyncio

import resumable_stream as rs
from resumable_stream.redis import RedisBackend


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "redis-server"
    folder = tempfile.mkdtemp(prefix="rs-soak-")
    process = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder),
            *("--appendonly", "no", "--maxclients", "10000"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def text_of(stream: int, chunks: int) -> list[str]:
    return [f"<{stream}:{k}>" for k in range(chunks)]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.random = random.Random(args.seed)
        self.outcomes: Counter[str] = Counter()
        self.mismatches: list[str] = []
        self.started = time.monotonic()
        self.restarted = False

    def expect(self, label: str, got: str, expected: str) -> None:
        if got == expected:
            self.outcomes[f"{label} exact"] += 1
        else:
            self.outcomes[f"{label} MISMATCH"] += 1
            self.mismatches.append(f"{label}: got {got[:60]!r}..., expected {expected[:60]!r}...")

    async def read(self, stream: rs.ResumableStream | None, limit: int | None = None) -> str:
        assert stream is not None
        got = []
        try:
            async for chunk in stream:
                got.append(chunk)
                if limit is not None and len(got) >= limit:
                    break
        finally:
            await stream.aclose()
        return "".join(got)

    async def one_stream(self, index: int, workers: list[rs.ResumableStreamContext]) -> None:
        rnd = random.Random(self.args.seed * 100_003 + index)
        chunks = text_of(index, rnd.randint(20, 120))
        full = "".join(chunks)
        pace = self.args.duration * 0.6 / len(chunks)
        stream_id = f"soak-{index}"

        async def llm() -> Any:
            for chunk in chunks:
                await anyio.sleep(rnd.uniform(0, 2 * pace))
                yield chunk

        await anyio.sleep(rnd.uniform(0, self.args.duration * 0.3))
        home = rnd.choice(workers)
        try:
            stream = await home.resumable_stream(stream_id, llm)
        except rs.ResumableStreamError as exc:
            self.outcomes[f"start {type(exc).__name__}"] += 1
            return
        if stream is None:
            self.outcomes["start None"] += 1
            return
        async with anyio.create_task_group() as tg:
            if rnd.random() < 0.3:
                tg.start_soon(self.follower, stream_id, full, rnd.choice(workers), rnd)
            if rnd.random() < 0.05:
                tg.start_soon(self.canceller, stream_id, rnd.choice(workers), rnd)
            await self.client(stream, stream_id, full, workers, rnd)

    async def client(
        self,
        stream: rs.ResumableStream,
        stream_id: str,
        full: str,
        workers: list[rs.ResumableStreamContext],
        rnd: random.Random,
    ) -> None:
        """The first reader: drops now and then and resumes where it stopped, elsewhere."""
        received = ""
        current: rs.ResumableStream | None = stream
        try:
            while current is not None:
                drop = rnd.random() < 0.3
                received += await self.read(current, rnd.randint(1, 30) if drop else None)
                if not drop:
                    break
                self.outcomes["client drops"] += 1
                current = await rnd.choice(workers).resume_existing_stream(stream_id, len(received))
            if current is None and received != full and self.restarted:
                # Redis restarted without persistence: the stream's state is gone, and the
                # library says so (None) rather than inventing an ending.
                self.outcomes["client: stream unknown after the restart"] += 1
                return
            self.expect("client", received, full)
        except rs.ResumableStreamError as exc:
            self.outcomes[f"client {type(exc).__name__}"] += 1
            if not full.startswith(received):
                self.mismatches.append(f"client of {stream_id}: not a prefix")

    async def follower(
        self, stream_id: str, full: str, ctx: rs.ResumableStreamContext, rnd: random.Random
    ) -> None:
        await anyio.sleep(rnd.uniform(0, self.args.duration * 0.3))
        offset = rnd.randint(0, len(full))
        try:
            stream = await ctx.resume_existing_stream(stream_id, offset)
            if stream is None:
                self.outcomes["follower None (finished or unknown)"] += 1
                return
            self.expect("follower", await self.read(stream), full[offset:])
        except rs.ResumableStreamError as exc:
            self.outcomes[f"follower {type(exc).__name__}"] += 1

    async def canceller(
        self, stream_id: str, ctx: rs.ResumableStreamContext, rnd: random.Random
    ) -> None:
        await anyio.sleep(rnd.uniform(0, self.args.duration * 0.5))
        try:
            await ctx.cancel_stream(stream_id)
            self.outcomes["cancels"] += 1
        except rs.ResumableStreamError as exc:
            self.outcomes[f"cancel {type(exc).__name__}"] += 1


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port)
    run = Soak(args)
    options: dict[str, Any] = {"key_prefix": "soak", "linger": 2.0, "drain_timeout": 10.0}
    try:
        async with (
            redis.asyncio.Redis.from_url(url) as admin,
            anyio.create_task_group() as outer,
        ):
            workers = [
                rs.ResumableStreamContext(backend=RedisBackend(url), **options)
                for _ in range(args.workers)
            ]
            async with workers[0], workers[1], workers[2]:

                async def restart() -> None:
                    nonlocal server
                    await anyio.sleep(args.duration * 0.5)
                    run.restarted = True
                    server.terminate()
                    server.wait()
                    run.outcomes["redis restarts"] += 1
                    server = start_redis(port)

                outer.start_soon(restart)
                with anyio.fail_after(args.duration * 4 + 60):
                    async with anyio.create_task_group() as tg:
                        for index in range(args.streams):
                            tg.start_soon(run.one_stream, index, workers)
                clients = await admin.info("clients")
            # The server drops a closed connection's subscriptions when it reads the close,
            # a moment after the client closed it: allow a bounded moment.
            for _ in range(100):  # at most ~5 s
                channels = await admin.pubsub_channels()
                if not channels:
                    break
                await anyio.sleep(0.05)
            clients_after = len(await admin.client_list()) - 1
            keys = [key async for key in admin.scan_iter("soak:*")]
            no_ttl = [key for key in keys if await admin.ttl(key) < 0]
    finally:
        server.terminate()
        server.wait()
    leftover_tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    return {
        "streams": args.streams,
        "duration_s": round(time.monotonic() - run.started, 1),
        "outcomes": dict(sorted(run.outcomes.items())),
        "mismatches": run.mismatches[:10],
        "redis_clients_while_running": clients.get("connected_clients"),
        "redis_clients_after": clients_after,
        "channels_left": [str(c) for c in channels],
        "keys_without_ttl": [str(k) for k in no_ttl],
        "keys_left": len(keys),
        "tasks_left": len(leftover_tasks),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=3, choices=[3])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    report = anyio.run(soak, args)
    print(json.dumps(report, indent=2))
    ok = (
        not report["mismatches"]
        and not report["channels_left"]
        and not report["keys_without_ttl"]
        and report["tasks_left"] == 0
        and report["redis_clients_after"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
