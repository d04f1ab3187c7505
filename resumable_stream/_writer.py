"""A writer: a stream whose text your own code pushes (a background job, a script), not a
generator that the context runs.

It sits beside the producer: the context elects it as it elects a producer, and it drives a
`Producer` that has no generator. `write` appends to the producer's buffer in the writer's own
task, with the producer's wake-up of its readers: the producer's reader, the hub and the
protocol serve a written stream exactly as a produced one (followers, replays, liveness,
durable storage, telemetry). Nothing of it waits for Redis.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType

import anyio
import anyio.lowlevel

from ._event import Event
from ._exceptions import ResumableStreamError, StreamCancelledError, StreamFailedError
from ._producer import Producer

__all__ = ["StreamWriter"]

# As a producer's source loop does: a writer that never awaits anything else lets the readers
# and the helpers of the process run every so many chunks.
_CHECKPOINT_MASK = 63
# How long ending waits for the end to be announced and written (each step of which is bounded).
_SETTLE_TIMEOUT = 40.0


class StreamWriter:
    """Writes one stream: `async with ctx.writer(stream_id) as w: await w.write(chunk)`.

    `write(chunk)` takes a `str` or an `Event`; it appends to the stream at once and never waits
    for Redis (readers wake once per batch of chunks; followers get one message per batch, a
    durable stream one write per `flush_interval`). Leaving the block normally ends the stream
    done; an exception ends it failed (and goes on); `close()` and `fail(message)` end it
    before that. Ending waits until the end is announced and written, so a job that returns
    has recorded its stream's end.

    A stop (`ctx.cancel_stream` from any process, or the context closing) ends the stream
    cancelled and stops the block as a stop stops a generator: whatever it awaits is
    cancelled, a `write` after it raises `StreamCancelledError`, and the `async with` then
    exits without an exception (`cancelled` tells). A cancellation from outside (the task's own)
    ends the stream cancelled and goes on.
    """

    __slots__ = (
        "_append",
        "_buffer",
        "_cancel_error",
        "_count",
        "_ended",
        "_notify",
        "_producer",
        "_scope",
        "_start",
        "_writable",
        "stream_id",
    )

    def __init__(self, stream_id: str, start: Callable[[], Awaitable[Producer]]) -> None:
        self.stream_id = stream_id
        self._start = start
        self._producer: Producer | None = None
        self._scope: anyio.CancelScope | None = None
        self._ended = False
        # Entered, and neither ended nor stopped: the one check of a write.
        self._writable = False
        self._count = 0
        self._cancel_error: StreamCancelledError | None = None

    def __repr__(self) -> str:
        return f"<StreamWriter {self.stream_id!r}>"

    @property
    def attempt(self) -> int:
        """Which attempt of the stream this writes (1, or more after `restart=True`)."""
        return self._running().attempt

    @property
    def cancelled(self) -> bool:
        """Whether the stream was stopped before the writer ended it."""
        return self._producer is not None and self._producer.stopping

    async def __aenter__(self) -> StreamWriter:
        if self._producer is not None:
            raise RuntimeError("a writer is entered once")
        producer = await self._start()
        self._producer = producer
        self._notify = producer.changed.notify_soon
        self._buffer = producer.buffer
        self._append = producer.buffer.append
        scope = self._scope = anyio.CancelScope()
        scope.__enter__()
        producer.write_from(self._stopped)
        self._writable = True
        return self

    def _stopped(self) -> None:
        self._writable = False
        assert self._scope is not None
        self._scope.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        producer = self._running()
        assert self._scope is not None
        # Our scope takes back its own cancellation (a stop) and lets anything else through.
        stopped = bool(self._scope.__exit__(exc_type, exc, tb))
        self._writable = False
        if not self._ended:
            self._ended = True
            if producer.stopping:
                pass  # the stop ended it cancelled
            elif exc is None:
                producer.written()
            elif isinstance(exc, Exception):
                producer.written(exc)
            else:
                producer.stop()  # cancelled from outside, or the process is exiting
        await _settled(producer)
        if producer.stopping and (stopped or (exc is not None and exc is self._cancel_error)):
            return True  # the stop's own way out of the block
        return stopped or None

    async def write(self, chunk: str | Event) -> None:
        """Append `chunk` to the stream (an empty `str` adds nothing). Raises
        `StreamCancelledError` once the stream was stopped, `ResumableStreamError` once the
        writer ended it, `ValueError` for a chunk that is neither a `str` nor an `Event`."""
        if not self._writable:
            self._refuse()
        if type(chunk) is str:
            if not chunk:
                return
            # `ChunkBuffer.append`, inlined: a call less per chunk is a tenth of a write.
            buffer = self._buffer
            length = buffer.length = buffer.length + len(chunk)
            buffer.chunks.append(chunk)
            buffer.ends.append(length)
        else:
            self._append_other(chunk)
        self._notify()
        count = self._count = self._count + 1
        if not count & _CHECKPOINT_MASK:
            await anyio.lowlevel.checkpoint()

    def write_many(self, chunks: Iterable[str | Event]) -> None:
        """Append several chunks at once, without waiting or yielding to the event loop (the
        readers wake once for all of them): for code that gets its chunks in batches, such as
        the sync context's writer. What `write` raises, this raises, before appending the
        chunk that is refused."""
        if not self._writable:
            self._refuse()
        append = self._append
        try:
            for chunk in chunks:
                if type(chunk) is str:
                    if chunk:
                        append(chunk)
                else:
                    self._append_other(chunk)
        finally:
            self._notify()

    def _append_other(self, chunk: object) -> None:
        producer = self._producer
        assert producer is not None
        if isinstance(chunk, Event):
            producer.buffer.append_event(chunk)
        elif isinstance(chunk, str):
            if chunk:
                producer.buffer.append(str(chunk))
        else:
            raise ValueError(f"a stream's chunks are str or Event, not {type(chunk).__name__}")

    async def close(self) -> None:
        """End the stream done (idempotent; nothing once it was stopped)."""
        producer = self._running()
        self._writable = False
        if not self._ended:
            self._ended = True
            if not producer.stopping:
                producer.written()
        await _settled(producer)

    async def fail(self, message: str) -> None:
        """End the stream failed: its readers get `StreamFailedError` (`message` goes to the log
        and to readers in this process, as a generator's exception does)."""
        if not isinstance(message, str):
            raise ValueError(f"message must be a str, not {type(message).__name__}")
        producer = self._running()
        self._writable = False
        if not self._ended:
            self._ended = True
            if not producer.stopping:
                producer.written(StreamFailedError(message))
        await _settled(producer)

    def _running(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("use the writer as `async with ctx.writer(stream_id) as w:`")
        return self._producer

    def _refuse(self) -> None:
        producer = self._running()
        if producer.stopping:
            error = StreamCancelledError(f"stream {self.stream_id!r} was stopped")
            self._cancel_error = error
            raise error
        raise ResumableStreamError(f"the writer of stream {self.stream_id!r} has ended it")


async def _settled(producer: Producer) -> None:
    """Wait until the stream's end is announced and its recording tried (shielded: a job that
    is being cancelled still records how its stream ended)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(_SETTLE_TIMEOUT):
        while not producer.settled:
            await producer.changed.wait()
