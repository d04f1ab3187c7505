"""The producer's chunks, indexed by character offset, and the wake-up signal readers wait on."""

from __future__ import annotations

from bisect import bisect_right

import anyio


class Signal:
    """A reusable wake-up: `notify()` releases every task currently in `wait()`.

    Callers check their condition, then wait; with no await in between no wake-up is lost.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class ChunkBuffer:
    """Append-only list of non-empty chunks with their end offsets, for slicing by offset."""

    __slots__ = ("chunks", "ends", "length")

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.ends: list[int] = []  # ends[i] == offset just past chunks[i]
        self.length = 0

    def append(self, chunk: str) -> None:
        self.length += len(chunk)
        self.chunks.append(chunk)
        self.ends.append(self.length)

    def index_at(self, offset: int) -> int:
        """Index of the chunk that holds character `offset` (len(chunks) if past the end)."""
        return bisect_right(self.ends, offset)

    def start_of(self, index: int) -> int:
        return self.ends[index - 1] if index else 0

    def slice(self, offset: int, stop_index: int | None = None) -> list[str]:
        """Chunks from character `offset` up to chunk `stop_index`, the first one trimmed."""
        first = self.index_at(offset)
        stop = len(self.chunks) if stop_index is None else stop_index
        if first >= stop:
            return []
        out = self.chunks[first:stop]
        skip = offset - self.start_of(first)
        if skip:
            out[0] = out[0][skip:]
        return out
