"""Side by side with the Node reference: the shared workload against this library and npm's.

Usage: python benchmarks/bench_compare.py [--processes 3] [--runs 5] [--chunks 10000] [--width 64]
       [--baseline REF | --otel] [--control] [--without-otel-api]

Starts its own redis-server on a free loopback port, installs the reference into
`benchmarks/node/` if it is missing (`npm ci`, versions pinned in its package.json), then runs the
workload of ../shared/benchmarks/WORKLOAD.md in `--processes` Python processes (this file with
`--worker`) and as many Node processes (`benchmarks/node/bench.mjs`), alternately, against that
one server; then a 40 MiB replay once per implementation, bounded by `--replay-timeout` seconds.
Figures are medians over all runs of all processes; ratios are ours / Node from the same run.
Prints one Markdown table and writes `benchmarks/results/compare-{python,node}.json` and
`compare.json`.

With `--baseline REF`, the library as of git REF ("before") is measured in the same run too: its
package is extracted into a temporary directory and a third set of worker processes imports it
(PYTHONPATH), alternating with the others; the table gains a column for it and after / before.
The code under test ("after") is this checkout's `resumable_stream/`, pinned the same way. Each
worker reports the file it imported, and the run stops if it is not the intended copy.

With `--otel`, the telemetry's overhead instead: this checkout three times, alternately, in
processes without an OpenTelemetry SDK (the API's no-op instruments), in processes that install
the SDK's meter provider as the global one (with an in-memory reader, so every measurement is
aggregated, and no exporter), and in processes that also install the SDK's tracer provider (no
span processor: spans are made, then dropped); and a control: processes without the SDK again,
whose ratio to the first shows how far two identical arms differ in the same run (the noise
floor). No Node. Writes `benchmarks/results/otel-overhead.json`.

With `--control`, ours runs a second time in the same run (not with `--otel`, which has its own
control): the again / after column shows how far two runs of one code land apart, the noise to
read after / before against. Writes `compare-python-again.json` too.

With `--without-otel-api`, the Python processes run as if the OpenTelemetry API were not
installed (the base install: `pip install resumable-streams` has only anyio), so the library's
telemetry is off; without it they import the API where it is installed, and report through its
no-op instruments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import redis
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

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"
RESULTS_DIR = HERE / "results"

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# Commands the admin connection issues itself, and (re)connection handshakes.
ADMIN_COMMANDS = {
    "info",
    "client|info",
    "pubsub|numsub",
    "ping",
    "hello",
    "client|setinfo",
    "select",
}
# Set in the environment of the worker processes that install the OpenTelemetry SDK: to
# "metrics" (its meter provider) or "traces" (its tracer provider too).
OTEL_ENV = "RESUMABLE_STREAM_BENCH_OTEL_SDK"
Source = Callable[[], AsyncIterator[str]]
Gate = tuple[int, anyio.Event]


def chunk(i: int, width: int) -> str:
    """WORKLOAD.md's chunk(i, W): `f"{i:08d}:"` + the alphabet rotated by i, W - 9 chars long."""
    n = width - 9
    r = i % 62
    rotated = ALPHABET[r:] + ALPHABET[:r]
    return f"{i:08d}:" + (rotated * -(-n // 62))[:n]


def make_source(chunks: list[str], yield_every: int = 0, gate: Gate | None = None) -> Source:
    if gate is None and not yield_every:

        async def plain() -> AsyncIterator[str]:
            for c in chunks:
                yield c

        return plain

    async def source() -> AsyncIterator[str]:
        for i, c in enumerate(chunks):
            if gate is not None and i == gate[0]:
                await gate[1].wait()
            if yield_every and i % yield_every == 0:
                await asyncio.sleep(0)
            yield c

    return source


def throwing_make() -> AsyncIterator[str]:
    raise AssertionError("a follower must not produce")


now = time.perf_counter


async def read_all(
    stream: AsyncIterator[str], length: float = math.inf
) -> tuple[list[str], float | None, float]:
    """Read to the end: the chunks, when the text reached `length` chars, when it ended."""
    parts: list[str] = []
    size = 0
    last_at: float | None = None
    async for part in stream:
        parts.append(part)
        size += len(part)
        if last_at is None and size >= length:
            last_at = now()
    return parts, last_at, now()


async def delta_since(admin: redis.asyncio.Redis, before: Counter[str]) -> dict[str, int]:
    await anyio.sleep(0.1)  # let unsubscribes issued at the end reach the server
    delta = await commandstats(admin) - before
    return {k: v for k, v in sorted(delta.items()) if k not in ADMIN_COMMANDS}


# Scenarios (names and metrics as in WORKLOAD.md)


async def baseline(chunks: list[str], yield_every: int) -> dict[str, Any]:
    start = now()
    n = 0
    async for _ in make_source(chunks, yield_every)():
        n += 1
    total = now() - start
    return {"total_ms": total * 1e3, "chunks_per_s": n / total}


async def produce_consume(
    ctx: rs.ResumableStreamContext, chunks: list[str], full: str, yield_every: int
) -> dict[str, Any]:
    start = now()
    stream = await ctx.resumable_stream(uuid.uuid4().hex, make_source(chunks, yield_every))
    assert stream is not None
    first = await stream.__anext__()
    ttfc = now() - start
    parts, last_at, end_at = await read_all(stream, len(full) - len(first))
    total = (last_at or end_at) - start
    return {
        "ttfc_ms": ttfc * 1e3,
        "total_ms": total * 1e3,
        # The producer's own reader ends only once the DONE sentinel is written.
        "complete_ms": (end_at - start) * 1e3,
        "chunks_per_s": len(chunks) / total,
        "mb_per_s": len(full) / 1e6 / total,
        "ok": first + "".join(parts) == full,
    }


async def resume_gated(
    p_ctx: rs.ResumableStreamContext,
    c_ctx: rs.ResumableStreamContext,
    chunks: list[str],
    full: str,
    width: int,
    explicit: bool,
) -> dict[str, Any]:
    k = len(chunks) // 2
    gate = anyio.Event()
    stream_id = uuid.uuid4().hex
    source = make_source(chunks, gate=(k, gate))
    if explicit:
        own: rs.ResumableStream | None = await p_ctx.create_new_resumable_stream(stream_id, source)
    else:
        own = await p_ctx.resumable_stream(stream_id, source)
    assert own is not None
    got = [await own.__anext__() for _ in range(k)]
    offset = k * width - 17
    start = now()
    if explicit:
        follower = await c_ctx.resume_existing_stream(stream_id, offset)
    else:
        follower = await c_ctx.resumable_stream(stream_id, throwing_make, offset)
    ack = now() - start
    assert follower is not None
    first = await follower.__anext__()
    first_chunk = now() - start
    read: dict[str, tuple[list[str], float | None, float]] = {}

    async def read_into(name: str, stream: AsyncIterator[str]) -> None:
        read[name] = await read_all(stream)

    gate_open = now()
    gate.set()
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_into, "own", own)
        tg.start_soon(read_into, "follower", follower)
    own_parts, _, own_end = read["own"]
    follower_parts, _, follower_end = read["follower"]
    return {
        "resume_ack_ms": ack * 1e3,
        "follower_first_chunk_ms": first_chunk * 1e3,
        # The producer's reader ends once DONE is written: that is "P done".
        "producer_live_chunks_per_s_with_1_listener": (len(chunks) - k) / (own_end - gate_open),
        "follower_done_after_gate_ms": (follower_end - gate_open) * 1e3,
        "follower_reads": 1 + len(follower_parts),
        "follower_ok": first + "".join(follower_parts) == full[offset:],
        "producer_ok": "".join(got) + "".join(own_parts) == full,
    }


async def resume_ungated(
    p_ctx: rs.ResumableStreamContext,
    c_ctx: rs.ResumableStreamContext,
    chunks: list[str],
    full: str,
) -> dict[str, Any]:
    stream_id = uuid.uuid4().hex
    own = await p_ctx.resumable_stream(stream_id, make_source(chunks, yield_every=1))
    assert own is not None
    first = await own.__anext__()
    start = now()
    follower = await c_ctx.resumable_stream(stream_id, throwing_make, 0)
    ack = now() - start
    read: dict[str, list[str]] = {"follower": []}

    async def read_into(name: str, stream: AsyncIterator[str]) -> None:
        read[name] = (await read_all(stream))[0]

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_into, "own", own)
        if follower is not None:
            tg.start_soon(read_into, "follower", follower)
    return {
        "resume_ack_ms": ack * 1e3,
        "follower_null": follower is None,
        "follower_reads": len(read["follower"]),
        "follower_ok": "".join(read["follower"]) == full,
        "producer_ok": first + "".join(read["own"]) == full,
    }


