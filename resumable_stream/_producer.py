"""The producer: runs the user's generator to completion and serves the stream to readers.

It keeps every chunk in memory. Its own reader reads that buffer directly. Followers elsewhere
send a request; the producer answers with a replay to their context's inbox, then publishes live
batches on the stream's one live channel while anybody listens (zero commands per chunk while
nobody does). Whatever the generator does, the stream ends in a terminal state that is written
to the backend and announced to followers, with cleanup shielded from cancellation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from . import _protocol as p
from ._buffer import ChunkBuffer, Entry, Signal
from ._event import Event
from ._exceptions import (
    BackendError,
    ProducerLostError,
    StreamCancelledError,
    StreamFailedError,
)

if TYPE_CHECKING:
    from ._context import ResumableStreamContext

logger = logging.getLogger("resumable_stream")

MakeStream = Callable[[], AsyncIterable[str | Event]]

# A source that never awaits would keep every other task (answering resume requests, readers)
# from running; the producer yields to the event loop after its first chunk and every so many.
_CHECKPOINT_EVERY = 64
_CLEANUP_TIMEOUT = 5.0


class Producer:
    # Slots: thousands of idle streams each hold one of these.
    __slots__ = (
        "_context",
        "_epoch",
        "_following",
        "_listening",
        "_live_channel",
        "_live_index",
        "_make_stream",
        "_published",
        "_publishing",
        "_request_channel",
        "_stop",
        "buffer",
        "changed",
        "error",
        "offline",
        "settled",
        "state",
        "stream_id",
    )

    def __init__(
        self,
        context: ResumableStreamContext,
        stream_id: str,
        make_stream: MakeStream,
        offline: bool = False,
    ) -> None:
        # Offline: started while the backend was unreachable, so it never won the election;
        # it serves its own reader only and leaves the backend alone.
        self.offline = offline
        self._context = context
        self.stream_id = stream_id
        self._make_stream = make_stream
        self.buffer = ChunkBuffer()
        self.changed = Signal()
        self.state: str | None = None
        # Readers end only once the terminal state is recorded, so whoever saw the end and asks
        # the backend next finds the stream finished.
        self.settled = False
        self.error: BaseException | None = None
        self._request_channel = context._keys.request(stream_id)
        self._listening = not offline
        # Cancelling this scope is a stop: it interrupts whatever the generator awaits.
        self._stop = anyio.CancelScope()
        self._live_channel = context._keys.live(stream_id)
        # Live publishing: on while somebody follows, from chunk `_live_index` on. `_epoch`
        # counts requests so a publish that reached nobody only turns it off if no follower
        # joined while that publish was in flight.
        self._following = False
        self._epoch = 0
        self._live_index = 0
        self._publishing = False
        self._published = Signal()

    @property
    def error_type(self) -> str | None:
        """The type name of the generator's exception: all that readers elsewhere learn of it."""
        return type(self.error).__name__ if self.error is not None else None

    async def run(self) -> None:
        context = self._context
        connection = context._connection()
        if not self.offline:
            context._request_routes[self._request_channel] = self
        state = p.CANCELLED
        try:
            try:
                with self._stop:
                    if not self.offline:
                        await connection.subscribe(self._request_channel, wait=False)
                    await self._pump()
                    state = p.DONE
            except Exception as exc:
                state = p.FAILED
                self.error = exc
                logger.warning("stream %r failed", self.stream_id, exc_info=exc)
            finally:
                self.state = state
                self.changed.notify()
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                    await self._finish(state)
                    if not context._linger:
                        await self._stop_listening()
                self.settled = True
                self.changed.notify()
            # Linger: a reader cut off near the end reconnects a moment later; keep the text
            # to answer it. Leaving the context does not wait for this.
            context._producer_finished(self)
            await anyio.sleep(0 if self.offline else context._linger)
        finally:
            if context._request_routes.get(self._request_channel) is self:
                del context._request_routes[self._request_channel]
            context._producer_finished(self)
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                await self._stop_listening()

    async def _stop_listening(self) -> None:
        if self._listening:
            self._listening = False
            try:
                await self._context._connection().unsubscribe(self._request_channel)
            except BackendError as exc:
                logger.warning("could not unsubscribe %r: %s", self._request_channel, exc)
            except Exception:
                # Cleanup of one stream must never take the context (and every stream) down.
                logger.exception("could not unsubscribe %r", self._request_channel)

    async def _pump(self) -> None:
        buffer = self.buffer
        notify = self.changed.notify
        count = 0
        source = self._make_stream()
        if not hasattr(source, "__aiter__"):
            raise TypeError(f"make_stream() must return an async iterable, not {source!r}")
        iterator = source.__aiter__()
        try:
            async for chunk in iterator:
                if type(chunk) is not str:
                    if isinstance(chunk, Event):
                        buffer.append_event(chunk)
                        notify()
                    elif isinstance(chunk, str):
                        if chunk:
                            buffer.append(str(chunk))
                            notify()
                    else:
                        raise TypeError(
                            f"streams yield str or Event chunks, not {type(chunk).__name__}"
                        )
                elif chunk:
                    buffer.append(chunk)
                    notify()
                count += 1
                if count == 1 or count % _CHECKPOINT_EVERY == 0:
                    await anyio.lowlevel.checkpoint()
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _finish(self, state: str) -> None:
        connection = self._context._connection()
        keys = self._context._keys
        while self._publishing:
            await self._published.wait()
        if self.offline:
            return
        detail = self.error_type
        try:
            await connection.set(
                keys.sentinel(self.stream_id), p.sentinel_value(state), self._context._ttl
            )
            if self._following:
                end = p.pack(p.END, [None, self.buffer.length, state, detail])
                await connection.publish(self._live_channel, end)
        except BackendError as exc:
            logger.warning("could not record the end of stream %r: %s", self.stream_id, exc)

    def stop(self) -> None:
        """Stop the generator; the stream ends as cancelled (no effect once it ended)."""
        self._stop.cancel()

    def on_request(self, payload: list[Any]) -> None:
        try:
            listener, inbox, resume_at, after_end = payload
            resume_at = p.validate_resume_at(resume_at)
            if not (isinstance(listener, str) and isinstance(inbox, str)):
                raise ValueError("bad request")
        except ValueError:
            logger.warning("ignored a malformed resume request for %r", self.stream_id)
            return
        if after_end and self.state is None:
            return  # for an earlier, finished stream of this id, lingering somewhere
        self._start(self._serve, listener, inbox, resume_at)

    def _start(self, task: Callable[..., Awaitable[None]], *args: object) -> bool:
        # Helpers run in the context's task group: a task group per stream would cost more
        # memory than the rest of an idle stream. They must never raise into it.
        tg = self._context._tg
        if tg is None:
            return False
        tg.start_soon(_contained, self.stream_id, task, *args)
        return True

    async def _serve(self, listener: str, inbox: str, resume_at: int) -> None:
        buffer = self.buffer
        length, stop = buffer.length, len(buffer.chunks)
        state = self.state
        if state is None:
            self._epoch += 1
            if not self._following:
                self._following = True
                self._live_index = stop
            if not self._publishing:
                self._publishing = self._start(self._publish_live)
        connection = self._context._connection()
        limit = self._context._max_message_size
        start = min(resume_at, length)
        pieces = list(p.split_pieces(buffer.wire(resume_at, stop), start, limit))
        if not pieces:
            pieces = [(start, [], False)]
        try:
            for i, (offset, chunks, cont) in enumerate(pieces):
                upto = length if i == len(pieces) - 1 else None
                await connection.publish(
                    inbox, p.pack(p.REPLAY, [listener, offset, chunks, cont, upto])
                )
            if state is not None:
                end = [listener, length, state, self.error_type]
                await connection.publish(inbox, p.pack(p.END, end))
        except BackendError as exc:
            logger.warning("could not answer a resume request for %r: %s", self.stream_id, exc)

    async def _publish_live(self) -> None:
        connection = self._context._connection()
        limit = self._context._max_message_size
        buffer = self.buffer
        heartbeat = self._context._liveness_timeout / 3
        try:
            while True:
                while self._live_index == len(buffer.chunks):
                    if self.state is not None:
                        return
                    with anyio.move_on_after(heartbeat) as idle:
                        await self.changed.wait()
                    if idle.cancelled_caught:
                        # Followers hear something at least every `heartbeat` seconds, so
                        # silence means this producer is gone.
                        epoch = self._epoch
                        alive = p.pack(p.HEARTBEAT, [buffer.length])
                        receivers = await connection.publish(self._live_channel, alive)
                        if not receivers and epoch == self._epoch:
                            self._following = False
                            return
                index, stop = self._live_index, len(buffer.chunks)
                self._live_index = stop
                epoch = self._epoch
                receivers = 0
                start = buffer.start_of(index)
                for offset, chunks, cont in p.split_pieces(buffer.wire(start, stop), start, limit):
                    receivers = await connection.publish(
                        self._live_channel, p.pack(p.LIVE, [offset, chunks, cont])
                    )
                if receivers == 0 and epoch == self._epoch:
                    self._following = False
                    return
        except BackendError as exc:
            logger.warning("could not publish stream %r to followers: %s", self.stream_id, exc)
        finally:
            self._publishing = False
            self._published.notify()

    def reader(self, resume_at: int) -> ProducerReader:
        return ProducerReader(self, resume_at)


