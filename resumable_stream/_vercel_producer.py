"""A compat producer: runs the user's generator to completion and serves the stream to readers
of the reference protocol (npm `resumable-stream` 2.x), Node's and ours alike.

It keeps every chunk in memory, as the reference does. A follower publishes a JSON request on
`request:<id>`; the producer answers on the follower's own `chunk:<listener>` channel with the
text from the requested UTF-16 offset (one message, or pieces of `max_message_size`
characters), then every live chunk, then the DONE message: one task per listener, so its
messages go out in that order. Nothing is sent per chunk while nobody listens.

Where the reference is lossy, this side does better without saying anything a reference
follower could misread: the first message (the answer, which a reference follower waits for)
is retried while it reaches nobody (a follower of 2.0/2.1 subscribes while it asks); an offset
past the text drops that much of the live text instead of duplicating it; no message equals
the DONE message; a listener whose channel has nobody left gets no more live text but still
the DONE message. The end, whatever the outcome, writes the outcome key (for Python readers),
then `"DONE"` in the shared sentinel (the only end the reference knows), then sends the DONE
message to every listener; Node readers therefore see a failed or cancelled stream as a
finished, shorter one. Cleanup is shielded from cancellation and bounded.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterable, Callable

import anyio
import anyio.lowlevel

from . import _protocol as p
from ._buffer import BatchSignal, Signal
from ._event import Event
from ._exceptions import BackendError
from ._vercel_hub import VercelHub
from ._vercel_reader import Buffer16
from ._vercel_wire import (
    DONE_BYTES,
    DONE_VALUE,
    Outcome,
    Request,
    messages,
    skip16,
    slice_start,
    well_formed,
)

__all__ = ["MakeStream", "VercelProducer"]

logger = logging.getLogger("resumable_stream")

MakeStream = Callable[[], AsyncIterable[str | Event]]

_CHECKPOINT_EVERY = 64  # see `_producer`: a source that never awaits must not starve the rest
_CLEANUP_TIMEOUT = 15.0
_RECORD_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# A reference follower gives up 1 s after it asked (`Timeout waiting for ack`): the answer is
# retried that long while it reaches nobody, and a finished producer keeps answering requests
# that long (the reference's followers racing the end get their text, not `null`).
_ANSWER_WINDOW = 1.0
_GRACE = 1.0


class _Listener:
    """A follower the producer answers: its channel, and where its live text resumes."""

    __slots__ = ("channel", "done", "index", "replay", "sending", "skip")

    def __init__(self, channel: str, index: int, skip: int, replay: str) -> None:
        self.channel = channel
        self.index = index  # the next chunk it gets live
        self.skip = skip  # UTF-16 units of live text to drop (it asked for an offset past it)
        self.replay = replay  # its answer, until sent
        self.sending = False  # its task runs
        self.done = False  # it got the DONE message


class VercelProducer:
    __slots__ = (
        "_armed",
        "_channels",
        "_closing",
        "_held",
        "_hub",
        "_lingering",
        "_listeners",
        "_make_stream",
        "_on_ended",
        "_recorded",
        "_scope",
        "_senders",
        "_senders_changed",
        "_started",
        "_stopping",
        "announced",
        "buffer",
        "changed",
        "error",
        "offline",
        "settled",
        "state",
        "stream_id",
        "token",
    )

    def __init__(
        self,
        hub: VercelHub,
        stream_id: str,
        make_stream: MakeStream,
        *,
        offline: bool = False,
        subscribed: bool = False,
        armed: bool = True,
        on_ended: Callable[[VercelProducer], None] | None = None,
    ) -> None:
        # Offline: started while the backend was unreachable; it serves its own reader only.
        self.offline = offline
        self._hub = hub
        self.stream_id = stream_id
        self.token = p.new_producer_token()
        self._make_stream = make_stream
        self._on_ended = on_ended
        self.buffer = Buffer16()
        self.changed = BatchSignal()
        self.state: str | None = None
        self.settled = False  # the end is announced (and its recording tried)
        self.announced = offline  # the end is recorded or its recording failed: DONE may go
        self.error: BaseException | None = None
        self._recorded = offline
        self._started = anyio.current_time()
        # The channels subscribed for this producer (the explicit path subscribes first).
        self._channels: tuple[str, ...] = (
            hub.names.producer_channels(stream_id) if subscribed else ()
        )
        # Until armed (the explicit path: until it is sure to be the producer), requests wait.
        self._armed = armed
        self._held: list[tuple[Request, bool]] = []
        self._listeners: dict[str, _Listener] = {}
        self._senders = 0
        self._senders_changed = Signal()
        self._scope: anyio.CancelScope | None = None
        self._stopping = False
        self._closing = False
        self._lingering: anyio.CancelScope | None = None

    @property
    def _log(self) -> dict[str, str]:
        return {"stream_id": self.stream_id}

    @property
    def error_type(self) -> str | None:
        return type(self.error).__name__ if self.error is not None else None

    # What the context drives

    def run_in(self, task: object) -> None:
        """The context runs this producer in a task of the loop's own: nothing to keep (a stop
        cancels the producer's own scope)."""

    def stop(self) -> None:
        """Stop the generator; the stream ends as cancelled (no effect once it ended)."""
        if self._stopping:
            return
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()

    def close(self) -> None:
        """The context is closing: stop the generator, and linger no more."""
        self._closing = True
        self.stop()
        if self._lingering is not None:
            self._lingering.cancel()

    def arm(self) -> None:
        """It is the producer (the explicit path won): answer what waited meanwhile."""
        self._armed = True
        held, self._held = self._held, []
        for request, late in held:
            self.on_request(request, late)

    async def run(
        self,
        ended: Callable[[VercelProducer], None] | None = None,
        finished: Callable[[VercelProducer], None] | None = None,
    ) -> None:
        """Run the generator to its end, record and announce the end; then call `ended`,
        linger, and call `finished` (the context's bookkeeping, as for a native producer)."""
        hub = self._hub
        if not self.offline:
            hub.add_producer(self)
        span = hub.telemetry.producer_started(self.stream_id)
        state = p.CANCELLED
        self._scope = scope = anyio.CancelScope()
        if self._stopping:
            scope.cancel()
        try:
            with scope:
                if not self.offline and not self._channels:
                    self._channels = hub.names.producer_channels(self.stream_id)
                    await hub.connection.subscribe(*self._channels, wait=False)
                await self._produce()
                state = p.DONE
        except Exception as exc:
            state = p.FAILED
            self.error = exc
            logger.warning("stream %r failed", self.stream_id, exc_info=exc, extra=self._log)
        finally:
            try:
                self.state = state
                self.changed.notify()
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                    await self._finish(state)
                self.settled = True
                self.changed.notify()
            finally:
                hub.telemetry.producer_ended(span, self.state, self.buffer.length)
                try:
                    if self._on_ended is not None:
                        self._on_ended(self)
                    if ended is not None:
                        ended(self)
                        await self._linger()
                finally:
                    if finished is not None:
                        finished(self)

    async def _produce(self) -> None:
        buffer = self.buffer
        notify = self.changed.notify_soon
        count = 0
        source = self._make_stream()
        if not hasattr(source, "__aiter__"):
            raise TypeError(f"make_stream() must return an async iterable, not {source!r}")
        iterator = source.__aiter__()
        try:
            async for chunk in iterator:
                if type(chunk) is str:
                    text = chunk
                elif isinstance(chunk, Event):
                    text = chunk.data  # names and retry do not cross the reference's wire
                elif isinstance(chunk, str):
                    text = str(chunk)
                else:
                    raise TypeError(
                        f"streams yield str or Event chunks, not {type(chunk).__name__}"
                    )
                if text:
                    buffer.append(well_formed(text))
                    notify()
                count += 1
                if count == 1 or count % _CHECKPOINT_EVERY == 0:
                    await anyio.lowlevel.checkpoint()
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    # Requests

    def on_request(self, request: Request, late: bool) -> None:
        """A request on `request:<id>`, or with `late` on the Python-only `tail:<id>` (a
        finished stream's tail, which a running producer leaves to its finished namesake)."""
        if self.offline:
            return
        if not self._armed:
            self._held.append((request, late))
            return
        if self.state is None:
            if not late:
                self._register(request)
        elif not self.announced:
            self._register(request)  # its task sends the DONE message once the end is recorded
        else:
            self._hub.spawn(self.stream_id, self._register_late, request)

    async def _register_late(self, request: Request) -> None:
        """A request after the end: answered only if the id was not started again since (the
        new stream's followers must not get this one's text)."""
        try:
            value = await self._hub.connection.get(self._hub.names.sentinel(self.stream_id))
        except BackendError:
            return
        if value == DONE_VALUE:
            self._register(request)

    def _register(self, request: Request) -> None:
        """Add a listener and start its task: synchronous, so its answer (the text up to now)
        and its live text (from the next chunk on) meet exactly."""
        if request.listener in self._listeners:
            return  # the reference would send it everything twice
        buffer = self.buffer
        length = buffer.length
        start = slice_start(request.skip, length)
        if start <= length:
            listener = _Listener("", len(buffer.chunks), 0, buffer.text_from(start))
        else:
            # The reference answers "" and sends the live text whole (duplicated text); this
            # producer drops the units the follower says it has.
            listener = _Listener("", len(buffer.chunks), start - length, "")
        listener.channel = self._hub.names.chunk(request.listener)
        self._listeners[request.listener] = listener
        listener.sending = True
        self._senders += 1
        if not self._hub.spawn(self.stream_id, self._send, listener):
            listener.sending = False
            self._senders -= 1

    async def _send(self, listener: _Listener) -> None:
        """Everything one listener gets, in order: the answer, the live text, the DONE message."""
        hub = self._hub
        connection = hub.connection
        limit = hub.settings.max_message_size
        channel = listener.channel
        try:
            pieces = list(messages(listener.replay, limit))
            listener.replay = ""
            # The answer: retried while it reaches nobody (a follower subscribing as it asks).
            deadline = anyio.current_time() + _ANSWER_WINDOW
            for delay in p.retry_delays():
                if await connection.publish(channel, pieces[0].encode()):
                    break
                if anyio.current_time() + delay > deadline:
                    return  # never subscribed, or gone: the DONE message is still sent
                await anyio.sleep(delay)
            for piece in pieces[1:]:
                if not await connection.publish(channel, piece.encode()):
                    return
            buffer = self.buffer
            while True:
                if listener.index < len(buffer.chunks):
                    for message in self._live(listener, limit):
                        if not await connection.publish(channel, message.encode()):
                            # Its reader is gone (a reference follower unsubscribes when it is
                            # cancelled): no more live text for it.
                            return
                    continue
                if self.state is not None and self.announced:
                    await connection.publish(channel, DONE_BYTES)
                    listener.done = True
                    return
                await self.changed.wait()
        except BackendError as exc:
            logger.warning(
                "could not publish stream %r to a follower: %s",
                self.stream_id,
                exc,
                extra=self._log,
            )
        finally:
            listener.sending = False
            self._senders -= 1
            self._senders_changed.notify()

    def _live(self, listener: _Listener, limit: int) -> list[str]:
        """The messages of a listener's next live text: one per chunk, or, for a listener that
        fell behind, its chunks together in messages of at most `limit` characters."""
        chunks = self.buffer.chunks
        stop = len(chunks)
        new = chunks[listener.index : stop]
        listener.index = stop
        if listener.skip:
            kept = []
            for chunk in new:
                chunk, listener.skip = skip16(chunk, listener.skip)
                if chunk:
                    kept.append(chunk)
            new = kept
        if len(new) == 1:
            return list(messages(new[0], limit))
        out: list[str] = []
        batch: list[str] = []
        size = 0
        for chunk in new:
            if batch and size + len(chunk) > limit:
                out.extend(messages("".join(batch), limit))
                batch, size = [], 0
            batch.append(chunk)
            size += len(chunk)
        if batch:
            out.extend(messages("".join(batch), limit))
        return out

    # The end

    async def _finish(self, state: str) -> None:
        if self.offline:
            return
        self._recorded = await self._record(state)
        # Whether or not it could be written: readers end now (a follower that misses the DONE
        # message learns the end from the sentinel once the retried write lands).
        self.announced = True
        self.changed.notify()
        dormant = [x for x in self._listeners.values() if not x.sending and not x.done]
        if dormant:
            # Their reader was gone, or is reconnecting: the DONE message ends it in any case.
            async with anyio.create_task_group() as tg:
                for listener in dormant:
                    tg.start_soon(self._send_done, listener)
        while self._senders:
            await self._senders_changed.wait()
        if self._listeners and state != p.DONE:
            logger.warning(
                "stream %r ended %s: readers of the reference protocol (Node) see it as finished",
                self.stream_id,
                state,
                extra=self._log,
            )
        if not self._recorded:
            self._hub.spawn(self.stream_id, self._record_later, state)

    async def _send_done(self, listener: _Listener) -> None:
        try:
            await self._hub.connection.publish(listener.channel, DONE_BYTES)
            listener.done = True
        except BackendError as exc:
            logger.warning(
                "could not announce the end of stream %r: %s", self.stream_id, exc, extra=self._log
            )

    async def _write_end(self, state: str) -> None:
        """Write the outcome (Python readers), then `"DONE"` in the shared sentinel."""
        hub = self._hub
        names = hub.names
        ttl = hub.settings.ttl
        outcome = Outcome(state, self.buffer.length, self.error_type, self.token)
        await hub.connection.set(names.outcome(self.stream_id), outcome.pack(), ttl)
        await hub.connection.set(names.sentinel(self.stream_id), DONE_VALUE, ttl)

    async def _record(self, state: str, *, retry: bool = False) -> bool:
        try:
            await self._write_end(state)
        except BackendError as exc:
            level = logging.DEBUG if retry else logging.WARNING
            logger.log(
                level,
                "could not record the end of stream %r (%s)",
                self.stream_id,
                exc,
                extra=self._log,
            )
            return False
        if retry:
            logger.warning("recorded the end of stream %r at last", self.stream_id, extra=self._log)
        return True

    async def _record_later(self, state: str) -> None:
        deadline = self._started + self._hub.settings.ttl
        try:
            for delay in itertools.chain(_RECORD_DELAYS, itertools.repeat(_RECORD_DELAYS[-1])):
                if anyio.current_time() + delay >= deadline:
                    break
                await anyio.sleep(delay)
                if await self._record(state, retry=True):
                    break
        finally:
            self._recorded = True
            self.changed.notify()

    async def _linger(self) -> None:
        """Answer the reference's followers that raced the end for `_GRACE` seconds, then let
        the request channel go (a lingering subscriber would make an id started again, by a
        Node `createNewResumableStream` say, look like two producers); keep answering the
        Python-only tail requests of readers with a cursor for the rest of `linger`."""
        hub = self._hub
        linger = hub.settings.linger
        try:
            if not self.offline and not self._closing:
                with anyio.CancelScope() as self._lingering:
                    grace = min(_GRACE, linger)
                    await anyio.sleep(grace)
                    if linger > grace:
                        names = hub.names
                        channels = (names.request(self.stream_id), names.cancel(self.stream_id))
                        with anyio.CancelScope(shield=True):
                            await self._unsubscribe(channels)
                        await anyio.sleep(linger - grace)
                    while not self._recorded:
                        await self.changed.wait()
        finally:
            self._lingering = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                await self._unsubscribe(self._channels)
            hub.remove_producer(self)

    async def _unsubscribe(self, channels: tuple[str, ...]) -> None:
        """Let `channels` go, unless another producer of this id (started again in this
        context) took them over."""
        channels = tuple(c for c in channels if c in self._channels)
        if not channels:
            return
        self._channels = tuple(c for c in self._channels if c not in channels)
        if not self._hub.owns(self):
            return
        try:
            await self._hub.connection.unsubscribe(*channels)
        except BackendError as exc:
            logger.warning("could not unsubscribe %r: %s", channels, exc, extra=self._log)
        except Exception:
            logger.exception("could not unsubscribe %r", channels, extra=self._log)

    def resync(self) -> None:
        """The backend reconnected: write the stream's state again (a failover may have lost
        it)."""
        if not self.offline:
            self._hub.spawn(self.stream_id, self._write_state_again)

    async def _write_state_again(self) -> None:
        hub = self._hub
        key = hub.names.sentinel(self.stream_id)
        try:
            if self.state is not None:
                if self._recorded:
                    await self._write_end(self.state)
            elif await hub.connection.get(key) is None:
                # Without it a second producer could start under this id.
                await hub.connection.create(key, "1", hub.settings.ttl)
        except BackendError as exc:
            logger.debug(
                "could not write the state of stream %r again: %s",
                self.stream_id,
                exc,
                extra=self._log,
            )
