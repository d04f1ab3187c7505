"""A hand-driven source and bounded readers, like the reference suite's testing utilities."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import resumable_stream as rs
from resumable_stream import _protocol as p

READ_TIMEOUT = 5.0


class TestingSource:
    """A source the test writes to by hand: `write(chunk)`, `close()`, `fail(exc)`."""

    __test__ = False

    def __init__(self) -> None:
        send: MemoryObjectSendStream[str | rs.Event | BaseException]
        receive: MemoryObjectReceiveStream[str | rs.Event | BaseException]
        send, receive = anyio.create_memory_object_stream(math.inf)
        self._send = send
        self._receive = receive
        self.calls = 0
        self.finished = anyio.Event()

    def __del__(self) -> None:
        self._send.close()
        self._receive.close()

    def write(self, chunk: str | rs.Event) -> None:
        self._send.send_nowait(chunk)

    def fail(self, exc: BaseException) -> None:
        self._send.send_nowait(exc)

    def close(self) -> None:
        self._send.close()

    def make(self) -> AsyncIterator[str | rs.Event]:
        self.calls += 1
        return self._generate()

    async def _generate(self) -> AsyncIterator[str | rs.Event]:
        try:
            async with self._receive:
                async for item in self._receive:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            self.finished.set()


async def poll_until(
    probe: Callable[[], Awaitable[object]], expected: object, timeout: float = 5.0
) -> None:
    """Poll backend state (which has no event to wait on) until it reads `expected`."""
    with anyio.fail_after(timeout):
        for _ in itertools.count():
            if await probe() == expected:
                return
            await anyio.sleep(0.001)


def never_called() -> AsyncIterator[str]:
    raise AssertionError("make_stream should never be called")


async def read(stream: rs.ResumableStream | None, max_reads: int | None = None) -> str:
    """Read up to `max_reads` chunks (all by default), each within READ_TIMEOUT; join them."""
    return "".join(await read_chunks(stream, max_reads))


async def read_chunks(stream: rs.ResumableStream | None, max_reads: int | None = None) -> list[str]:
    assert stream is not None, "stream should not be None"
    chunks: list[str] = []
    while max_reads is None or len(chunks) < max_reads:
        with anyio.fail_after(READ_TIMEOUT):
            try:
                chunks.append(await stream.__anext__())
            except StopAsyncIteration:
                break
    return chunks


async def read_until_error(stream: rs.ResumableStream | None) -> tuple[str, BaseException | None]:
    """The text a reader got, and the typed error it ended with (None if it ended well); the
    caller bounds it."""
    assert stream is not None, "stream should not be None"
    text = ""
    try:
        async for chunk in stream:
            text += chunk
    except rs.ResumableStreamError as exc:
        return text, exc
    return text, None


async def read_entries(stream: rs.ResumableStream | None) -> list[tuple[str | rs.Event, int]]:
    """Every (chunk, end offset) as the SSE layer reads them, each batch within READ_TIMEOUT."""
    assert stream is not None, "stream should not be None"
    entries: list[tuple[str | rs.Event, int]] = []
    while True:
        with anyio.fail_after(READ_TIMEOUT):
            try:
                entries.extend(await stream.next_batch())
            except StopAsyncIteration:
                return entries


class Filtered:
    """A backend wrapper whose connection never receives the messages `drop(channel, message)`
    picks: a lossy network, acted out on any backend."""

    def __init__(self, inner: rs.Backend, drop: Callable[[str, p.Message], bool]) -> None:
        self.inner = inner
        self.drop = drop

    def connect(
        self, on_message: Any, on_reconnect: Any = None
    ) -> AbstractAsyncContextManager[rs.Connection]:
        def filtered(channel: str, data: bytes) -> None:
            if not self.drop(channel, p.parse(data)):
                on_message(channel, data)

        return self.inner.connect(filtered, on_reconnect)


class Faulty:
    """A backend wrapper whose connections run `hooks[name](command, *args)` for the commands
    named (`command` is the wrapped connection's own, to call or not): a fault acted out
    exactly where a test wants it, on any backend."""

    def __init__(self, inner: rs.Backend, **hooks: Callable[..., Awaitable[Any]]) -> None:
        self.inner = inner
        self.hooks = hooks

    def connect(
        self, on_message: Any, on_reconnect: Any = None
    ) -> AbstractAsyncContextManager[rs.Connection]:
        return self._connect(on_message, on_reconnect)

    @asynccontextmanager
    async def _connect(self, on_message: Any, on_reconnect: Any) -> AsyncIterator[Any]:
        async with self.inner.connect(on_message, on_reconnect) as connection:
            yield _FaultyConnection(connection, self.hooks)


class _FaultyConnection:
    def __init__(self, inner: Any, hooks: dict[str, Callable[..., Awaitable[Any]]]) -> None:
        self._inner = inner
        self._hooks = hooks

    def __getattr__(self, name: str) -> Any:
        command = getattr(self._inner, name)
        hook = self._hooks.get(name)
        if hook is None:
            return command
        return functools.partial(hook, command)


# compat="vercel": the reference's offsets, and a lost DONE message


def units16(text: str) -> int:
    """The length of `text` in UTF-16 code units (JavaScript's `length`)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def slice16(text: str, start: int) -> str:
    """JavaScript's `text.slice(start)` as the reference's clients send it: a lone low half of
    a pair (a start inside it) arrives as U+FFFD. Written apart from the library's own."""
    data = text.encode("utf-16-le", "surrogatepass")[2 * start :]
    if len(data) >= 2 and 0xDC <= data[1] <= 0xDF:
        data = b"\xfd\xff" + data[2:]
    return data.decode("utf-16-le", "surrogatepass")


DONE_MESSAGE = "\n\n\nDONE_SENTINEL_hasdfasudfyge374%$%^$EDSATRTYFtydryrte\n"  # the reference's


class DroppingDone:
    """A backend whose connections never deliver the reference's DONE message (they say it
    reached somebody): a message lost on the way."""

    def __init__(self, backend: rs.Backend) -> None:
        self._backend = backend

    @asynccontextmanager
    async def connect(self, on_message: Any, on_reconnect: Any = None) -> AsyncIterator[Any]:
        async with self._backend.connect(on_message, on_reconnect) as connection:
            yield _DroppingDone(connection)


class _DroppingDone:
    def __init__(self, connection: rs.Connection) -> None:
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    async def publish(self, channel: str, message: bytes) -> int:
        if message == DONE_MESSAGE.encode():
            return 1
        return await self._connection.publish(channel, message)
