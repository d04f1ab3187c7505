"""A compat follower: a reader of a stream produced elsewhere, over the reference protocol.

Its producer may be Node's (npm `resumable-stream` 2.x) or ours in compat mode; nothing on the
wire says which. It subscribes its own `chunk:<listener>` channel, waits for the confirmation
(a reference producer answers at once), then publishes `{"listenerId", "skipCharacters"}` on
`request:<id>`. Messages carry no offsets, so it counts UTF-16 units itself: the first message
is the text from the offset, every later one a chunk, the DONE message the end.

What the reference does not say, this side finds out where it can:

- the offset: it asks for one unit more than it needs and drops it, so an empty answer proves
  the offset is past the producer's text (the reference would then send the live text whole:
  duplicated text); it then asks for the whole text and drops the units it has;
- two producers under one id: the request reached more than one subscriber;
- a dead producer (its process exited): nobody is subscribed to `request:<id>` on two checks
  a heartbeat apart while the sentinel says it runs (`ProducerLostError`; the shared sentinel
  is never written on its behalf);
- a lost DONE message: the sentinel says `"DONE"` (or is gone) on two checks in a row (the
  2.2.13 reference's own watchdog rule);
- how the stream ended: a Python producer's outcome key (failed, cancelled, or a length that
  says text never arrived); a Node producer writes none, and its stream ended well;
- lost messages after its subscriber reconnected: it asks again from its position, on a new
  channel (the reference never forgets a listener, so the old one is dropped, not reused).

A stuck producer that stays subscribed cannot be told from a slow model: the reader waits.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import deque

import anyio
import anyio.lowlevel

from . import _protocol as p
from ._buffer import Entry, Signal
from ._exceptions import (
    BackendError,
    ProducerConflictError,
    ProducerLostError,
    ProducerUnavailableError,
    ResumableStreamError,
    SlowReaderError,
    StreamIncompleteError,
    one_error,
)
from ._reader import CHECKPOINT_MASK
from ._telemetry import outcome_of
from ._vercel_hub import VercelHub
from ._vercel_wire import (
    DONE_MESSAGE,
    Outcome,
    drop_unit,
    encode_request,
    running,
    skip16,
    utf16_len,
)

__all__ = ["FINISHED", "VercelFollower", "end_error"]

logger = logging.getLogger("resumable_stream")

FINISHED = p.DONE  # what `join` returns for a stream that ended (its outcome says how)
_UNSUBSCRIBE_TIMEOUT = 2.0
# Asking again after reconnects, in a row, without any text arriving in between (a replay too
# large for Redis' pub/sub output buffer gets the subscriber dropped every time).
_MAX_ASKS = 3


def end_error(stream_id: str, outcome: Outcome | None, position: int) -> Exception | None:
    """How a stream whose end a reader reached at UTF-16 `position` ended, from its outcome key:
    None if it ended well (or a Node producer, which writes no outcome, made it)."""
    if outcome is None or outcome.state == p.LOST or outcome.length < position:
        # None (a Node producer's), a dead producer's (this one ended: an earlier stream of
        # this id died), or an earlier stream's (this one's text went further).
        return None
    if outcome.length > position:
        return StreamIncompleteError(
            f"stream {stream_id!r} ended at offset {outcome.length} but its text stopped "
            f"arriving at {position}"
        )
    return p.end_error(stream_id, outcome.state, outcome.detail)


class VercelFollower:
    def __init__(self, hub: VercelHub, stream_id: str, resume_at: int) -> None:
        self._hub = hub
        self.stream_id = stream_id
        self.listener: str | None = None  # the id of the request whose messages count
        self._channel: str | None = None  # its chunk channel, subscribed
        self.heard = anyio.current_time()  # when a message for this follower last arrived
        self._position = resume_at  # UTF-16 offset of the text that arrived
        self._consumed = resume_at  # ... and of the text handed to the reader
        self._waiting = False  # a request is out and its answer (first message) has not come
        self._overlap = False  # that request asked for one unit more, to be dropped
        self._ahead = False  # its answer was empty: the offset is past the producer's text
        self._trim = 0  # UTF-16 units still to drop from what arrives (after `_ahead`)
        self._ready: deque[Entry] = deque()
        self._done = False  # the stream's end arrived (DONE message, or the sentinel)
        self._error: ResumableStreamError | None = None
        self._signal = Signal()
        self._asking = False  # asking again, in a task of its own
        self._asks = 0  # asked again without text arriving since
        self._done_checks = 0  # checks in a row that found the sentinel finished or gone
        self._nobody_since: float | None = None  # checks found nobody producing it since
        self._detached = False
        self._active = False
        self._overflowed = False

    # Asking the producer

    async def join(self, late: bool = False) -> str | None:
        """Ask for the text from the reader's offset. Returns `RUNNING` once following,
        `FINISHED` for a stream that ended (its outcome decides how), None if there is no
        such stream. With `late`, only a finished Python producer lingering with its text
        answers (on `tail:<id>`), and a reader with nothing left gets `FINISHED`.

        Raises `ProducerLostError` if nobody listens for a running stream, `ProducerConflictError`
        if two producers do, `ProducerUnavailableError` if the producer did not answer in time.
        """
        self._hub.add_follower(self)
        try:
            state = await self._ask(late)
            if state == p.RUNNING and late:
                # The tail and the DONE message come together: a reader with all the text
                # learns at once that the stream is over, as one without a cursor would.
                with anyio.move_on_after(self._hub.settings.resume_timeout):
                    while not (self._ready or self._done or self._error):
                        await self._signal.wait()
                if not self._ready and self._error is None:
                    state = FINISHED
            if state != p.RUNNING:
                await self._detach()
            self.heard = anyio.current_time()
            return state
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._detach()
            raise

    async def _ask(self, late: bool = False) -> str | None:
        """Ask from the position; if the answer shows the offset is past the producer's text,
        ask for all of it and drop what the reader has."""
        state = await self._request(late, from_start=False)
        if state == p.RUNNING and self._ahead:
            if late:
                return FINISHED  # nothing left for this reader
            state = await self._request(late, from_start=True)
        return state

    async def _request(self, late: bool, from_start: bool) -> str | None:
        hub = self._hub
        connection = hub.connection
        names = hub.names
        settings = hub.settings
        position = self._position
        skip = None if from_start or position == 0 else position - 1
        self._trim = position if from_start else 0
        target = names.tail(self.stream_id) if late else names.request(self.stream_id)
        sentinel = names.sentinel(self.stream_id)
        nobody_since: float | None = None
        delays = p.retry_delays()
        resent = False
        try:
            request = await self._listen(skip)
            while True:
                # Each publish is awaited to its answer (the backend bounds it): a request
                # still on its way is not one that reached nobody.
                receivers = await connection.publish(target, request)
                if receivers > 1 and not late:
                    # PUBLISH counts pattern subscribers too (a monitoring tap): the
                    # channel's own subscribers are the producers.
                    receivers = await connection.numsub(target)
                if receivers > 1 and not late:
                    value = await connection.get(sentinel)
                    if not running(value):
                        return FINISHED if value is not None else None
                    raise ProducerConflictError(
                        f"stream {self.stream_id!r} has {receivers} producers subscribed: "
                        "it was started twice under one id, and their texts would mix"
                    )
                if receivers:
                    if await self._answered(settings.resume_timeout / 2):
                        return p.RUNNING
                    if not resent:
                        # The request or its answer was lost on the way (a connection that
                        # broke): once more, under a new listener id (a reference producer
                        # would answer one id twice, and send it everything twice).
                        resent = True
                        request = await self._listen(skip)
                        continue
                    if await self._answered(settings.resume_timeout / 2):
                        return p.RUNNING
                    value = await connection.get(sentinel)
                    if late:
                        return FINISHED
                    if not running(value):
                        # The reference's ioredis adapter drops a request that comes as its
                        # producer ends: the stream is finished.
                        return FINISHED if value is not None else None
                    raise ProducerUnavailableError(
                        f"the producer of stream {self.stream_id!r} did not answer within "
                        f"{settings.resume_timeout}s"
                    )
                # Nobody subscribed: not listening yet, subscribing again after an outage,
                # finished, or gone.
                if late:
                    return FINISHED  # no finished producer lingers with the text
                now = anyio.current_time()
                first = nobody_since is None
                if nobody_since is None:
                    nobody_since = now
                value = await connection.get(sentinel)
                if not running(value):
                    return FINISHED if value is not None else None
                if (first and await self._known_lost()) or hub.may_declare_lost(
                    nobody_since, settings.resume_timeout
                ):
                    await self._record_lost()
                    raise ProducerLostError(
                        f"the producer of stream {self.stream_id!r} is gone: nobody listens "
                        "to its requests"
                    )
                if now - nobody_since >= hub.lost_bound:
                    raise ProducerUnavailableError(
                        f"nobody listened for the producer of stream {self.stream_id!r}, while "
                        "the connection to the backend was not settled enough to tell whether "
                        "it is gone"
                    )
                await anyio.sleep(next(delays))
        finally:
            self._waiting = False

    async def _listen(self, skip: int | None) -> bytes:
        """A new listener id, its channel subscribed (confirmed: a reference producer answers
        at once), the previous one let go; returns the request to publish."""
        hub = self._hub
        old = self._channel
        hub.forget(self.listener)  # what comes for an earlier request no longer counts
        self.listener = listener = str(uuid.uuid4())
        self._channel = channel = hub.names.chunk(listener)
        hub.listen(listener, self)
        self._overlap = skip is not None
        self._ahead = False
        self._waiting = True
        await hub.connection.subscribe(channel, wait=True)
        if old is not None:
            await self._unsubscribe(old)
        return encode_request(listener, skip)

    async def _answered(self, timeout: float) -> bool:
        """Wait up to `timeout` for the answer (the first message) to the request."""
        with anyio.move_on_after(timeout):
            while self._waiting and self._error is None:
                await self._signal.wait()
        return not self._waiting or self._error is not None

    async def _known_lost(self) -> bool:
        """Whether a reader found this stream's producer dead already (its outcome says so)."""
        hub = self._hub
        outcome = Outcome.parse(await hub.connection.get(hub.names.outcome(self.stream_id)))
        return outcome is not None and outcome.state == p.LOST

    async def _record_lost(self) -> None:
        """Tell later Python readers (for `lost_ttl`), in the Python-only outcome key; never in
        the shared sentinel: a Node producer may be alive behind a reconnect."""
        hub = self._hub
        outcome = Outcome(p.LOST, self._position, None, "")
        try:
            await hub.connection.set(
                hub.names.outcome(self.stream_id), outcome.pack(), hub.settings.lost_ttl
            )
        except BackendError as exc:
            logger.debug("could not record stream %r as lost: %s", self.stream_id, exc)

    async def _unsubscribe(self, channel: str) -> None:
        try:
            await self._hub.connection.unsubscribe(channel)
        except BackendError as exc:
            logger.warning(
                "could not unsubscribe %r: %s", channel, exc, extra={"stream_id": self.stream_id}
            )

    def resync(self) -> None:
        """Messages may have been lost (the subscriber reconnected): ask from the position."""
        if self._detached or self._done or self._error or self._waiting or self._asking:
            return
        self._asking = self._hub.spawn(self.stream_id, self._ask_again)

    async def _ask_again(self) -> None:
        try:
            self._asks += 1
            if self._asks > _MAX_ASKS:
                raise ProducerUnavailableError(
                    f"stream {self.stream_id!r}: asked its producer {_MAX_ASKS} times in a row "
                    "after reconnects and got no text (a replay too large for Redis' pub/sub "
                    "output buffer?)"
                )
            if await self._ask() != p.RUNNING:
                self._done = True  # it ended meanwhile (its DONE message was lost)
        except ResumableStreamError as exc:
            self.fail(exc)
        finally:
            self._asking = False
            self._signal.notify()

    # Messages

    def deliver(self, listener: str, data: bytes) -> None:
        """Called by the hub for every message on this follower's chunk channel."""
        if listener != self.listener or self._detached or self._overflowed or self._done:
            return  # an earlier request's, or after the end (a reference follower stops there)
        self.heard = anyio.current_time()
        text = data.decode("utf-8", "replace")
        if text == DONE_MESSAGE:
            # The end, whenever it comes (a reference follower reads a chunk equal to it so).
            self._waiting = False
            self._done = True
        elif self._waiting:
            self._waiting = False  # the answer: the text from the offset asked for
            if self._overlap:
                if not text:
                    self._ahead = True  # the producer has less text than the reader
                    self._hub.forget(listener)
                    self.listener = None
                else:
                    self._take(drop_unit(text))
            else:
                self._take(text)
        else:
            self._take(text)
        self._signal.notify()

    def _take(self, text: str) -> None:
        if self._trim:
            text, self._trim = skip16(text, self._trim)
        if not text:
            return
        self._asks = 0
        self._position += utf16_len(text)
        self._ready.append((text, self._position))
        backlog = self._position - self._consumed
        if backlog > self._hub.settings.max_backlog:
            self._overflowed = True
            self._ready.clear()
            self._error = SlowReaderError(
                f"a reader of stream {self.stream_id!r} fell {backlog} characters behind "
                f"(max_backlog={self._hub.settings.max_backlog}); resume from offset "
                f"{self._consumed} to catch up"
            )

    def fail(self, error: ResumableStreamError) -> None:
        if self._error is None:
            self._error = error
        self._waiting = False
        self._signal.notify()

    # Reading

    @property
    def attempt(self) -> int:
        """A compat stream has one attempt."""
        return 1

    def __aiter__(self) -> VercelFollower:
        return self

    async def __anext__(self) -> str:
        ready = self._ready
        if ready and not len(ready) & CHECKPOINT_MASK:
            await anyio.lowlevel.checkpoint()
            ready = self._ready
        if ready:
            item, self._consumed = ready.popleft()
        else:
            item = (await self.next_batch(1))[0][0]
        assert isinstance(item, str)  # compat streams hold text only
        return item

    def take_ready(self) -> list[Entry]:
        """The chunks available right now, without waiting (possibly none)."""
        ready = self._ready
        if not ready:
            return []
        self._ready = deque()
        self._consumed = ready[-1][1]
        return list(ready)

    async def next_batch(self, limit: int | None = None) -> list[Entry]:
        """Wait for chunks and take those available (at most `limit`); StopAsyncIteration at end."""
        heartbeat = self._hub.settings.heartbeat
        while True:
            ready = self._ready
            if ready:
                if limit is None or len(ready) <= limit:
                    return self.take_ready()
                batch = [ready.popleft() for _ in range(limit)]
                self._consumed = batch[-1][1]
                return batch
            if self._error is not None:
                error, self._error = self._error, None
                await self._finish_reading(outcome_of(error))
                raise error
            if self._done:
                await self._end()
            if self._detached:
                raise StopAsyncIteration
            if self._asking:
                await self._signal.wait()
                continue
            wake = self.heard + heartbeat
            with anyio.move_on_after(max(0.0, wake - anyio.current_time())):
                await self._signal.wait()
                continue
            await self._check()

    async def _check(self) -> None:
        """Nothing came for a heartbeat: is the stream over (a lost DONE message), or its
        producer gone? The sentinel and the request channel's subscribers, in one round trip."""
        hub = self._hub
        found: list[object] = [None, None]

        async def read_sentinel() -> None:
            found[0] = await hub.connection.get(hub.names.sentinel(self.stream_id))

        async def count_producers() -> None:
            found[1] = await hub.connection.numsub(hub.names.request(self.stream_id))

        now = self.heard = anyio.current_time()  # the next check a heartbeat from now
        try:
            with one_error():  # Redis down fails both: one error, not a group
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_sentinel)
                    tg.start_soon(count_producers)
        except BackendError as exc:
            logger.debug("could not check stream %r: %s", self.stream_id, exc)
            return
        value, producers = found
        assert value is None or isinstance(value, str)
        if not running(value):
            self._nobody_since = None
            self._done_checks += 1
            if self._done_checks >= 2:
                self._done = True
            return
        self._done_checks = 0
        if producers != 0:
            self._nobody_since = None
            return
        if self._nobody_since is None:
            self._nobody_since = now
        # A heartbeat of it, once this side's connection has been up a while: the reference's
        # own end (SET, UNSUBSCRIBE and the DONE message, concurrently) and a producer that is
        # subscribing again after an outage are not a death.
        if self._hub.may_declare_lost(self._nobody_since, self._hub.settings.heartbeat):
            await self._record_lost()
            self.fail(
                ProducerLostError(
                    f"the producer of stream {self.stream_id!r} is gone: nobody listens to its "
                    "requests any more"
                )
            )

    async def _end(self) -> None:
        """The end arrived: how it ended is in the outcome key (a Python producer's)."""
        hub = self._hub
        try:
            outcome = Outcome.parse(await hub.connection.get(hub.names.outcome(self.stream_id)))
        except BackendError as exc:
            await self._finish_reading(outcome_of(exc))
            raise
        error = end_error(self.stream_id, outcome, self._position)
        await self._finish_reading(outcome_of(error, None if outcome is None else outcome.state))
        if error is not None:
            raise error
        raise StopAsyncIteration

    async def _finish_reading(self, outcome: str) -> None:
        await self._detach(outcome)
        self._done = False
        self._error = None

    async def aclose(self) -> None:
        """Stop following; the producer and every other reader carry on."""
        self._ready.clear()
        await self._detach()

    @property
    def received(self) -> int:
        """The UTF-16 offset up to which text has arrived."""
        return self._position

    def activate(self) -> None:
        """The reader got this follower: it counts as active until it ends."""
        self._active = True
        self._hub.telemetry.follower_started()

    async def _detach(self, outcome: str = "detached") -> None:
        if self._detached:
            return
        self._detached = True
        self._signal.notify()
        if self._active:
            self._hub.telemetry.follower_ended(outcome, self._position - self._consumed)
        hub = self._hub
        hub.forget(self.listener)
        hub.remove_follower(self)
        channel, self._channel = self._channel, None
        if channel is None:
            return
        # RuntimeError: the context is closed, and its subscriptions ended with it.
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(_UNSUBSCRIBE_TIMEOUT),
            contextlib.suppress(RuntimeError),
        ):
            await self._unsubscribe(channel)
