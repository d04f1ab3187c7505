"""A context of the real npm package `resumable-stream` in a Node process, driven from a test.

`tests/node_interop/driver.mjs` holds the context; `node_context(...)` starts it and returns a
handle whose methods send it one command each (they run concurrently in Node) and return its
reply. Strings travel as JSON, so lone surrogates survive both ways.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

START_TIMEOUT = 10.0  # seconds for Node to start and connect its clients
CALL_TIMEOUT = 20.0


@dataclass(frozen=True)
class Reference:
    """One version of the package and the way its context gets its Redis clients."""

    module: str  # "resumable-stream" (2.2.13) or an npm alias: "rs-2.2.12", ...
    client: str  # "node-redis", "ioredis" or "default"

    @property
    def version(self) -> tuple[int, ...]:
        name = "2.2.13" if self.module == "resumable-stream" else self.module[3:]
        return tuple(int(part) for part in name.split("."))

    @property
    def explicit(self) -> bool:
        """`createNewResumableStream` and `resumeExistingStream` (2.1.0 and later)."""
        return self.version >= (2, 1, 0)

    @property
    def has(self) -> bool:
        """`hasExistingStream` (2.2.1 and later)."""
        return self.version >= (2, 2, 1)

    @property
    def watchdog(self) -> bool:
        """The done watchdog (2.2.13)."""
        return self.version >= (2, 2, 13)

    def __str__(self) -> str:
        return f"{self.module}+{self.client}"


@dataclass
class NodeReader:
    """What a Node reader read: its text, whether it ended, and how."""

    text: str
    chunks: int
    done: bool
    error: str | None


@dataclass
class NodeContext:
    process: anyio.abc.Process
    _replies: dict[str, Any] = field(default_factory=dict)
    _waiters: dict[str, anyio.Event] = field(default_factory=dict)
    _next: int = 0
    ready: anyio.Event = field(default_factory=anyio.Event)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        self._next += 1
        key = str(self._next)
        event = self._waiters[key] = anyio.Event()
        assert self.process.stdin is not None
        line = json.dumps({"id": key, "op": op, **args}) + "\n"
        await self.process.stdin.send(line.encode())
        with anyio.fail_after(CALL_TIMEOUT):
            await event.wait()
        reply: dict[str, Any] = self._replies.pop(key)
        if not reply["ok"]:
            raise AssertionError(f"Node failed {op}: {reply['error']}")
        return reply

    async def _read(self) -> None:
        assert self.process.stdout is not None
        buffered = b""
        async for piece in self.process.stdout:
            buffered += piece
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                reply = json.loads(line)
                if reply["id"] == "ready":
                    self.ready.set()
                    continue
                self._replies[reply["id"]] = reply
                self._waiters.pop(reply["id"]).set()

    # The commands

    async def produce(
        self, stream: str, mode: str = "idempotent", skip: int | None = None
    ) -> dict[str, Any]:
        """Start producing `stream` (`resumableStream`, or `createNewResumableStream` with
        mode "explicit") from a source this side writes: the reply's `source`."""
        return await self.call("produce", stream=stream, mode=mode, skip=skip)

    async def write(self, source: str, *texts: str, repeat: int | None = None) -> None:
        """Write `texts` to the source, each one `repeat` times over (made in Node)."""
        for text in texts:
            await self.call("write", source=source, text=text, repeat=repeat)

    async def close(self, source: str) -> None:
        await self.call("close", source=source)

    async def fail(self, source: str) -> None:
        await self.call("fail", source=source)

    async def resume(
        self, stream: str, skip: int | None = None, mode: str = "explicit"
    ) -> dict[str, Any]:
        """`resumeExistingStream` (mode "explicit") or `resumableStream`: the reply's `kind` is
        "stream" (with its `handle`), "null", "undefined" or "error"."""
        return await self.call("resume", stream=stream, mode=mode, skip=skip)

    async def read(
        self, handle: str, ms: int = 10_000, length: int | None = None, quiet: bool = False
    ) -> NodeReader:
        """What the reader `handle` read once it ended, after `ms`, or once it holds `length`
        UTF-16 units (`quiet`: its text stays in Node, and comes back empty)."""
        reply = await self.call("read", handle=handle, ms=ms, length=length, quiet=quiet)
        return NodeReader(reply["text"], reply["chunks"], reply["done"], reply["error"])

    async def cancel(self, handle: str) -> None:
        await self.call("cancel", handle=handle)

    async def has(self, stream: str) -> Any:
        """`hasExistingStream`: None, True or "DONE"."""
        value = (await self.call("has", stream=stream))["value"]
        return None if value == "null" else value


@asynccontextmanager
async def node_context(
    folder: Path,
    reference: Reference,
    url: str,
    key_prefix: str,
    *,
    extra: dict[str, Any] | None = None,
    bare: bool = False,
    drop_done: bool = False,
) -> AsyncIterator[NodeContext]:
    """A Node process holding one context of `reference` on `url`, under `key_prefix`."""
    options = {
        "module": reference.module,
        "client": reference.client,
        "url": url,
        "keyPrefix": key_prefix,
        "extra": extra or {},
        "bare": bare,
        "dropDone": drop_done,
    }
    command = ["node", str(folder / "driver.mjs"), json.dumps(options)]
    process = await anyio.open_process(command, cwd=folder, stderr=sys.stderr.fileno())
    try:
        async with anyio.create_task_group() as tg:
            context = NodeContext(process)
            tg.start_soon(context._read)
            with anyio.fail_after(START_TIMEOUT):
                await context.ready.wait()
            try:
                yield context
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.aclose()
