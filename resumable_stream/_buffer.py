"""The producer's chunks, indexed by character offset, and the wake-up signal readers wait on."""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_right

import anyio

from ._event import Event
from ._protocol import WireChunk, wire_event

# What a reader hands on for one chunk: the chunk (trimmed if resumed mid-chunk) and its end offset.
Entry = tuple[str | Event, int]


class Signal:
    """A reusable wake-up: `notify()` releases every task currently in `wait()`.

    Callers check their condition, then wait; with no await in between no wake-up is lost.
    On asyncio each waiter awaits a bare future: a wake-up per chunk is the hot path, and an
    idle stream's waiting reader should cost little memory (anyio's portable event is several
    times larger and slower there).
    """

    __slots__ = ("_event", "_loop", "_waiters")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._waiters: list[asyncio.Future[None]] = []
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # trio, or outside any event loop

    def notify(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._loop is None:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
            return
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter.cancelled() or not waiter.done():  # the waiting task was cancelled
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)


class ChunkBuffer:
    """Append-only list of non-empty chunks with their end offsets, for slicing by offset.

    Chunks are kept as text; the few that were yielded as `Event`s are also kept by index.
    """

    __slots__ = ("chunks", "ends", "events", "length")

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.ends: list[int] = []  # ends[i] == offset just past chunks[i]
        self.events: dict[int, Event] = {}
        self.length = 0

    def append(self, chunk: str) -> None:
        self.length += len(chunk)
        self.chunks.append(chunk)
        self.ends.append(self.length)

    def append_event(self, event: Event) -> None:
        self.events[len(self.chunks)] = event
        self.append(event.data)

    def index_at(self, offset: int) -> int:
        """Index of the chunk that holds character `offset` (len(chunks) if past the end)."""
        return bisect_right(self.ends, offset)

    def start_of(self, index: int) -> int:
        return self.ends[index - 1] if index else 0

    def wire(self, offset: int, stop_index: int | None = None) -> list[WireChunk]:
        """Chunks from character `offset` up to chunk `stop_index`, the first one trimmed."""
        first = self.index_at(offset)
        stop = len(self.chunks) if stop_index is None else stop_index
        if first >= stop:
            return []
        out: list[WireChunk] = list(self.chunks[first:stop])
        events = self.events
        if events:
            for index in range(first, stop):
                event = events.get(index)
                if event is not None:
                    out[index - first] = wire_event(event)
        skip = offset - self.start_of(first)
        if skip:
            head = self.chunks[first][skip:]
            event = events.get(first)
            out[0] = head if event is None else wire_event(event, head)
        return out

    def entries(self, index: int, stop: int) -> list[Entry]:
        """Entries for chunks `index` up to `stop`, each chunk whole."""
        items: list[str | Event] = list(self.chunks[index:stop])
        events = self.events
        if events:
            for i in range(index, stop):
                event = events.get(i)
                if event is not None:
                    items[i - index] = event
        return list(zip(items, self.ends[index:stop], strict=True))
