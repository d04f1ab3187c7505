"""What every campaign process shares: its spec (written by the orchestrator), its logging, its
contexts and its control channel (stdin).

A process is started as `python -m chaos.campaign.<role> SPEC INCARNATION`; `SPEC` is a JSON
file naming the plan, the records folder, the process's name and its `Link` to Redis. It
prints `ready` once its contexts are open, then reads `go <t0>` (the run's start, wall clock);
it prints `idle` once its planned actions are all done, and stops on `stop` (or the end of
stdin): whatever still runs is recorded as stopped, its contexts are left, and it exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

import resumable_stream as rs

from ._connect import Link, close_clients, redis_argument
from ._plan import Plan, load
from ._records import Recorder

__all__ = ["LOG_FORMAT", "Control", "ProcessSpec", "open_contexts", "setup_logging"]

# Every log line starts with its wall-clock time, so that the report can show the lines around
# a violation; a traceback's lines follow the record they belong to.
LOG_FORMAT = "%(created).3f %(levelname)s %(name)s: %(message)s"
# A process keeps trying to open its contexts as long as Redis is down (it may be as it
# starts); after this long it notes it in its records.
_OPEN_DEADLINE = 60.0


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    name: str
    plan: Plan
    records: Path
    link: Link
    servers: tuple[str, ...]  # the SSE servers' base URLs (for the client)

    @classmethod
    def read(cls, path: str) -> ProcessSpec:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        link = data["link"]
        return cls(
            name=data["name"],
            plan=load(Path(data["plan"]).read_text(encoding="utf-8")),
            records=Path(data["records"]),
            link=Link(
                topology=link["topology"],
                nodes=tuple(link["nodes"]),
                remap=tuple((a, b) for a, b in link["remap"]),
                sentinels=tuple(link["sentinels"]),
                service=link["service"],
            ),
            servers=tuple(data.get("servers", ())),
        )

    @staticmethod
    def write(
        path: Path, name: str, plan: Path, records: Path, link: Link, servers: list[str]
    ) -> None:
        data = {
            "name": name,
            "plan": str(plan),
            "records": str(records),
            "link": {
                "topology": link.topology,
                "nodes": list(link.nodes),
                "remap": [list(pair) for pair in link.remap],
                "sentinels": list(link.sentinels),
                "service": link.service,
            },
            "servers": servers,
        }
        path.write_text(json.dumps(data), encoding="utf-8")


def setup_logging() -> None:
    """Logs to stderr, each line with its time; and the bug to put back, if any (`_inject`)."""
    from ._inject import inject

    inject()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


@asynccontextmanager
async def open_contexts(
    spec: ProcessSpec, recorder: Recorder
) -> AsyncIterator[dict[str, rs.ResumableStreamContext]]:
    """The process's two contexts ("mem" and "dur"), opened as soon as Redis lets it."""
    plan = spec.plan
    settings = plan.settings
    async with AsyncExitStack() as stack:
        contexts: dict[str, rs.ResumableStreamContext] = {}
        # No cancel scope around this: it would enclose the contexts' own task groups. Each
        # try is bounded by the backend's own deadlines.
        deadline = anyio.current_time() + _OPEN_DEADLINE
        for deployment in ("mem", "dur"):
            while True:
                argument, clients = redis_argument(spec.link, spec.name)
                ctx = rs.create_resumable_stream_context(
                    argument,
                    key_prefix=plan.key_prefix(deployment),
                    command_timeout=settings.command_timeout,
                    **settings.options(deployment == "dur"),
                )
                try:
                    await stack.enter_async_context(ctx)
                except rs.ResumableStreamError as exc:
                    recorder.write(
                        "open-failed", dep=deployment, error=type(exc).__name__, msg=str(exc)[:300]
                    )
                    await close_clients(clients)
                    if anyio.current_time() > deadline:
                        # Still trying: an orchestrator that waits no longer says so.
                        recorder.write("open-slow", dep=deployment)
                        deadline = math.inf
                    await anyio.sleep(0.5)  # Redis is down: try again (a retry's backoff)
                    continue
                stack.push_async_callback(close_clients, clients)
                contexts[deployment] = ctx
                break
        yield contexts


class Control:
    """The orchestrator's commands on stdin, and this process's answers on stdout."""

    def __init__(self) -> None:
        self.stopping = anyio.Event()
        self._reader: asyncio.StreamReader | None = None

    async def _open(self) -> asyncio.StreamReader:
        if self._reader is None:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            await loop.connect_read_pipe(lambda: protocol, sys.stdin)
            self._reader = reader
        return self._reader

    @staticmethod
    def say(line: str) -> None:
        print(line, flush=True)

    async def go(self) -> float:
        """Wait for `go <t0>`; return t0."""
        reader = await self._open()
        while True:
            line = (await reader.readline()).decode().split()
            if not line:
                raise SystemExit("stdin closed before go")
            if line[0] == "go":
                return float(line[1])

    async def watch(self) -> None:
        """Set `stopping` on `stop` or the end of stdin."""
        reader = await self._open()
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "stop":
                self.stopping.set()
                return


async def at(t0: float, when: float, action: Callable[[], Awaitable[Any]]) -> None:
    """Run `action` at `t0 + when` (wall clock); at once if that is past."""
    import time

    delay = t0 + when - time.time()
    if delay > 0:
        await anyio.sleep(delay)  # the plan's schedule, not a synchronisation
    await action()