async def commands_per_stream(
    ctx: rs.ResumableStreamContext,
    admin: redis.asyncio.Redis,
    width: int,
    streams: int,
    explicit: bool,
) -> dict[str, Any]:
    chunks = [chunk(i, width) for i in range(3)]
    before = await commandstats(admin)
    for _ in range(streams):
        stream_id = uuid.uuid4().hex
        if explicit:
            stream = await ctx.create_new_resumable_stream(stream_id, make_source(chunks))
        else:
            maybe = await ctx.resumable_stream(stream_id, make_source(chunks))
            assert maybe is not None
            stream = maybe
        await read_all(stream)  # ends once the stream is DONE
    raw = await delta_since(admin, before)
    return {
        "streams": streams,
        "per_stream_calls": {k: v / streams for k, v in raw.items()},
        "raw_delta": raw,
    }


async def replay_big(
    p_ctx: rs.ResumableStreamContext,
    c_ctx: rs.ResumableStreamContext,
    mib: int,
    width: int,
    timeout: float,
) -> dict[str, Any]:
    """P buffers `mib` MiB and waits at a gate before one last chunk; C resumes at 0."""
    count = -(-mib * 1024 * 1024 // width)
    chunks = [chunk(i, width) for i in range(count + 1)]
    full = "".join(chunks)
    replayed = sum(map(len, chunks[:count]))
    gate = anyio.Event()
    stream_id = uuid.uuid4().hex
    own = await p_ctx.resumable_stream(stream_id, make_source(chunks, gate=(count, gate)))
    assert own is not None
    for _ in range(count):
        await own.__anext__()
    result: dict[str, Any] = {"replay_chars": replayed, "timeout_s": timeout}
    start = now()
    try:
        with anyio.fail_after(timeout):
            follower = await c_ctx.resumable_stream(stream_id, throwing_make, 0)
            result["resume_ack_ms"] = (now() - start) * 1e3
            if follower is None:
                raise RuntimeError("resume returned None")
            parts: list[str] = []
            size = 0
            while size < replayed:
                part = await follower.__anext__()
                parts.append(part)
                size += len(part)
            result["last_byte_ms"] = (now() - start) * 1e3
            gate.set()
            parts += (await read_all(follower))[0]
            result["ok"] = "".join(parts) == full
            result["completed"] = True
    except Exception as exc:
        result.update(
            completed=False,
            ok=False,
            failed_after_ms=(now() - start) * 1e3,
            error=f"{type(exc).__name__}: {exc}",
        )
    finally:
        gate.set()
    with anyio.move_on_after(10):
        await read_all(own)
    return result


def install_otel_sdk(traces: bool) -> None:
    """The OpenTelemetry SDK's meter provider as the global one, measurements aggregated by an
    in-memory reader (never exported); with `traces`, its tracer provider too (spans made and
    dropped)."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    if traces:
        trace.set_tracer_provider(TracerProvider())


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One Python process's share of the workload, as the JSON of WORKLOAD.md."""
    otel = os.environ.get(OTEL_ENV, "")
    if otel == "absent":
        # As if the API were not installed: its import fails, and the telemetry is off.
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    elif otel:
        install_otel_sdk(traces=otel == "traces")
    width = args.width
    admin = redis.asyncio.Redis.from_url(args.url)
    info = await admin.info("server")
    report: dict[str, Any] = {
        "impl": f"python:resumable-streams@{rs.__version__}",
        # Which copy of the library this process runs: the orchestrator checks it.
        "module_file": rs.__file__,
        "otel_sdk": otel,
        "python": platform.python_version(),
        "redis_client": f"redis-py@{redis.__version__}",
        "redis_version": info["redis_version"],
        "params": {
            "chunks": args.chunks,
            "width": width,
            "runs": args.runs,
            "small_streams": args.small_streams,
            "port": int(args.url.rsplit(":", 1)[1].split("/")[0]),
        },
        "results": {},
    }
    results: dict[str, Any] = report["results"]
    # A finished producer lingers (keeps its text for late resumes) and unsubscribes after that;
    # commands are counted on a context that does not linger, so they cover a stream's whole cost.
    counting: dict[str, Any] = {}
    if "linger" in inspect.signature(rs.ResumableStreamContext).parameters:
        counting["linger"] = 0
        report["params"]["commands_counted_with"] = counting
    async with (
        rs.create_resumable_stream_context(args.url, key_prefix="bench") as p_ctx,
        rs.create_resumable_stream_context(args.url, key_prefix="bench") as c_ctx,
        rs.create_resumable_stream_context(args.url, key_prefix="bench", **counting) as n_ctx,
    ):
        warm = [chunk(i, width) for i in range(3)]
        for ctx in (p_ctx, c_ctx, n_ctx):
            await produce_consume(ctx, warm, "".join(warm), 0)
        await anyio.sleep(0.1)  # the warm-up streams' cleanup
        if args.worker == "replay":
            report["params"].update(replay_mib=args.replay_mib, replay_width=args.replay_width)
            results[f"replay_{args.replay_mib}mib"] = await replay_big(
                p_ctx, c_ctx, args.replay_mib, args.replay_width, args.replay_timeout
            )
        else:
            chunks = [chunk(i, width) for i in range(args.chunks)]
            full = "".join(chunks)
            runs: dict[str, list[dict[str, Any]]] = {}
            commands: dict[str, dict[str, int]] = {}
            for run in range(args.runs):
                runs.setdefault("baseline_no_library", []).append(await baseline(chunks, 0))
                runs.setdefault("produce_consume", []).append(
                    await produce_consume(p_ctx, chunks, full, 0)
                )
                runs.setdefault("baseline_no_library_yielding_source", []).append(
                    await baseline(chunks, 1)
                )
                runs.setdefault("produce_consume_yielding_source", []).append(
                    await produce_consume(p_ctx, chunks, full, 1)
                )
                for name, explicit in (
                    ("resume_gated_idempotent_api", False),
                    ("resume_gated_explicit_api", True),
                ):
                    before = await commandstats(admin) if run == 0 else None
                    producer = n_ctx if run == 0 else p_ctx  # the first run counts commands
                    runs.setdefault(name, []).append(
                        await resume_gated(producer, c_ctx, chunks, full, width, explicit)
                    )
                    if before is not None:
                        commands[name] = await delta_since(admin, before)
                runs.setdefault("resume_ungated", []).append(
                    await resume_ungated(p_ctx, c_ctx, chunks, full)
                )
            for name, scenario_runs in runs.items():
                results[name] = {"runs": scenario_runs, "median": median_of(scenario_runs)}
                if name in commands:
                    results[name]["commands_first_run"] = commands[name]
            for name, explicit in (
                ("commands_per_stream_idempotent_api", False),
                ("commands_per_stream_explicit_api", True),
            ):
                results[name] = await commands_per_stream(
                    n_ctx, admin, width, args.small_streams, explicit
                )
            before = await commandstats(admin)
            big = await produce_consume(n_ctx, chunks, full, 0)
            results["commands_one_big_stream"] = {
                "chunks": args.chunks,
                "ok": big["ok"],
                "raw_delta": await delta_since(admin, before),
            }
    await admin.aclose()
    return report


# The orchestrator


def ensure_node_reference() -> None:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    if (NODE_DIR / "node_modules" / "resumable-stream" / "package.json").exists():
        return
    print("installing the reference into benchmarks/node/ ...", file=sys.stderr)
    install = "ci" if (NODE_DIR / "package-lock.json").exists() else "install"
    subprocess.run(["npm", install, "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)


def run_json(
    command: list[str], timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    done = subprocess.run(command, stdout=subprocess.PIPE, timeout=timeout, check=True, env=env)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def python_command(args: argparse.Namespace, url: str, mode: str, loop: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--url",
        url,
        "--loop",
        loop,
        *common_options(args),
    ]


def node_command(args: argparse.Namespace, url: str, mode: str) -> list[str]:
    node = shutil.which("node") or "node"
    return [node, str(NODE_DIR / "bench.mjs"), "--mode", mode, "--url", url, *common_options(args)]


def common_options(args: argparse.Namespace) -> list[str]:
    options = {
        "chunks": args.chunks,
        "width": args.width,
        "runs": args.runs,
        "small": args.small_streams,
        "replay-mib": args.replay_mib,
        "replay-width": args.replay_width,
        "timeout": args.replay_timeout,
    }
    return [f"--{k}={v}" for k, v in options.items()]


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report per implementation: all runs of all processes, medians over all of them."""
    merged = {k: v for k, v in reports[0].items() if k != "results"}
    merged["processes"] = len(reports)
    results: dict[str, Any] = {}
    for name, first in reports[0]["results"].items():
        if "runs" in first:
            runs = [run for report in reports for run in report["results"][name]["runs"]]
            results[name] = {"runs": runs, "median": median_of(runs)}
            if "commands_first_run" in first:
                results[name]["commands_first_run"] = first["commands_first_run"]
        else:
            results[name] = first
        others = [report["results"][name].get("raw_delta") for report in reports[1:]]
        if "raw_delta" in first and any(other != first["raw_delta"] for other in others):
            results[name]["raw_delta_other_processes"] = others
    merged["results"] = results
    return merged


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}") if abs(value) < 1e4 else round(value, 1)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def dump(data: Any) -> str:
    """Indented JSON with every innermost object or list on one line (a run, a delta)."""
    text = json.dumps(rounded(data), indent=1, ensure_ascii=False)
    # JSON strings hold no raw newline, so this only joins lines between tokens.
    innermost = re.compile(r"[\[{][^\[\]{}]*[\]}]")
    return innermost.sub(lambda m: re.sub(r"\n\s*", " ", m.group()), text) + "\n"


def summary(report: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in report.items() if k != "results"}
    out["results"] = {
        name: {k: v for k, v in result.items() if k != "runs"}
        for name, result in report["results"].items()
    }
    return out


def rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


def ratio_text(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "-"
    # Two significant digits for the small ratios of command counts (12 / 5,003).
    return f"{a / b:.2f}" if a / b >= 0.1 else f"{a / b:.2g}"


def commands_text(calls: dict[str, float]) -> str:
    total = sum(calls.values())
    parts = ", ".join(f"{k.upper()} {v:g}" for k, v in calls.items())
    return f"{total:g} ({parts})"


def table(
    reports: dict[str, dict[str, Any]], ratios: list[tuple[str, str]], replay_mib: int
) -> list[list[str]]:
    """The headline rows: figure, one column per implementation (in the order of `reports`),
    then one per ratio (a, b) of `ratios` (a's median / b's, from this run), which way is better.
    """
    rows: list[list[str]] = []
    names = list(reports)
    first = reports[names[0]]

    def median(report: dict[str, Any], scenario: str, metric: str) -> float:
        value: float = report["results"][scenario]["median"][metric]
        return value

    def add(label: str, shown: list[str], values: dict[str, float], better: str) -> None:
        quotients = [ratio_text(values[a], values[b]) for a, b in ratios]
        rows.append([label, *shown, *quotients, better])

    def numeric(label: str, scenario: str, metric: str, kind: str) -> None:
        values = {name: median(report, scenario, metric) for name, report in reports.items()}
        show = rate if kind == "rate" else (lambda v: f"{v:.2f} ms")
        better = "higher" if kind == "rate" else "lower"
        add(label, [show(values[name]) for name in names], values, better)

    def commands(label: str, calls: dict[str, dict[str, float]]) -> None:
        totals = {name: float(sum(c.values())) for name, c in calls.items()}
        add(label, [commands_text(calls[name]) for name in names], totals, "lower")

    numeric("read the source, no library: chunks/s", "baseline_no_library", "chunks_per_s", "rate")
    numeric("produce + consume: chunks/s", "produce_consume", "chunks_per_s", "rate")
    numeric("produce + consume: time to first chunk", "produce_consume", "ttfc_ms", "ms")
    numeric("produce + consume: call → DONE written", "produce_consume", "complete_ms", "ms")
    numeric(
        "read the source yielding per chunk, no library: chunks/s",
        "baseline_no_library_yielding_source",
        "chunks_per_s",
        "rate",
    )
    numeric(
        "produce + consume, source yielding per chunk: chunks/s",
        "produce_consume_yielding_source",
        "chunks_per_s",
        "rate",
    )
    gated = "resume_gated_idempotent_api"
    half = first["params"]["chunks"] // 2
    numeric(
        f"resume at chunk {half:,} (mid-chunk): call → first reply", gated, "resume_ack_ms", "ms"
    )
    numeric(
        "producer rate with 1 follower: chunks/s",
        gated,
        "producer_live_chunks_per_s_with_1_listener",
        "rate",
    )
    numeric("follower done, after the gate opened", gated, "follower_done_after_gate_ms", "ms")
    numeric(
        "explicit API resume: call → first reply",
        "resume_gated_explicit_api",
        "resume_ack_ms",
        "ms",
    )
    numeric("ungated resume: call → first reply", "resume_ungated", "resume_ack_ms", "ms")
    for label, scenario in (
        ("Redis commands per uncontended stream", "commands_per_stream_idempotent_api"),
        ("same, explicit API", "commands_per_stream_explicit_api"),
    ):
        commands(label, {n: r["results"][scenario]["per_stream_calls"] for n, r in reports.items()})
    chunks = first["params"]["chunks"]
    commands(
        f"Redis commands, one {chunks:,}-chunk stream",
        {n: r["results"]["commands_one_big_stream"]["raw_delta"] for n, r in reports.items()},
    )
    publishes = {
        name: float(report["results"][gated]["commands_first_run"].get("publish", 0))
        for name, report in reports.items()
    }
    add(
        f"PUBLISH, {chunks:,}-chunk stream, 1 follower at {chunks // 2:,}",
        [f"{publishes[name]:,.0f}" for name in names],
        publishes,
        "lower",
    )

    def replay(report: dict[str, Any]) -> tuple[str, float]:
        r = report["results"].get(f"replay_{replay_mib}mib")
        if r is None:
            return "not run", math.nan
        if r["completed"] and r["ok"]:
            return f"last byte at {r['last_byte_ms']:.0f} ms", r["last_byte_ms"]
        return f"fails after {r['failed_after_ms']:.0f} ms: {r['error']}", math.nan

    if replay_mib:
        timeout = first["params"]["replay_timeout"]
        label = f"{replay_mib} MiB replay: call → last byte (timeout {timeout:g} s)"
        replays = {name: replay(report) for name, report in reports.items()}
        # A ratio only between two that completed: a failure's time says nothing about speed.
        times = {name: value for name, (_, value) in replays.items()}
        add(label, [replays[name][0] for name in names], times, "lower; completes")
    ok_keys = ("ok", "follower_ok", "producer_ok")

    def all_ok(report: dict[str, Any]) -> str:
        flags = [
            v
            for r in report["results"].values()
            for run in r.get("runs", ())
            for k, v in run.items()
            if k in ok_keys
        ]
        ungated = report["results"]["resume_ungated"]["runs"]
        nulls = sum(run["follower_null"] for run in ungated)
        return f"{sum(flags)}/{len(flags)} exact" + (f", {nulls} null resumes" if nulls else "")

    shown = [all_ok(report) for report in reports.values()]
    rows.append(["texts exact (all runs, all readers)", *shown, *("-" for _ in ratios), ""])
    return rows


def markdown(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> None:
    started = time.monotonic()
    if args.otel:
        version = code_version()
        pythons = {
            "python": ("no SDK", REPO, version, "asyncio"),
            "otel": ("SDK meter provider", REPO, version, "asyncio"),
            "traces": ("SDK meter + tracer providers", REPO, version, "asyncio"),
            "control": ("no SDK again (control)", REPO, version, "asyncio"),
        }
        compare(args, pythons, started)
        return
    ensure_node_reference()
    with contextlib.ExitStack() as stack:
        # Each Python implementation: (label, where its `resumable_stream/` is, git version,
        # event loop).
        pythons = {"python": ("ours (Python)", REPO, code_version(), "asyncio")}
        if args.baseline:
            root = stack.enter_context(library_at(args.baseline))
            before = ("before", root, code_version(args.baseline), "asyncio")
            pythons = {"before": before, "python": ("after", REPO, code_version(), "asyncio")}
        if args.control:
            label = "after again (control)" if args.baseline else "ours again (control)"
            pythons["again"] = (label, REPO, code_version(), "asyncio")
        if args.uvloop is None:
            args.uvloop = importlib.util.find_spec("uvloop") is not None
        if args.uvloop:
            if importlib.util.find_spec("uvloop") is None:
                sys.exit("--uvloop: uvloop is not installed (pip install uvloop)")
            label = "after" if args.baseline else "ours (Python)"
            pythons["uvloop"] = (f"{label}, uvloop", REPO, code_version(), "uvloop")
        compare(args, pythons, started)


def compare(
    args: argparse.Namespace, pythons: dict[str, tuple[str, Path, str, str]], started: float
) -> None:
    names = [*pythons] if args.otel else [*pythons, "node"]
    labels = {name: f"{label} ({version})" for name, (label, _, version, _) in pythons.items()}
    labels["node"] = "Node reference"
    envs = {name: env_importing(root) for name, (_, root, _, _) in pythons.items()}
    for name, env in envs.items():
        env.pop(OTEL_ENV, None)
        if args.without_otel_api:
            env[OTEL_ENV] = "absent"
        elif name == "otel":
            env[OTEL_ENV] = "metrics"
        elif name == "traces":
            env[OTEL_ENV] = "traces"

    def run(name: str, url: str, mode: str, timeout: float) -> dict[str, Any]:
        if name == "node":
            return run_json(node_command(args, url, mode), timeout)
        command = python_command(args, url, mode, pythons[name][3])
        report = run_json(command, timeout, envs[name])
        check_imported(report["module_file"], pythons[name][1], labels[name])
        return report

    process, url = start_redis()
    reports: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    replays: dict[str, dict[str, Any]] = {}
    try:
        for i in range(args.processes):
            # Rotate the order so that no implementation always runs first (or last).
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                print(f"[{time.monotonic() - started:5.0f} s] {name} process {i + 1}", flush=True)
                reports[name].append(run(name, url, "main", timeout=900))
        if args.replay_mib:
            replay_key = f"replay_{args.replay_mib}mib"
            for name in names:
                print(f"[{time.monotonic() - started:5.0f} s] {name}: {args.replay_mib} MiB replay")
                try:
                    replays[name] = run(name, url, "replay", timeout=args.replay_timeout + 120)
                except (subprocess.SubprocessError, ValueError) as exc:
                    failure: dict[str, Any] = {"completed": False, "ok": False}
                    failure.update(failed_after_ms=math.nan, error=f"{name} process: {exc}")
                    replays[name] = {"params": {}, "results": {replay_key: failure}}
    finally:
        process.terminate()
        process.wait(10)
    merged = {name: merge(runs) for name, runs in reports.items()}
    for name, report in replays.items():
        merged[name]["results"].update(report["results"])
        merged[name]["params"].update(report["params"], replay_timeout=args.replay_timeout)
    for name, report in merged.items():
        report["params"].pop("port", None)
        report["params"].setdefault("replay_timeout", args.replay_timeout)
        if name in pythons:
            report["code"] = pythons[name][2]
    if args.otel:
        ratios = [("otel", "python"), ("traces", "python"), ("control", "python")]
    elif "before" in names:
        ratios = [("python", "before"), ("python", "node")]
    else:
        ratios = [("python", "node")]
    if "again" in names:
        # The same code twice: how far apart two runs of one thing land, in this run.
        ratios.insert(1 if "before" in names else 0, ("again", "python"))
    if "uvloop" in names:
        ratios.append(("uvloop", "node"))
    short = {
        "python": "after" if "before" in names else "ours",
        "before": "before",
        "uvloop": "uvloop",
        "node": "Node",
        "again": "again",
    }
    if args.otel:
        short.update(python="no SDK", otel="metrics", traces="traces", control="control")
    header = [
        "figure (medians)",
        *(labels[name] for name in names),
        *(f"{short[a]} / {short[b]}" for a, b in ratios),
        "better",
    ]
    rows = table(merged, ratios, args.replay_mib)
    elapsed = time.monotonic() - started
    print()
    print(markdown(header, rows))
    print(
        f"\n{args.processes} processes x {args.runs} runs per implementation, "
        f"N = {args.chunks:,} chunks of {args.width} chars; total {elapsed:.0f} s"
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    keys = ["figure", *names, *(f"{a}/{b}" for a, b in ratios), "better"]
    combined = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "params": {k: v for k, v in vars(args).items() if k not in ("worker", "url")},
        "columns": dict(zip(keys[1:-1], header[1:-1], strict=True)),
        "total_s": round(elapsed, 1),
        "table": [dict(zip(keys, r, strict=True)) for r in rows],
        # The per-implementation files hold every run; this one the medians and counts.
        **{name: summary(report) for name, report in merged.items()},
    }
    if args.otel:
        files = {"otel-overhead.json": combined}
    else:
        files = {f"compare-{name}.json": merged[name] for name in ("python", "node")}
        if "uvloop" in merged:
            files["compare-python-uvloop.json"] = merged["uvloop"]
        if "before" in merged:
            files["compare-python-before.json"] = merged["before"]
        if "again" in merged:
            files["compare-python-again.json"] = merged["again"]
        files["compare.json"] = combined
    for file, data in files.items():
        (RESULTS_DIR / file).write_text(dump(data))
    print(f"wrote {', '.join(f'{RESULTS_DIR.relative_to(HERE.parent)}/{f}' for f in files)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--processes", type=int, default=3, help="per implementation")
    parser.add_argument("--runs", type=int, default=5, help="runs of each scenario per process")
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--small-streams", "--small", type=int, default=200)
    parser.add_argument("--replay-mib", type=int, default=40, help="0 skips the big replay")
    parser.add_argument("--replay-width", type=int, default=65_536, help="chunk size there")
    parser.add_argument("--replay-timeout", "--timeout", type=float, default=60.0)
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure the library as of this git ref (e.g. 5c46410), in the same run",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run ours a second time, as a control: the again / ours column shows how far "
        "two runs of the same code land apart (the noise), next to after / before",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="measure the telemetry's overhead: without and with the OpenTelemetry SDK installed",
    )
    parser.add_argument(
        "--without-otel-api",
        action="store_true",
        help="the Python processes run as if the OpenTelemetry API were not installed",
    )
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        help="also run ours on uvloop (what uvicorn[standard] runs), in the same run; "
        "the default when uvloop is installed",
    )
    parser.add_argument("--worker", choices=["main", "replay"], help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.otel and args.without_otel_api:
        parser.error("--otel measures the telemetry: it needs the OpenTelemetry API")
    if args.otel and args.control:
        parser.error("--otel has a control of its own (no SDK, twice)")
    if args.worker:
        report = anyio.run(worker, args, backend_options={"use_uvloop": args.loop == "uvloop"})
        report["loop"] = args.loop
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