async def _contained(stream_id: str, task: Callable[..., Awaitable[None]], *args: object) -> None:
    try:
        await task(*args)
    except Exception:
        logger.exception("a helper task of stream %r failed", stream_id)


def end_error(stream_id: str, state: str, detail: str | None) -> Exception | None:
    """The exception a reader raises for a stream that ended in `state`, or None if done."""
    if state == p.FAILED:
        cause = f": its generator raised {detail}" if detail else ""
        return StreamFailedError(f"stream {stream_id!r} failed{cause}")
    if state == p.CANCELLED:
        return StreamCancelledError(f"stream {stream_id!r} was cancelled")
    if state == p.LOST:
        return ProducerLostError(f"the producer of stream {stream_id!r} died before its end")
    return None


class ProducerReader:
    """The producer's own reader: reads the in-memory buffer, taking every new chunk per wake-up."""

    __slots__ = ("_closed", "_head", "_index", "_offset", "_producer")

    def __init__(self, producer: Producer, resume_at: int) -> None:
        self._producer = producer
        self._offset = resume_at
        self._index: int | None = None  # next chunk to take, once the buffer reached the offset
        self._head: Entry | None = None  # the first chunk, trimmed when resumed mid-chunk
        self._closed = False

    def __aiter__(self) -> ProducerReader:
        return self

    async def __anext__(self) -> str:
        chunks = self._producer.buffer.chunks
        index = self._index
        if index is not None and index < len(chunks) and self._head is None and not self._closed:
            self._index = index + 1
            return chunks[index]
        item = (await self._batch(1))[0][0]
        return item if isinstance(item, str) else item.data

    async def _batch(self, limit: int | None = None) -> list[Entry]:
        """Wait for chunks and take those available (at most `limit`); StopAsyncIteration at end."""
        producer = self._producer
        buffer = producer.buffer
        while not self._closed:
            if self._index is None and buffer.length > self._offset:
                index = buffer.index_at(self._offset)
                [(item, end)] = buffer.entries(index, index + 1)
                skip = self._offset - buffer.start_of(index)
                if skip:
                    if isinstance(item, str):
                        item = item[skip:]
                    else:
                        item = item._with_data(item.data[skip:])
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
                error = end_error(producer.stream_id, producer.state, producer.error_type)
                if error is not None:
                    raise error from producer.error
                break
            await producer.changed.wait()
        raise StopAsyncIteration

    def _take_ready(self) -> list[Entry]:
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
