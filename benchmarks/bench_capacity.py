"""Capacity over HTTP: how many concurrent chat streams one uvicorn process serves, per token delay.

Usage: python benchmarks/bench_capacity.py [--streams 100,500,1000,2000] [--duration 10]
       [--variants plain,memory,redis] [--servers uvloop,asyncio] [--followers]
       [--client-processes 2]

Starts its own redis-server on a free loopback port and, per server kind, one uvicorn process
(this file with `--serve`): "uvloop" is uvloop + httptools (what `uvicorn[standard]` runs),
"asyncio" the default asyncio loop + h11 (plain `uvicorn`). Each stream is a source that emits a
4-character token every 25 ms (40 tokens/s) for `--duration` seconds, sent as SSE. Variants:

- plain: a Starlette `StreamingResponse` of that source, formatted as the same SSE frames (no
  library, not resumable);
- memory / redis: `EventStreamResponse` on the in-memory backend / on Redis;
- with `--followers`, also memory+follower / redis+follower: a second viewer per stream. On
  Redis it reads through the server's second context on the same Redis, so every token travels
  through pub/sub as it would to another worker; in memory it is a second local reader.

The clients are other processes (this file with `--client`): raw asyncio sockets on uvloop, one
connection per stream, opened evenly over the ramp; each token's delay is the time its frame was
read minus its schedule (the request's send time + 100 ms + k x 25 ms; wall clock, same machine).
Per N: the server's CPU (from /proc, over the run) and the clients' (each reports its own), the
p50 / p99 / max delay over every token of every stream, the tokens missing, and per variant the
largest N with p99 <= 100 ms. Variants alternate in rotating order at each N (and again at each
of `--repeat` runs of a point, whose median p99 decides); a variant stops escalating once its
p99 passed 100 ms. Prints Markdown and writes
`benchmarks/results/capacity.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from bench_core import REPO, code_version, start_redis

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

TOKEN = "tok "  # 4 characters
EVERY = 0.025  # a token every 25 ms: 40 tokens/s
LEAD = 0.1  # the first token is due 100 ms after the request (a model's time to first token)
TARGET_P99_MS = 100.0
BUCKET_MS = 0.5  # delay histogram resolution
BUCKETS = 40_000  # up to 20 s; later ones go to the last bucket
SERVERS = {"uvloop": ("uvloop", "httptools"), "asyncio": ("asyncio", "h11")}
PATHS = {
    "plain": "/plain/{id}",
    "memory": "/ours/memory/{id}",
    "redis": "/ours/redis/{id}",
}
FOLLOW_PATHS = {"memory": "/ours/memory/{id}", "redis": "/follow/redis/{id}"}


# The server


def serve(args: argparse.Namespace) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    import resumable_stream as rs
    from resumable_stream.redis import RedisBackend
    from resumable_stream.starlette import EventStreamResponse

    def source(t0: float, count: int) -> Callable[[], AsyncIterator[str]]:
        async def tokens() -> AsyncIterator[str]:
            # t0 is wall-clock time (the client's); the loop's clock is monotonic.
            start = anyio.current_time() + (t0 - time.time())
            for k in range(count):
                await anyio.sleep_until(start + k * EVERY)
                yield TOKEN

        return tokens

    def make(request: Request) -> Callable[[], AsyncIterator[str]]:
        q = request.query_params
        return source(float(q["t0"]), int(q["count"]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        prefix = f"cap-{uuid.uuid4().hex[:8]}"

        def on_redis() -> rs.ResumableStreamContext:
            return rs.ResumableStreamContext(
                backend=RedisBackend(args.redis_url), key_prefix=prefix
            )

        async with (
            rs.ResumableStreamContext(backend=rs.MemoryBackend()) as memory,
            on_redis() as producer,
            on_redis() as resumer,
        ):
            yield {"memory": memory, "producer": producer, "resumer": resumer}

    async def plain(request: Request) -> Response:
        tokens = make(request)

        async def frames() -> AsyncIterator[str]:
            offset = 0
            async for c in tokens():
                offset += len(c)
                yield f"id: {offset}\ndata: {c}\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    async def ours(request: Request) -> Response:
        backend = request.path_params["backend"]
        ctx = request.state.memory if backend == "memory" else request.state.producer
        return EventStreamResponse(ctx, request.path_params["id"], make(request))

    async def follow(request: Request) -> Response:
        return EventStreamResponse(request.state.resumer, request.path_params["id"])

    app = Starlette(
        routes=[
            Route("/plain/{id}", plain),
            Route("/ours/{backend}/{id}", ours),
            Route("/follow/redis/{id}", follow),
            Route("/ping", lambda request: Response("pong")),
        ],
        lifespan=lifespan,
    )
    loop, http = SERVERS[args.serve]
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
        # uvicorn raises the SIGTERM it caught again once it has shut down: exit normally then,
        # so that the profile is written.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run_server(app, loop, http, args.port)
    finally:
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)


def run_server(app: Any, loop: str, http: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop=loop,
        http=http,
        log_level="warning",
        backlog=8192,
        timeout_keep_alive=60,
    )


# The clients


class Reader(asyncio.Protocol):
    """One SSE response: counts `data:` lines in complete frames and records their delays."""

    def __init__(self, request: bytes, t0: float, hist: list[int], done: asyncio.Future[Any]):
        self.request, self.t0, self.hist, self.done = request, t0, hist, done
        self.buf = b""
        self.k = 0
        self.status = b""
        self.max_delay = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but they write().
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self.status:
            self.status = data[9:12]
        buf = self.buf + data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.buf = buf
            return
        n = buf.count(b"data:", 0, end)
        self.buf = buf[end + 2 :]
        hist, t0 = self.hist, self.t0
        for _ in range(n):
            delay = now - (t0 + self.k * EVERY)
            self.k += 1
            if delay > self.max_delay:
                self.max_delay = delay
            hist[min(max(int(delay * 1000 / BUCKET_MS), 0), BUCKETS - 1)] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def client(args: argparse.Namespace) -> dict[str, Any]:
    spec = json.loads(args.client)
    loop = asyncio.get_running_loop()
    hist = [0] * BUCKETS
    count = spec["count"]
    streams: list[tuple[str, str | None]] = spec["streams"]  # (path, follower path)
    start = spec["start"]
    spacing = spec["ramp"] / max(len(streams), 1)
    readers: list[Reader] = []
    errors: list[str] = []
    cpu0 = os.times()

    async def one(path: str, t0: float, retry_204: bool) -> None:
        for _ in range(100):
            done: asyncio.Future[Any] = loop.create_future()
            request = (
                f"GET {path}?t0={t0!r}&count={count} HTTP/1.1\r\nHost: bench\r\n"
                "Accept: text/event-stream\r\nConnection: close\r\n\r\n"
            ).encode()
            reader = Reader(request, t0, hist, done)
            try:
                await loop.create_connection(lambda r=reader: r, "127.0.0.1", spec["port"])  # type: ignore[misc]
            except OSError as exc:
                errors.append(f"connect: {exc}")
                return
            await done
            if reader.status == b"204" and retry_204:
                await asyncio.sleep(0.05)  # the stream did not start yet: ask again
                continue
            if reader.status != b"200":
                errors.append(f"status {reader.status!r}")
            readers.append(reader)
            return

    async def stream(i: int, path: str, follow: str | None) -> None:
        delay = start + i * spacing - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = time.time() + LEAD
        sid = uuid.uuid4().hex
        tasks = [one(path.format(id=sid), t0, False)]
        if follow is not None:

            async def second() -> None:
                await asyncio.sleep(0.05)  # the second viewer comes a moment later
                await one(follow.format(id=sid), t0, True)

            tasks.append(second())
        await asyncio.gather(*tasks)

    await asyncio.gather(*(stream(i, p, f) for i, (p, f) in enumerate(streams)))
    cpu1 = os.times()
    expected = count * sum(1 if f is None else 2 for _, f in streams)
    return {
        "hist": {str(i): v for i, v in enumerate(hist) if v},
        "tokens": sum(r.k for r in readers),
        "expected": expected,
        "max_delay_ms": max((r.max_delay for r in readers), default=0.0) * 1e3,
        "errors": errors[:5],
        "error_count": len(errors),
        "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
    }


# The orchestrator


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def percentile(hist: dict[int, int], q: float) -> float:
    total = sum(hist.values())
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 1) * BUCKET_MS  # the bucket's upper edge
    return float("nan")


def wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.05)
    sys.exit("the server did not start")


def run_point(
    args: argparse.Namespace, server: subprocess.Popen[bytes], port: int, variant: str, n: int
) -> dict[str, Any]:
    base, _, follow = variant.partition("+")
    path = PATHS[base]
    follow_path = FOLLOW_PATHS[base] if follow else None
    count = round(args.duration / EVERY)
    ramp = max(1.0, n / 1000)
    start = time.time() + 0.5
    k = args.client_processes
    streams = [(path, follow_path)] * n
    clients = []
    for i in range(k):
        spec = {
            "port": port,
            "count": count,
            "streams": streams[i::k],
            "start": start + i * ramp / n,
            "ramp": ramp,
        }
        out = Path(tempfile.mkstemp(prefix="capacity-client-", suffix=".json")[1])
        command = [sys.executable, __file__, "--client", json.dumps(spec), "--out", str(out)]
        clients.append((subprocess.Popen(command), out))
    load = loadavg()
    cpu0, wall0 = proc_cpu(server.pid), time.monotonic()
    reports = []
    for client_process, out in clients:
        # The report goes through a file: a pipe lost the end of large ones.
        client_process.wait(timeout=args.duration + ramp + 120)
        reports.append(json.loads(out.read_text()))
        out.unlink()
    cpu1, wall1 = proc_cpu(server.pid), time.monotonic()
    hist: dict[int, int] = {}
    for r in reports:
        for bucket, v in r["hist"].items():
            hist[int(bucket)] = hist.get(int(bucket), 0) + v
    tokens = sum(r["tokens"] for r in reports)
    expected = sum(r["expected"] for r in reports)
    wall = wall1 - wall0
    return {
        "variant": variant,
        "streams": n,
        "wall_s": wall,
        "server_cpu_pct": (cpu1 - cpu0) / wall * 100,
        "client_cpu_pct": sum(r["cpu_s"] for r in reports) / wall * 100,
        "p50_ms": percentile(hist, 0.50),
        "p99_ms": percentile(hist, 0.99),
        "max_ms": max(r["max_delay_ms"] for r in reports),
        "tokens": tokens,
        "missing": expected - tokens,
        "errors": sum(r["error_count"] for r in reports),
        "error_samples": [e for r in reports for e in r["errors"]][:5],
        "loadavg_before": load,
    }


def start_server(
    kind: str, redis_url: str, profile: str | None
) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))  # the code under test: this checkout's
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    if profile:
        command += ["--profile", f"{profile}.{kind}"]
    server = subprocess.Popen([*command, "--redis-url", redis_url], env=env)
    wait_listening(port)
    return server, port


def markdown(rows: list[dict[str, Any]]) -> str:
    header = [
        "server",
        "variant",
        "streams",
        "server CPU",
        "clients' CPU",
        "delay p50 ms",
        "p99 ms (each run)",
        "max ms",
        "tokens missing",
        "p99 ≤ 100 ms",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [
            r["server"],
            r["variant"],
            f"{r['streams']:,}",
            f"{r['server_cpu_pct']:.0f}%",
            f"{r['client_cpu_pct']:.0f}%",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}"
            + (
                f" ({', '.join(f'{v:.0f}' for v in r['p99_runs_ms'])})"
                if len(r.get("runs", ())) > 1
                else ""
            ),
            f"{r['max_ms']:.0f}",
            f"{r['missing']:,}" + (f" ({r['errors']} errors)" if r["errors"] else ""),
            "yes" if ok(r) else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for the repetitions of a point: medians (max: the largest), sums of losses."""
    row = dict(runs[0])
    for key in ("p50_ms", "p99_ms", "server_cpu_pct", "client_cpu_pct", "loadavg_before"):
        row[key] = statistics.median(r[key] for r in runs)
    row["max_ms"] = max(r["max_ms"] for r in runs)
    row["missing"] = sum(r["missing"] for r in runs)
    row["errors"] = sum(r["errors"] for r in runs)
    row["p99_runs_ms"] = [r["p99_ms"] for r in runs]
    row["runs"] = runs
    return row


