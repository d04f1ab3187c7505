"""A follower: a reader of a stream produced elsewhere (another context, process or machine).

It merges the replay (sent to its context's inbox) and the live batches (on the stream's live
channel) by character offset, so overlap between them is dropped and chunk boundaries are kept.
Live messages that arrive before the replay is complete wait until it is.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import anyio

from . import _protocol as p
from ._buffer import Entry, Signal
from ._event import Event
from ._exceptions import ResumableStreamError, SlowReaderError, StreamIncompleteError
from ._producer import end_error

if TYPE_CHECKING:
    from ._context import ResumableStreamContext


class Follower:
    def __init__(
        self, context: ResumableStreamContext, stream_id: str, listener: str, resume_at: int
    ) -> None:
        self._context = context
        self.stream_id = stream_id
        self.listener = listener
        self.acked = anyio.Event()
        self.ended = anyio.Event()  # the end of the stream (or an error) arrived
        self.heard = anyio.current_time()  # when a message for this follower last arrived
        self._position = resume_at  # text before this offset has been taken
        self._consumed = resume_at  # text before this offset has been handed to the reader
        self._partial: list[str] = []  # the start of a chunk that continues in the next message
        self._partial_label: list[Any] | None = None
        self._ready: deque[Entry] = deque()
        self._replayed = False
        self._early: list[tuple[bytes, list[Any]]] = []
        self._end: tuple[int, str, str | None] | None = None
        self._error: ResumableStreamError | None = None
        self._signal = Signal()
        self._detached = False
        self._overflowed = False

    def deliver(self, tag: bytes, payload: list[Any]) -> None:
        """Called by the context for every message addressed to this follower."""
        self.heard = anyio.current_time()
        if tag == p.HEARTBEAT or self._overflowed:
            return
        try:
            if tag == p.REPLAY:
                _, start, chunks, cont, upto = payload
                self.acked.set()
                self._take(start, chunks, cont)
                if upto is not None:
                    self._replayed = True
                    early, self._early = self._early, []
                    for item in early:
                        self._apply(*item)
            elif self._replayed:
                self._apply(tag, payload)
            else:
                self._early.append((tag, payload))
        except (ValueError, TypeError):
            self._error = ResumableStreamError(f"malformed message for stream {self.stream_id!r}")
        if self._error is not None or self._end is not None:
            self.ended.set()
        self._signal.notify()

    def fail(self, error: ResumableStreamError) -> None:
        if self._error is None:
            self._error = error
        self.acked.set()
        self.ended.set()
        self._signal.notify()

    @property
    def position(self) -> int:
        """The offset up to which this follower has the text."""
        return self._position

    def ended_with_nothing_left(self) -> str | None:
        """The end state, once the stream ended with nothing more for this reader."""
        if self._end is None or self._error is not None or self._ready or self._partial:
            return None
        if self._position < self._end[0]:
            return None
        return self._end[1]

    def _apply(self, tag: bytes, payload: list[Any]) -> None:
        if tag == p.LIVE:
            self._take(*payload)
        elif tag == p.END:
            _, length, state, detail = payload
            self._end = (length, state, detail)

    def _take(self, start: int, chunks: list[Any], cont: bool) -> None:
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            if isinstance(chunk, str):
                text, label = chunk, None
            else:
                text, *label = chunk
                if not isinstance(text, str) or len(label) != 2:
                    raise ValueError("malformed chunk")
            end = start + len(text)
            if end > self._position:
                if start > self._position:
                    self._error = StreamIncompleteError(
                        f"stream {self.stream_id!r} lost text between offsets "
                        f"{self._position} and {start}"
                    )
                    return
                piece = text[self._position - start :]
                self._position = end
                if cont and i == last:
                    if not self._partial:
                        self._partial_label = label
                    self._partial.append(piece)
                    start = end
                    continue
                if self._partial:
                    self._partial.append(piece)
                    piece = "".join(self._partial)
                    self._partial.clear()
                    label, self._partial_label = self._partial_label, None
                if label is None:
                    self._ready.append((piece, end))
                else:
                    self._ready.append((Event._from_wire(piece, *label), end))
            start = end
        backlog = self._position - self._consumed
        if backlog > self._context._max_backlog:
            # A reader this far behind would make the process hold the stream twice; drop
            # what it has not read and end it, so memory stays bounded.
            self._overflowed = True
            self._ready.clear()
            self._partial.clear()
            self._error = SlowReaderError(
                f"a reader of stream {self.stream_id!r} fell {backlog} characters behind "
                f"(max_backlog={self._context._max_backlog}); resume from offset "
                f"{self._consumed} to catch up"
            )

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> str:
        if self._ready:
            item, self._consumed = self._ready.popleft()
        else:
            item = (await self._batch(1))[0][0]
        return item if isinstance(item, str) else item.data

    def _take_ready(self) -> list[Entry]:
        """The chunks available right now, without waiting (possibly none)."""
        ready = self._ready
        if not ready:
            return []
        self._ready = deque()
        self._consumed = ready[-1][1]
        return list(ready)

    async def _batch(self, limit: int | None = None) -> list[Entry]:
        """Wait for chunks and take those available (at most `limit`); StopAsyncIteration at end."""
        while True:
            ready = self._ready
            if ready:
                if limit is None or len(ready) <= limit:
                    return self._take_ready()
                batch = [ready.popleft() for _ in range(limit)]
                self._consumed = batch[-1][1]
                return batch
            if self._error is not None:
                error, self._error = self._error, None
                await self._detach()
                self._end = (0, p.DONE, None)
                raise error
            if self._end is not None:
                await self._detach()
                length, state, detail = self._end
                self._end = (0, p.DONE, None)
                ended = end_error(self.stream_id, state, detail)
                if ended is not None:
                    raise ended
                if self._position < length:
                    raise StreamIncompleteError(
                        f"stream {self.stream_id!r} ended at offset {length} but only "
                        f"{self._position} characters arrived"
                    )
                raise StopAsyncIteration
            if self._detached:
                raise StopAsyncIteration
            silence = self.heard + self._context._liveness_timeout - anyio.current_time()
            with anyio.move_on_after(silence):
                await self._signal.wait()
                continue
            await self._context._probe(self)

    async def aclose(self) -> None:
        """Stop following; the producer and every other reader carry on."""
        self._ready.clear()
        await self._detach()

    async def _detach(self) -> None:
        if not self._detached:
            self._detached = True
            await self._context._detach_follower(self)
