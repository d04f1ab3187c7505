"""What the context hands out: a reader of one stream, chunk by chunk or in batches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from ._buffer import Entry

__all__ = ["Entry", "ResumableStream"]

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