def ok(r: dict[str, Any]) -> bool:
    return bool(r["p99_ms"] <= TARGET_P99_MS and r["missing"] == 0 and not r["errors"])


def orchestrate(args: argparse.Namespace) -> None:
    started = time.monotonic()
    grid = [int(x) for x in args.streams.split(",")]
    variants = args.variants.split(",")
    if args.followers:
        variants += [f"{v}+follower" for v in variants if v in FOLLOW_PATHS]
    rows: list[dict[str, Any]] = []
    redis_process, redis_url = start_redis()
    try:
        for kind in args.servers.split(","):
            server, port = start_server(kind, redis_url, args.profile)
            try:
                alive = list(variants)
                for i, n in enumerate(grid):
                    if not alive:
                        break
                    order = alive[i % len(alive) :] + alive[: i % len(alive)]
                    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in order}
                    for rep in range(args.repeat):
                        # Rotated again at each repetition: no variant always follows another.
                        for variant in order[rep % len(order) :] + order[: rep % len(order)]:
                            row = {"server": kind} | run_point(args, server, port, variant, n)
                            runs[variant].append(row)
                            print(
                                f"[{time.monotonic() - started:5.0f} s] {kind} {variant} N={n}: "
                                f"p50 {row['p50_ms']:.1f} p99 {row['p99_ms']:.1f} max "
                                f"{row['max_ms']:.0f} ms, server CPU {row['server_cpu_pct']:.0f}%,"
                                f" clients {row['client_cpu_pct']:.0f}%, missing "
                                f"{row['missing']}, load {row['loadavg_before']:.2f}",
                                flush=True,
                            )
                            time.sleep(args.pause)
                    for variant in order:
                        row = combined(runs[variant])
                        rows.append(row)
                        if not ok(row):
                            alive.remove(variant)
            finally:
                server.terminate()
                server.wait(30)
    finally:
        redis_process.terminate()
        redis_process.wait(10)
    capacity: dict[str, dict[str, int]] = {}
    for r in rows:
        best = capacity.setdefault(r["server"], {}).setdefault(r["variant"], 0)
        if ok(r) and r["streams"] > best:
            capacity[r["server"]][r["variant"]] = r["streams"]
    print()
    print(markdown(rows))
    print()
    for kind, by_variant in capacity.items():
        plain = by_variant.get("plain")
        parts = []
        for variant, best in by_variant.items():
            ratio = f" ({best / plain:.2f}x plain)" if plain and variant != "plain" else ""
            parts.append(f"{variant} {best:,}{ratio}")
        print(f"largest N with p99 <= 100 ms, {kind}: " + ", ".join(parts))
    elapsed = time.monotonic() - started
    print(f"total {elapsed:.0f} s")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "code": code_version(),
        "params": {k: v for k, v in vars(args).items() if k not in ("serve", "client", "port")},
        "largest_n_p99_le_100ms": capacity,
        "rows": rows,
        "total_s": round(elapsed, 1),
    }
    name = args.json or "capacity.json"
    (RESULTS_DIR / name).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote benchmarks/results/{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", default="100,500,1000,2000", help="the N grid")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of tokens a stream")
    parser.add_argument("--variants", default="plain,memory,redis")
    standard = all(importlib.util.find_spec(m) is not None for m in ("uvloop", "httptools"))
    parser.add_argument(
        "--servers",
        default="uvloop,asyncio" if standard else "asyncio",
        help="uvloop (uvloop+httptools, the default when installed), asyncio (asyncio+h11)",
    )
    parser.add_argument("--followers", action="store_true", help="also a second viewer per stream")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per point (median p99)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between runs")
    parser.add_argument("--json", help="file name under benchmarks/results/")
    parser.add_argument("--profile", help="the server runs under cProfile, stats to this file")
    parser.add_argument("--serve", choices=list(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
    elif args.client:
        try:
            import uvloop

            report = uvloop.run(client(args))
        except ImportError:
            report = asyncio.run(client(args))
        Path(args.out).write_text(json.dumps(report) + "\n")
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
