"""What the context hands out: a reader of one stream, chunk by chunk or in batches; and the
reader of a producer's own buffer (a follower, the other kind, has a module of its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import anyio
import anyio.lowlevel

from . import _protocol as p
from ._buffer import BatchSignal, ChunkBuffer, Entry
from ._event import Event

__all__ = ["Entry", "Produced", "ProducerReader", "ResumableStream"]

# A reader handing out ready chunks without awaiting anything would keep every other task of
# the process waiting (a 5-million-chunk buffer read this way blocked the loop for a second);
# it yields to the event loop every 1,024 chunks (a mask on state it keeps anyway: a counter of
# its own, or a smaller interval, cost a measurable share of a chunk's ~130 ns).
CHECKPOINT_MASK = 1023


class ResumableStream(Protocol):
    """A reader of one stream: an async iterator of its `str` chunks, with `aclose()`.

    The producer's own reader and a follower both offer this. `next_batch` and `take_ready`
    read in batches, each chunk with the character offset just past it (what an SSE event id
    needs); a chunk yielded as an `Event` comes out as that `Event`.
    """

    @property
    def attempt(self) -> int:
        """Which attempt of the stream this reads: 1, or more for a stream a writer started
        again (`restart=True`). An offset into it is resumed with `attempt=` this."""
        ...

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def __anext__(self) -> str: ...

    async def next_batch(self, limit: int | None = None) -> list[Entry]:
        """Wait for chunks and take those available (at most `limit`).

        Raises `StopAsyncIteration` at the end, or the error the stream ended with.
        """
        ...

    def take_ready(self) -> list[Entry]:
        """The chunks available right now, without waiting (possibly none)."""
        ...

    async def aclose(self) -> None:
        """Stop reading; the stream and every other reader carry on."""
        ...


class Produced(Protocol):
    """What a producer's own reader reads: a producer, as far as its readers go."""

    stream_id: str
    attempt: int
    buffer: ChunkBuffer
    changed: BatchSignal
    # Readers end only once the stream ended and its end was announced (and its recording
    # tried): `settled`, with `state` the terminal state.
    settled: bool
    state: str | None
    error: BaseException | None
    offline: bool  # it runs without resumability (its election failed)

    @property
    def error_type(self) -> str | None: ...


class ProducerReader:
    """The producer's own reader: reads the in-memory buffer, taking every new chunk per wake-up."""

    __slots__ = ("_closed", "_head", "_index", "_offset", "_producer")

    def __init__(self, producer: Produced, resume_at: int) -> None:
        self._producer = producer
        self._offset = resume_at
        self._index: int | None = None  # next chunk to take, once the buffer reached the offset
        self._head: Entry | None = None  # the first chunk, trimmed when resumed mid-chunk
        self._closed = False

    @property
    def attempt(self) -> int:
        return self._producer.attempt

    @property
    def offline(self) -> bool:
        """Whether its stream runs without resumability: nobody else can resume it."""
        return self._producer.offline

    def __aiter__(self) -> ProducerReader:
        return self

    async def __anext__(self) -> str:
        producer = self._producer
        chunks = producer.buffer.chunks
        index = self._index
        if index is not None and self._head is None and not self._closed:
            # The common case first: a chunk is there (a check or two per chunk read).
            if index >= len(chunks):
                if producer.settled:
                    return await self._next_slowly()
                # Waits here rather than in next_batch: an idle reader holds one frame less.
                await producer.changed.wait()
                index = self._index
                if index is None or index >= len(chunks) or self._closed:
                    return await self._next_slowly()
            if index & CHECKPOINT_MASK == CHECKPOINT_MASK:
                await anyio.lowlevel.checkpoint()  # let others run (the buffer only grows)
            self._index = index + 1
            return chunks[index]
        return await self._next_slowly()

    async def _next_slowly(self) -> str:
        item = (await self.next_batch(1))[0][0]
        return item if isinstance(item, str) else item.data

    async def next_batch(self, limit: int | None = None) -> list[Entry]:
        """Wait for chunks and take those available (at most `limit`); StopAsyncIteration at end."""
        producer = self._producer
        buffer = producer.buffer
        # The common case, once per batch of a live stream: wait for the next chunk and take it.
        index = self._index
        if index is not None and self._head is None and not self._closed:
            if index >= len(buffer.chunks) and not producer.settled:
                await producer.changed.wait()
            if index < len(buffer.chunks) and not self._closed:
                return self._take(limit)
        while not self._closed:
            if self._index is None and buffer.length > self._offset:
                index = buffer.index_at(self._offset)
                [(item, end)] = buffer.entries(index, index + 1)
                skip = self._offset - buffer.start_of(index)
                if skip:
                    if isinstance(item, str):
                        item = item[skip:]
                    else:
                        item = Event(item.data[skip:], item.event, item.retry)
                self._head = (item, end)
                self._index = index + 1
            if self._head is not None:
                head, self._head = self._head, None
                if limit == 1:
                    return [head]
                rest = self._take(None if limit is None else limit - 1)
                rest.insert(0, head)
                return rest
            if self._index is not None and self._index < len(buffer.chunks):
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
        if index is None or self._head is not None or self._closed:
            return []
        if index < len(self._producer.buffer.chunks):
            return self._take(None)
        return []

    def _take(self, limit: int | None) -> list[Entry]:
        assert self._index is not None
        index = self._index
        stop = len(self._producer.buffer.chunks)
        if limit is not None:
            stop = min(stop, index + limit)
        self._index = stop
        return self._producer.buffer.entries(index, stop)

    async def aclose(self) -> None:
        """Stop reading; the producer carries on for everybody else."""
        self._closed = True
        self._head = None
