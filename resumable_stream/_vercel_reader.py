"""A compat producer's text, by UTF-16 offset, and the reader of it in the producer's context.

The same as native mode's buffer and producer reader, but every offset (a resume's, a chunk's
end, hence an SSE event id) counts UTF-16 code units, as the reference and the browser do.
"""

from __future__ import annotations

from typing import Protocol

import anyio
import anyio.lowlevel

from . import _protocol as p
from ._buffer import BatchSignal, ChunkBuffer, Entry
from ._reader import CHECKPOINT_MASK
from ._vercel_wire import cut16, utf16_len

__all__ = ["Buffer16", "LocalReader", "Produced16"]


class Buffer16(ChunkBuffer):
    """A `ChunkBuffer` whose offsets (`ends`, `length`) count UTF-16 code units."""

    __slots__ = ()

    def append(self, chunk: str) -> None:
        self.length += utf16_len(chunk)
        self.chunks.append(chunk)
        self.ends.append(self.length)

    def text_from(self, start: int) -> str:
        """The text from unit `start` to the end (a cut inside a pair starts with U+FFFD)."""
        index = self.index_at(start)
        if index >= len(self.chunks):
            return ""
        head = cut16(self.chunks[index], start - self.start_of(index))
        if index + 1 == len(self.chunks):
            return head
        return head + "".join(self.chunks[index + 1 :])


class Produced16(Protocol):
    """What a compat producer's own reader reads."""

    stream_id: str
    buffer: Buffer16
    changed: BatchSignal
    settled: bool
    state: str | None
    error: BaseException | None

    @property
    def error_type(self) -> str | None: ...


class LocalReader:
    """A reader of a compat producer's buffer, in its own context (its first reader, or a
    resume on the process that runs it): no backend command."""

    __slots__ = ("_closed", "_index", "_offset", "_producer")

    def __init__(self, producer: Produced16, resume_at: int) -> None:
        self._producer = producer
        self._offset = resume_at
        self._index: int | None = None  # the next chunk to take, once the offset was reached
        self._closed = False

    @property
    def attempt(self) -> int:
        """A compat stream has one attempt."""
        return 1

    def __aiter__(self) -> LocalReader:
        return self

    async def __anext__(self) -> str:
        item = (await self.next_batch(1))[0][0]
        assert isinstance(item, str)  # compat streams hold text only
        return item

    async def next_batch(self, limit: int | None = None) -> list[Entry]:
        """Wait for chunks and take those available (at most `limit`); StopAsyncIteration at end."""
        producer = self._producer
        buffer = producer.buffer
        while not self._closed:
            index = self._index
            if index is None and buffer.length > self._offset:
                index = buffer.index_at(self._offset)
                chunk = buffer.chunks[index]
                skip = self._offset - buffer.start_of(index)
                head: Entry = (cut16(chunk, skip) if skip else chunk, buffer.ends[index])
                self._index = index + 1
                if limit == 1:
                    return [head]
                return [head, *self._take(None if limit is None else limit - 1)]
            if index is not None and index < len(buffer.chunks):
                if index & CHECKPOINT_MASK == CHECKPOINT_MASK:
                    await anyio.lowlevel.checkpoint()  # let others run (the buffer only grows)
                return self._take(limit)
            if producer.settled:
                assert producer.state is not None
                self._closed = True
                error = p.end_error(producer.stream_id, producer.state, producer.error_type)
                if error is not None:
                    raise error from producer.error
                break
            await producer.changed.wait()
        raise StopAsyncIteration

    def take_ready(self) -> list[Entry]:
        """The chunks available right now, without waiting (possibly none)."""
        index = self._index
        if index is None or self._closed or index >= len(self._producer.buffer.chunks):
            return []
        return self._take(None)

    def _take(self, limit: int | None) -> list[Entry]:
        assert self._index is not None
        index = self._index
        buffer = self._producer.buffer
        stop = len(buffer.chunks)
        if limit is not None:
            stop = min(stop, index + limit)
        self._index = stop
        return buffer.entries(index, stop)

    async def aclose(self) -> None:
        """Stop reading; the producer carries on for everybody else."""
        self._closed = True
