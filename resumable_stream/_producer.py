"""The producer: runs the user's generator to completion and serves the stream to readers.

It keeps every chunk in memory. Its own reader reads that buffer directly. Followers elsewhere
send a request; the producer answers with a replay to their reply channel, then publishes live
batches on the stream's one live channel while anybody listens (zero commands per chunk while
nobody does). Whatever the generator does, the stream ends in a terminal state that is announced
to followers and written to the backend, with cleanup shielded from cancellation; a write that
fails (a full or unreachable Redis) is retried until it lands or the stream's TTL makes it moot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import AsyncIterable, Callable

import anyio
import anyio.lowlevel

from . import _protocol as p
from ._buffer import BatchSignal, ChunkBuffer, Signal
from ._event import Event
from ._exceptions import BackendError
from ._hub import Hub
from ._store import Store

logger = logging.getLogger("resumable_stream")

MakeStream = Callable[[], AsyncIterable[str | Event]]

# A source that never awaits would keep every other task (answering resume requests, readers)
# from running; the producer yields to the event loop after its first chunk and every so many.
_CHECKPOINT_EVERY = 64
# Recording the end takes up to two commands, each bounded by the backend's own deadline.
_CLEANUP_TIMEOUT = 15.0
_RECORD_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# The scope of a producer stopped through its task (see `Producer.stop`): it holds no state.
_NO_SCOPE = contextlib.nullcontext()


class Producer:
    # Slots: thousands of idle streams each hold one of these.
    __slots__ = (
        "_closing",
        "_epoch",
        "_fenced",
        "_following",
        "_hub",
        "_in_source",
        "_lingering",
        "_listening",
        "_live_index",
        "_make_stream",
        "_marking",
        "_on_stop",
        "_published",
        "_publishing",
        "_recorded",
        "_request_channel",
        "_requested",
        "_started",
        "_state_written",
        "_stop",
        "_stopping",
        "_store",
        "_superseded",
        "_task",
        "_write_error",
        "_written",
        "attempt",
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
        hub: Hub,
        stream_id: str,
        make_stream: MakeStream | None,
        offline: bool = False,
        attempt: int = 1,
    ) -> None:
        # Offline: started while the backend was unreachable, so it never won the election;
        # it serves its own reader only and leaves the backend alone.
        self.offline = offline
        self._hub = hub
        self.stream_id = stream_id
        self.attempt = attempt
        self.token = p.new_producer_token(attempt)
        # No `make_stream`: a writer's stream (`_writer.StreamWriter`), whose text is appended
        # to the buffer by the writer's own task; the producer waits for its end.
        self._make_stream = make_stream
        self._written: anyio.Event | None = None if make_stream is not None else anyio.Event()
        self._write_error: BaseException | None = None
        self._on_stop: Callable[[], None] | None = None
        self.buffer = ChunkBuffer()
        self.changed = BatchSignal()
        self.state: str | None = None
        # Readers end only once the end was announced and its recording tried, so whoever saw
        # the end and asks the backend next finds the stream finished.
        self.settled = False
        self._recorded = offline  # the terminal state is in the backend
        self._state_written = False  # its sentinel, of a memory-only stream (retries skip it)
        # Whether its count of restarts is known to be `attempt - 1` (see `_write_end`): an
        # attempt that a restart started, or a writer's once it set the count.
        self._fenced = attempt > 1
        self._marking: anyio.Event | None = None  # a writer's count of restarts being set
        self.error: BaseException | None = None
        self._started = anyio.current_time()
        self._request_channel = hub.keys.request(stream_id)
        self._listening = not offline
        # A stop interrupts whatever the generator awaits. On asyncio, when the context runs
        # this producer in a task of the loop's own (`_task`), by cancelling that task while
        # it is in the source (`_in_source`), once; otherwise by cancelling an anyio scope
        # (`_stop`), made when the run starts. The task's way costs nothing per stream, where
        # an anyio scope costs 0.8 KiB (with its two sets) for the whole life of the stream.
        self._task: asyncio.Task[None] | None = None
        self._stop: anyio.CancelScope | None = None
        self._stopping = False
        self._in_source = False
        # Leaving the context: no more lingering (`close`); the scope of the linger meanwhile.
        self._closing = False
        self._lingering: anyio.CancelScope | None = None
        self._superseded = False  # a newer attempt of its stream id took over here
        # Live publishing: on while somebody follows, from chunk `_live_index` on. `_epoch`
        # counts requests so a publish that reached nobody only turns it off if no follower
        # joined while that publish was in flight.
        self._following = False
        self._epoch = 0
        # When a request was last served: its follower may ask again soon (for the next window
        # of a replay, or for an end published before its live subscription took effect), so
        # the text is kept until then, `linger` or not.
        self._requested = -math.inf
        self._live_index = 0
        self._publishing = False
        self._published: Signal | None = None  # made when a publishing task starts
        # Durable streams: the text in the backend too, written by a task of the store's.
        self._store = (
            Store(hub, stream_id, self.token, self.buffer, self.changed)
            if hub.settings.durable and not offline
            else None
        )

    @property
    def _log(self) -> dict[str, str]:
        """The `extra` of this stream's log records: structured handlers index the id."""
        return {"stream_id": self.stream_id}

    @property
    def error_type(self) -> str | None:
        """The type name of the generator's exception: all that readers elsewhere learn of it."""
        return type(self.error).__name__ if self.error is not None else None

    async def run(
        self,
        ended: Callable[[Producer], None] | None = None,
        finished: Callable[[Producer], None] | None = None,
    ) -> None:
        """Run the generator to its end, announce the end and record it; then, with `ended`,
        call it and linger (see `linger`), then call `finished`: one coroutine, so an idle
        stream holds one frame less."""
        hub = self._hub
        if not self.offline:
            hub.add_producer(self)
        # In this task, so that the generator runs inside the stream's span (if traced).
        span = hub.telemetry.producer_started(self.stream_id)
        state = p.CANCELLED
        task = self._task
        if task is None:
            self._stop = anyio.CancelScope()
            if self._stopping:
                self._stop.cancel()
        try:
            with self._stop if self._stop is not None else _NO_SCOPE:
                if not self._stopping:
                    self._in_source = True
                    try:
                        if not self.offline:
                            await hub.connection.subscribe(self._request_channel, wait=False)
                            # For readers waiting for this stream to exist (not awaited).
                            started = p.Started(self.token).pack()
                            hub.connection.notify(hub.keys.live(self.stream_id), started)
                        if self._store is not None:
                            store = self._store
                            hub.spawn(self.stream_id, store.run, lambda: self.state is not None)
                        if self._written is not None:
                            # A writer's stream: its text comes from `StreamWriter.write`.
                            await self._written.wait()
                            if self._write_error is not None:
                                raise self._write_error
                        else:
                            # The source's loop, here rather than in a coroutine of its own:
                            # an idle stream holds one frame less.
                            buffer = self.buffer
                            # Readers and the live publisher wake once per batch of chunks.
                            notify = self.changed.notify_soon
                            count = 0
                            assert self._make_stream is not None
                            source = self._make_stream()
                            if not hasattr(source, "__aiter__"):
                                raise TypeError(
                                    f"make_stream() must return an async iterable, not {source!r}"
                                )
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
                                                "streams yield str or Event chunks, not "
                                                f"{type(chunk).__name__}"
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
                    finally:
                        # Before any other await: a stop from now on cancels nothing.
                        self._in_source = False
                    state = p.DONE
        except Exception as exc:
            state = p.FAILED
            self.error = exc
            logger.warning("stream %r failed", self.stream_id, exc_info=exc, extra=self._log)
        except asyncio.CancelledError:
            if task is None or not self._stopping:
                raise  # not a stop: the loop is shutting down, say
            # The stop's own cancellation, delivered in the source: the stream ends cancelled.
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()
        finally:
            try:
                self.state = state
                self.changed.notify()
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                    await self._finish(state)
                    if self._linger_time() <= 0 and self._recorded:
                        await self._stop_listening()
                self.settled = True
                self.changed.notify()
            finally:
                hub.telemetry.producer_ended(span, self.state, self.buffer.length)
                try:
                    if ended is not None:
                        ended(self)
                        await self.linger()
                finally:
                    if finished is not None:
                        finished(self)

    async def linger(self) -> None:
        """Keep answering late resumes for `linger` seconds, and until the end is recorded.

        A reader cut off near the end reconnects a moment later: the text is kept to answer it.
        Leaving the context does not wait for this.
        """
        try:
            if not self.offline and not self._closing:
                with anyio.CancelScope() as self._lingering:
                    until = anyio.current_time() + self._hub.settings.linger
                    # A request served meanwhile moves the end further (`_linger_time`).
                    while True:
                        wait = self._linger_time(until)
                        if wait <= 0:
                            break
                        await anyio.sleep(wait)
                    # Until then, a follower asking finds this producer, not a stream that
                    # seems to run with nobody producing it (which it would record as lost).
                    while not self._recorded:
                        await self.changed.wait()
        finally:
            self._lingering = None
            self._hub.remove_producer(self)
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                await self._stop_listening()

    def _linger_time(self, until: float | None = None) -> float:
        """How long to keep the text from now: until `until` (the end of `linger`), and at
        least until a follower that asked lately has had the time to ask again (for the next
        window of a replay; or for the end, if its live subscription took effect only after
        the end was published). Nothing with `linger` 0: then the text goes with the end."""
        linger = self._hub.settings.linger
        if not linger:
            return 0.0  # asked not to keep the text after the end at all
        now = anyio.current_time()
        if until is None:
            until = now + linger
        return max(until, self._requested + self._hub.lost_bound) - now

    async def _stop_listening(self) -> None:
        if self._listening:
            self._listening = False
            try:
                await self._hub.connection.unsubscribe(self._request_channel)
            except BackendError as exc:
                logger.warning(
                    "could not unsubscribe %r: %s", self._request_channel, exc, extra=self._log
                )
            except Exception:
                # Cleanup of one stream must never take the context (and every stream) down.
                logger.exception("could not unsubscribe %r", self._request_channel, extra=self._log)

    async def _finish(self, state: str) -> None:
        while self._publishing:
            assert self._published is not None
            await self._published.wait()
        if self.offline:
            return
        self._recorded = await self._record(state)
        # A durable stream's end is stored and announced in one command; if that failed (its
        # followers read the log, so this producer may not know of them), or for a followed
        # memory-only stream, it is announced whether or not the state could be written:
        # followers end now either way (one that misses text asks this producer, which stays
        # until the state is written).
        if (self._following and self._store is None) or (
            self._store is not None and not self._recorded
        ):
            end = p.End(None, self.token, self.buffer.length, state, self.error_type)
            try:
                live = self._hub.keys.live(self.stream_id)  # not kept: few streams need it
                await self._hub.connection.publish(live, end.pack())
            except BackendError as exc:
                logger.warning(
                    "could not announce the end of stream %r: %s",
                    self.stream_id,
                    exc,
                    extra=self._log,
                )
        if not self._recorded:
            self._hub.spawn(self.stream_id, self._record_later, state)

    async def _record(self, state: str, *, retry: bool = False) -> bool:
        if self._store is not None:
            # A durable end is written with the log, unfenced: a retry first checks that no
            # newer attempt started (where the count of restarts is this attempt's to tell).
            if retry and self._fenced:
                try:
                    if await self._started_again():
                        return True  # the state is the newer attempt's now, not this one's
                except BackendError:
                    return False
            recorded = await self._store.write_end(state, self.error_type, retry=retry)
            if recorded:
                with contextlib.suppress(BackendError):  # its TTL was set when it restarted
                    await self._keep_attempt()
            if recorded and retry:
                logger.warning(
                    "recorded the end of stream %r at last", self.stream_id, extra=self._log
                )
            return recorded
        try:
            if not self._state_written:  # not again once it landed: only what failed after it
                if not await self._write_end(state):
                    return True  # the state is the newer attempt's now
                self._state_written = True
            await self._keep_attempt()
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

    def marking(self) -> Callable[[bool], None]:
        """The stream's count of restarts is being set to this attempt's: its end waits for
        that (a round trip at most); call what this returns with whether it was set."""
        marking = self._marking = anyio.Event()

        def marked(fenced: bool) -> None:
            self._fenced = self._fenced or fenced
            marking.set()

        return marked

    async def _write_end(self, state: str) -> bool:
        """Write this attempt's end state, fenced by the attempt: a write that lands late (held
        by a stalled Redis or a slow link) after a retried job started the next attempt leaves
        that one be. False if it did.

        Only where the count of restarts is known to be this attempt's: a first attempt that
        a reader's INCR elected cannot tell a count left by an earlier stream of its id (its
        sentinel evicted, say) from one a restart since wrote, and writes its end plainly."""
        hub = self._hub
        keys = hub.keys
        if self._marking is not None:
            await self._marking.wait()  # bounded by the backend's deadline
        if not self._fenced:
            await hub.connection.set(
                keys.sentinel(self.stream_id), p.sentinel_value(state), hub.settings.ttl
            )
            return True
        return await hub.connection.finish(
            keys.sentinel(self.stream_id),
            keys.restarts(self.stream_id),
            p.sentinel_value(state),
            self.attempt,
            hub.settings.ttl,
        )

    async def _keep_attempt(self) -> None:
        """A written or restarted stream's count of restarts lives as long as its end state;
        never lowered: a newer attempt's count (a retry that started meanwhile) stays."""
        if self.attempt > 1 or self._written is not None:
            hub = self._hub
            key = hub.keys.restarts(self.stream_id)
            ours, ttl = str(self.attempt - 1), hub.settings.ttl
            if not await hub.connection.replace(key, ours, ours, ttl):
                await hub.connection.create(key, ours, ttl)  # gone: this attempt's, again

    async def _started_again(self) -> bool:
        """Whether a newer attempt of this stream started (a retried job's, elsewhere): an
        end this attempt writes late must not overwrite that one's state."""
        return await self._hub.attempt(self.stream_id) > self.attempt

    async def _record_later(self, state: str) -> None:
        # Until it lands, the backend says the stream runs; once the keys' TTL has passed it
        # no longer matters. A durable producer's writes give them their TTL again, so that
        # counts from the last one sent (it may land late: a stalled Redis runs it when it
        # resumes, and makes the keys again, running, if they expired meanwhile).
        ttl = self._hub.settings.ttl
        try:
            for delay in itertools.chain(_RECORD_DELAYS, itertools.repeat(_RECORD_DELAYS[-1])):
                since = self._started if self._store is None else self._store.sent_at
                if anyio.current_time() + delay >= since + ttl or self._superseded:
                    break
                await anyio.sleep(delay)
                if await self._record(state, retry=True):
                    break
        finally:
            self._recorded = True
            self.changed.notify()

    def stop(self) -> None:
        """Stop the generator; the stream ends as cancelled (no effect once it ended)."""
        if self._stopping:
            return  # a task cancelled twice would be cancelled again after the first
        self._stopping = True
        if self._stop is not None:
            self._stop.cancel()
        elif self._task is not None and self._in_source:
            self._task.cancel()
        if self._on_stop is not None and self.state is None:
            self._on_stop()  # a writer: its block is stopped too

    @property
    def stopping(self) -> bool:
        """Whether the stream was stopped (cancelled) before it ended."""
        return self._stopping

    def write_from(self, on_stop: Callable[[], None]) -> None:
        """A writer writes this stream; `on_stop` is called if the stream is stopped."""
        self._on_stop = on_stop

    def written(self, error: BaseException | None = None) -> None:
        """The writer is done: the stream ends done, or failed with `error`."""
        assert self._written is not None
        self._write_error = error
        self._written.set()

    def run_in(self, task: asyncio.Task[None]) -> None:
        """`task`, a task of the loop's own, runs this producer: a stop cancels it (while in
        the source). Called before the task first runs."""
        self._task = task

    def close(self) -> None:
        """The context is closing: stop the generator, and linger no more (what cancelling the
        context's task group does to a producer that runs in it)."""
        self._closing = True
        self.stop()
        if self._lingering is not None:
            self._lingering.cancel()

    def superseded(self) -> None:
        """A newer producer of this stream id (a restart) took over its request channel in this
        context: stop lingering, and leave the subscription to the newer one."""
        self._listening = False
        self._closing = True
        self._superseded = True  # nor write an end that is no longer its stream's
        if self._lingering is not None:
            self._lingering.cancel()

    def resync(self) -> None:
        """The backend reconnected (after a failover, say): what was written just before may
        be lost, so write the stream's state again, in the background; and once more when a
        follower that found nobody listening during the outage has had the time to decide
        that this producer was dead (`Hub.lost_bound`): a LOST it wrote then is undone."""
        if not self.offline:
            self._hub.spawn(self.stream_id, self._resync)

    async def _resync(self) -> None:
        await self._write_state_again()
        if self.state is None:
            await anyio.sleep(self._hub.lost_bound)
            await self._write_state_again()

    async def _write_state_again(self) -> None:
        hub = self._hub
        key = hub.keys.sentinel(self.stream_id)
        ttl = hub.settings.ttl
        try:
            if self.state is not None:
                if self._recorded and not await self._write_end(self.state):
                    return  # a newer attempt runs: its state is not this one's to write
            else:
                found = p.stream_state(await hub.connection.get(key))
                if found is None:
                    # The election was lost with the old master: without its key, a second
                    # producer could start under this id.
                    await hub.connection.create(key, "1", ttl)
                elif found == p.LOST:
                    # Somebody who could not reach this producer (it was on the other side of
                    # the failover) took it for dead; it is not. Compare-and-set: its own end,
                    # written meanwhile, is not to be turned back into a running stream.
                    await hub.connection.replace(key, p.sentinel_value(p.LOST), "1", ttl)
                elif found == p.CANCELLED:
                    self.stop()  # a stop that could not reach this producer meanwhile
            if self._store is not None:
                ended = None if self.state is None else (self.state, self.error_type)
                await self._store.repair(ended if self._recorded else None)
        except BackendError as exc:
            logger.debug(
                "could not write the state of stream %r again: %s",
                self.stream_id,
                exc,
                extra=self._log,
            )

    def on_request(self, request: p.Request) -> None:
        if request.after_end and self.state is None:
            return  # for an earlier, finished stream of this id, lingering somewhere
        serve = self._hub.telemetry.serving(self.stream_id, request.traceparent, self._serve)
        self._hub.spawn(self.stream_id, serve, request)

    def on_follow(self) -> None:
        """A durable stream's follower reads the log: heartbeat it while idle."""
        if self.state is None:
            self._follow(len(self.buffer.chunks))

    def _follow(self, count: int) -> None:
        """Somebody follows from chunk `count` on: publish live batches (a durable stream's go
        out with its writes) and heartbeats while anybody listens."""
        self._epoch += 1
        if not self._following:
            self._following = True
            self._live_index = count
        if not self._publishing:
            publish = self._publish_live if self._store is None else self._heartbeats
            if self._published is None:
                self._published = Signal()
            self._publishing = self._hub.spawn(self.stream_id, publish)

    async def _serve(self, request: p.Request) -> None:
        buffer = self.buffer
        length, count = buffer.length, len(buffer.chunks)
        state = self.state
        self._requested = anyio.current_time()  # its follower may ask again: stay for it
        if state is None:
            self._follow(count)
        connection = self._hub.connection
        limit = self._hub.settings.max_message_size
        start = min(request.resume_at, length)
        # One window: whole chunks up to the first that reaches `window` characters.
        stop = min(count, buffer.index_at(start + request.window - 1) + 1)
        upto = max(start, buffer.start_of(stop))
        more = upto < length
        pieces = list(p.split_pieces(buffer.wire(start, stop), start, limit))
        if not pieces:
            pieces = [(start, [], False)]
        listener, token = request.listener, self.token
        try:
            for i, (offset, chunks, cont) in enumerate(pieces):
                last = i == len(pieces) - 1
                replay = p.Replay(
                    listener, token, offset, chunks, cont, upto if last else None, more and last
                )
                await connection.publish(request.reply_to, replay.pack())
            if state is not None and not more:
                end = p.End(listener, token, length, state, self.error_type)
                await connection.publish(request.reply_to, end.pack())
        except BackendError as exc:
            logger.warning(
                "could not answer a resume request for %r: %s", self.stream_id, exc, extra=self._log
            )

    async def _heartbeats(self) -> None:
        """A durable stream, while somebody follows: when idle, say it is alive, and how much
        text is stored (a follower that has less asks for the rest)."""
        store = self._store
        assert store is not None
        connection = self._hub.connection
        interval = self._hub.settings.heartbeat
        channel = self._hub.keys.live(self.stream_id)
        failures = 0
        try:
            while self.state is None:
                with anyio.move_on_after(interval) as idle:
                    await self.changed.wait()
                if not idle.cancelled_caught:
                    continue  # text came: its write reaches the followers
                epoch = self._epoch
                alive = p.Heartbeat(self.token, store.stored_length).pack()
                try:
                    receivers = await connection.publish(channel, alive)
                except BackendError as exc:
                    # The next one is due a heartbeat later all the same: one that failed
                    # must not silence a live producer for good (its followers would take it
                    # for dead once they hear nothing for liveness_timeout).
                    self._publish_failed(exc, failures)
                    failures += 1
                    continue
                failures = 0
                if not receivers and epoch == self._epoch:
                    self._following = False
                    return
        finally:
            self._publishing = False
            assert self._published is not None
            self._published.notify()

    async def _publish_live(self) -> None:
        connection = self._hub.connection
        limit = self._hub.settings.max_message_size
        buffer = self.buffer
        heartbeat = self._hub.settings.heartbeat
        channel = self._hub.keys.live(self.stream_id)
        failures = 0
        try:
            while True:
                try:
                    while self._live_index == len(buffer.chunks):
                        if self.state is not None:
                            return
                        with anyio.move_on_after(heartbeat) as idle:
                            await self.changed.wait()
                        if idle.cancelled_caught:
                            # Followers hear something at least every `heartbeat` seconds, so
                            # silence means this producer is gone.
                            epoch = self._epoch
                            alive = p.Heartbeat(self.token, buffer.length).pack()
                            receivers = await connection.publish(channel, alive)
                            if not receivers and epoch == self._epoch:
                                self._following = False
                                return
                    index, stop = self._live_index, len(buffer.chunks)
                    self._live_index = stop
                    epoch = self._epoch
                    receivers = 0
                    start = buffer.start_of(index)
                    pieces = p.split_pieces(buffer.wire(start, stop), start, limit)
                    for offset, chunks, cont in pieces:
                        live = p.Live(self.token, offset, chunks, cont).pack()
                        receivers = await connection.publish(channel, live)
                    if receivers == 0 and epoch == self._epoch:
                        self._following = False
                        return
                    failures = 0
                except BackendError as exc:
                    # What did not go out, followers find missing at the next piece and ask
                    # for; this goes on (a failed publish must not silence a live producer),
                    # after a pause or the next change, so a Redis that is down is not spun on.
                    self._publish_failed(exc, failures)
                    failures += 1
                    if self.state is not None:
                        return
                    with anyio.move_on_after(min(heartbeat, 0.1 * failures)):
                        await self.changed.wait()
        finally:
            self._publishing = False
            assert self._published is not None
            self._published.notify()

    def _publish_failed(self, exc: BackendError, failures: int) -> None:
        # Warned once per spell of failures: the next tries go on (every heartbeat at most).
        logger.log(
            logging.DEBUG if failures else logging.WARNING,
            "could not publish stream %r to followers: %s",
            self.stream_id,
            exc,
            extra=self._log,
        )
