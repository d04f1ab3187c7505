"""The producer's chunks, indexed by character offset, and the wake-up signal readers wait on."""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_right
from collections.abc import Awaitable

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

    def wait(self) -> Awaitable[None]:
        """What to await until the next `notify()`.

        On asyncio, a bare future rather than a coroutine: a waiting reader holds no frame of
        this method (a quarter of a KiB per idle stream). A waiting task that is cancelled
        cancels its future, which the next `wait()` or `notify()` drops.
        """
        if self._loop is None:
            if self._event is None:
                self._event = anyio.Event()
            return self._event.wait()
        waiter = self._loop.create_future()
        waiters = self._waiters
        if waiters and (waiters[0].done() or waiters[-1].done()):
            # Left by cancelled waits (a timeout around each, say): dropped before they pile
            # up on a signal that stays quiet.
            waiters = self._waiters = [w for w in waiters if not w.done()]
        waiters.append(waiter)
        return waiter


# A batch of chunks wakes its readers at most this many loop turns after its first chunk, so
# a source that yields a chunk on every loop turn wakes them once per this many chunks.
_MAX_DEFERRED_TURNS = 16
# A batch this large wakes them at once: a source that produces this many chunks per loop turn
# (one that hardly awaits) gains nothing from waiting for more.
_MAX_DEFERRED_CHUNKS = 64
# Chunks closer together than this (seconds) come from a source that does not really wait
# between them (a loop turn or a network read that was ready): they are worth batching.
_BURST_GAP = 0.0005


class BatchSignal(Signal):
    """A `Signal` whose `notify_soon()` wakes the waiters once per batch of a burst.

    The producer appends a chunk per loop turn when its source yields to the loop per chunk
    (any source fed by the network), and waking its reader for each one was half the CPU per
    chunk: a task switch, a future and two loop callbacks. When a batch's first chunk comes
    in a burst (less than `_BURST_GAP` after the previous batch began), `notify_soon()` wakes
    the waiters only at the first loop turn in which nothing more was notified, or after
    `_MAX_DEFERRED_TURNS` turns or `_MAX_DEFERRED_CHUNKS` chunks, paying one loop callback per
    turn meanwhile; so a source that produces a chunk per turn wakes its reader once per batch.
    A chunk after a pause (a model's next token) wakes them at once, as `notify()` does:
    deferring it would only add loop callbacks, since no other chunk is coming to share the
    wake-up. Nothing at all is done while nobody waits. On trio it is `notify()`.
    """

    __slots__ = ("_handle", "_last", "_notified", "_seen", "_start", "_turns")

    def __init__(self) -> None:
        super().__init__()
        self._handle: asyncio.Handle | None = None
        self._last = -math.inf  # when notify_soon() was last called
        self._notified = 0  # counts notify_soon() calls; compared between loop turns
        self._seen = 0
        self._start = 0  # `_notified` when the pending batch began
        self._turns = 0

    def notify_soon(self) -> None:
        if self._handle is not None:
            self._notified += 1  # a batch is pending (never on trio): it grows
            return
        if not self._waiters:
            # Nobody waits (on trio: nothing is deferred). The path of most chunks of a fast
            # source: no clock is read, and nothing counted (only a pending batch compares).
            if self._event is not None:
                self.notify()
            return
        self._notified += 1
        # The first chunk of a batch: a burst if it comes soon after the previous batch began.
        now = time.monotonic()
        burst = now - self._last < _BURST_GAP
        self._last = now
        if not burst:
            # notify(), inlined (once per chunk of a model's stream): waiters are asyncio's.
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            return
        assert self._loop is not None  # waiters are asyncio futures
        self._start = self._notified
        self._seen = self._notified - 1  # the flush's first turn sees this call as new
        self._turns = 0
        self._handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        notified = self._notified
        if (
            notified != self._seen
            and self._turns < _MAX_DEFERRED_TURNS
            and notified - self._start < _MAX_DEFERRED_CHUNKS
        ):
            # Notified during the last loop turn: the batch is still growing.
            self._seen = notified
            self._turns += 1
            assert self._loop is not None
            self._handle = self._loop.call_soon(self._flush)
            return
        self._handle = None
        self.notify()


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
        events = self.events
        if stop == index + 1 and not events:  # a model's token: one chunk per batch
            return [(self.chunks[index], self.ends[index])]
        items: list[str | Event] = list(self.chunks[index:stop])
        if events:
            for i in range(index, stop):
                event = events.get(i)
                if event is not None:
                    items[i - index] = event
        return list(zip(items, self.ends[index:stop], strict=True))
