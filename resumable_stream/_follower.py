"""A follower: a reader of a stream produced elsewhere (another context, process or machine).

It asks the producer for the text from its offset (a `Request`), then merges the replay (sent
to its context's reply channel) and the live batches (on the stream's live channel) by character
offset, so overlap is dropped and chunk boundaries are kept. Live messages that arrive while a
replay is due wait until it is complete.

Messages get lost: Redis drops a subscriber that falls behind, restarts, fails over. Whenever
the offsets show a gap (a live batch starting past what arrived, a heartbeat or an end past it)
or the producer falls silent, the follower asks again from its position and holds live batches
aside until that replay arrives. Only a producer that no longer has the text (or is gone) ends
it with an error. Every message names its producer, and a follower never mixes two producers.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import deque
from collections.abc import Awaitable, Iterator
from typing import Any

import anyio
import anyio.lowlevel

from . import _protocol as p
from ._buffer import Entry, Signal
from ._event import Event
from ._exceptions import (
    BackendError,
    ProducerConflictError,
    ProducerLostError,
    ProducerUnavailableError,
    ResumableStreamError,
    SlowReaderError,
    StreamIncompleteError,
    StreamRestartedError,
    one_error,
)
from ._hub import Hub
from ._reader import CHECKPOINT_MASK
from ._store import parse as parse_entry
from ._telemetry import outcome_of

__all__ = ["Follower"]

# The entry that holds the reader's offset and the next: the first chunk comes soon, and the
# page grows to about a replay window from the sizes seen.
_FIRST_PAGE = 2
_MAX_PAGE = 1024
# Requests in a row that the producer got (somebody was subscribed) but never answered.
_MAX_UNANSWERED = 3
# Compare-and-set tries of recording a dead producer whose sentinel readers keep counting into.
_RECORD_TRIES = 3


class Follower:
    def __init__(
        self, hub: Hub, stream_id: str, resume_at: int, attempt: int | None = None
    ) -> None:
        self._hub = hub
        self.stream_id = stream_id
        # The attempt the reader's offset is from (None: whichever it finds first). A producer
        # of a later attempt is a restart, never text to take from that offset.
        self._attempt = attempt
        self.restarted: StreamRestartedError | None = None
        self.listener: str | None = None  # the id of the request whose answers count
        self.acked = anyio.Event()  # the producer answered the first request
        self.ended = anyio.Event()  # the end of the stream (or an error) arrived
        now = anyio.current_time()
        self.heard = now  # when a message for this follower last arrived
        self._position = resume_at  # text before this offset has been taken
        self._consumed = resume_at  # text before this offset has been handed to the reader
        self._partial: list[str] = []  # the start of a chunk that continues in the next message
        self._partial_label: tuple[Any, Any] | None = None
        # Where a chunk cut across messages continues, and its name (sent with its first part).
        self._cont_end: int | None = None
        self._cont_label: tuple[Any, Any] | None = None
        self._ready: deque[Entry] = deque()
        self._producer: str | None = None  # the token of the producer whose text this is
        self._awaiting = True  # a request is out whose replay has not all arrived
        self._answered = False  # some of that replay arrived
        self._progress = now  # when it was sent, or a piece of it arrived
        self._unanswered = 0
        self._recovering = False
        self._again = False  # another request is due once the one being sent is out
        self._early: list[p.Message] = []  # live messages held aside while a replay is due
        self._end: p.End | None = None
        self._error: ResumableStreamError | None = None
        self._signal = Signal()
        self._detached = False
        self._active = False  # counted by telemetry as an active follower
        self._overflowed = False
        # Durable streams: the text is read from the backend's log, a page at a time as the
        # reader takes it, and the producer is asked only for what the log lost.
        self._durable = hub.settings.durable
        self._announced = False  # the producer was told a durable reader is here (`Follow`)
        self._store_pending = False  # the log may hold text from the position on, not read yet
        self._store_useless = False  # it did not hold what was missing: ask the producer
        self._after_store: ResumableStreamError | None = None  # raised once the log is read
        self._page = _FIRST_PAGE  # entries per read
        self._short_reads = 0  # reads in a row that ended before what a message claims

    # Asking the producer

    async def join(self, after_end: bool = False) -> str | None:
        """Get the text from the reader's offset on: from the producer, or for a durable
        stream from the backend's log.

        Returns the stream's state as found: `RUNNING` once the reader is ready, a terminal
        state when there is nothing to read, or None if there is no such stream. With
        `after_end`, only a producer lingering after the end may answer (or the log). Raises
        `ProducerUnavailableError` if the producer got the request but did not answer within
        `resume_timeout`, `ProducerLostError` if nobody listens for a running stream.
        """
        if self._durable:
            return await self._join_stored(after_end)
        return await self._join_requested(after_end)

    async def _join_stored(self, after_end: bool) -> str | None:
        hub = self._hub
        start = self._position
        try:
            # What is written from now on is also published to us (before the log is read).
            await (await hub.follow(self))
            self._announce()
            self._awaiting = True  # live batches wait until the log is read
            self._store_pending = True
            found: list[str | None] = []

            async def read_state() -> None:
                found.append(await hub.state(self.stream_id))

            with one_error():  # not a group of two errors (Redis down fails both reads)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_state)  # in the same round trip as the first read
                    await self._read_store()
            state = found[0]
            if self._error is not None:
                return p.RUNNING  # the reader learns it
            got_nothing = self._position == start and self._end is None
            if state is None and got_nothing and not self._ready:
                await self.aclose()
                return None
            if self._end is not None and after_end:
                left = self._nothing_left()
                if left is not None:
                    await self.aclose()
                    return left
            lost = (
                got_nothing
                and not self._store_pending
                and ((state != p.RUNNING and state is not None) or start > 0)
            )
            if lost:
                # The log has nothing from here although the stream had text (a reader with a
                # cursor) or ended (the log ends with the end): it lost it. Ask the producer.
                self._store_useless = True
                self._store_pending = False
                answer = await self._join_requested(after_end)
                if state in p.TERMINAL_STATES and state != p.DONE and not self.acked.is_set():
                    # It ended badly (perhaps before it stored anything: stopped before it
                    # started, or its producer died): the reader learns how.
                    await self.aclose()
                    return state
                if state in p.TERMINAL_STATES and not self.acked.is_set():
                    # Finished, and nobody lingers with the text: it is gone, and saying
                    # "nothing more" would pass a shorter text off as the whole.
                    raise StreamIncompleteError(
                        f"the stored text of stream {self.stream_id!r} was lost (evicted, or "
                        "Redis restarted without persistence) and its producer no longer has it"
                    )
                return answer
            self.heard = anyio.current_time()
            return p.RUNNING
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def _read_store(self) -> None:
        """Take the next page of the log, from the position on."""
        hub = self._hub
        entries = await hub.connection.read(
            hub.keys.text(self.stream_id), self._position, self._page
        )
        size = 0
        for entry in entries:
            size += len(entry[3])
            try:
                message = parse_entry(entry)
            except ValueError:
                self._error = ResumableStreamError(
                    f"malformed stored text for stream {self.stream_id!r}"
                )
                break
            if not self._same_producer(message.producer):
                break
            if type(message) is p.Live:
                assert isinstance(message, p.Live)
                if message.start > self._position:
                    self._store_failed()  # a hole: the log lost text
                    return
                self._take(message.start, message.chunks, False)
            else:
                assert isinstance(message, p.End)
                if message.length > self._position:
                    self._store_failed()
                    return
                self._end = message
        # As many entries as make about a replay window next time.
        window = hub.settings.replay_window
        read_to_end = len(entries) < self._page
        # At least two: the entry that holds the position (read already, in part) and the next.
        self._page = max(_FIRST_PAGE, min(_MAX_PAGE, self._page * window // max(size, 1)))
        if read_to_end and self._end is None and self._error is None and self._log_short():
            # The log ends before text that a message held aside says exists (an end announced
            # although its write failed): read once more, since that write may have landed
            # after this read went out, then ask the producer.
            self._short_reads += 1
            if self._short_reads > 1:
                self._short_reads = 0
                self._store_failed()
                self._recover_soon()
            self._signal.notify()
            return
        self._short_reads = 0
        if read_to_end or self._end is not None or self._error is not None:
            self._store_done()
        if self._error is not None or self._end is not None:
            self.ended.set()
        self._signal.notify()

    def _log_short(self) -> bool:
        """Whether a message held aside claims text past the reader's position."""
        position = self._position
        for message in self._early:
            if isinstance(message, p.Live) and message.start > position:
                return True
            if isinstance(message, p.End | p.Heartbeat) and message.length > position:
                return True
        return False

    def _store_done(self) -> None:
        """The log is read to its end: the live batches held aside follow."""
        self._store_pending = False
        if self._after_store is not None:
            error, self._after_store = self._after_store, None
            if self._end is None:
                self.fail(error)
                return
        self._release_early()

    def _store_failed(self) -> None:
        self._store_pending = False
        self._store_useless = True
        self._recover_soon()

    async def _join_requested(self, after_end: bool) -> str | None:
        hub = self._hub
        try:
            subscribed: Awaitable[None] | None = await hub.follow(self)
            request = self._new_request(after_end)
            nobody_since: float | None = None
            late = False  # the live subscription took effect after the answer began
            delays = p.retry_delays()
            while True:
                # Each publish is awaited to its answer (the backend bounds it): a request
                # still on its way is not one that reached nobody.
                sent = await self._send(request)
                if subscribed is not None:
                    # The live channel's subscription went out before the request: its
                    # confirmation comes before the answer (see `Hub.follow`), unless it was
                    # slow; then live messages published meanwhile (the end, say) may have
                    # reached nobody, and nothing may come to show the gap: ask once more.
                    await subscribed
                    subscribed = None
                    if self.acked.is_set():
                        late = True
                if sent:
                    state = await self._answer(request, after_end)
                    if late and state == p.RUNNING:
                        self._recover_soon()
                    return state
                # Nobody subscribed: the producer is not listening yet, subscribing again
                # after an outage, finished, or gone.
                now = anyio.current_time()
                if nobody_since is None:
                    nobody_since = now
                sentinel = await hub.sentinel(self.stream_id)
                state = p.stream_state(sentinel)
                if after_end:
                    if state == p.RUNNING:
                        attempt = await hub.attempt(self.stream_id)
                        if self._attempt is not None and attempt != self._attempt:
                            # A new attempt under this id: its text is not this reader's.
                            self._restart(attempt)
                            assert self.restarted is not None
                            raise self.restarted
                        if self._attempt is None:
                            await self.aclose()
                            return None
                        # The reader's own attempt runs: the end it found was a LOST that its
                        # producer, back from an outage, took back (it was alive). Follow it.
                        after_end = False
                        request = self._new_request()
                        continue
                    if state != p.DONE or not await hub.lingering(self.stream_id):
                        # Gone, or ended badly (the reader learns how), or no longer lingering.
                        await self.aclose()
                        return state
                    if now - nobody_since >= hub.settings.resume_timeout:
                        raise ProducerUnavailableError(
                            f"stream {self.stream_id!r} ended and its producer, which should "
                            "still keep its text, did not answer"
                        )
                elif state != p.RUNNING:
                    await self.aclose()
                    return state
                elif hub.may_declare_lost(nobody_since, hub.lost_after):
                    assert sentinel is not None
                    if await self._send(request):
                        return await self._answer(request, after_end)  # back just now
                    if not await hub.record_lost(self.stream_id, sentinel):
                        continue  # it changed meanwhile (ended, say): read it again
                    raise ProducerLostError(
                        f"the producer of stream {self.stream_id!r} is gone: nobody listened "
                        f"for {now - nobody_since:.1f}s"
                    )
                elif now - nobody_since >= hub.lost_bound:
                    raise ProducerUnavailableError(
                        f"nobody listened for the producer of stream {self.stream_id!r}, while "
                        "the connection to the backend was not settled enough to tell whether "
                        "it is gone"
                    )
                await anyio.sleep(next(delays))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def _answer(self, request: p.Request, after_end: bool) -> str | None:
        """The producer got the request: wait (`resume_timeout`) for the start of its answer.

        A subscriber connection that breaks loses what was sent to it (at most once), a
        request included: halfway through, the request is sent once more (a producer that got
        both answers both; the follower takes the text by offset, so once).
        """
        hub = self._hub
        with anyio.move_on_after(hub.settings.resume_timeout):
            with anyio.move_on_after(hub.settings.resume_timeout / 2):
                await self.acked.wait()
            if not self.acked.is_set():
                # In the background: on a slow link the answer may come before this is sent.
                hub.spawn(self.stream_id, self._resend, request)
                await self.acked.wait()
            if after_end:
                # A reader that already has everything learns at once how the stream ended,
                # as it would without lingering.
                while not (self._ready or self._partial or self.ended.is_set()):
                    await self._signal.wait()
                state = self._nothing_left()
                if state is not None:
                    await self.aclose()
                    return state
            self.heard = anyio.current_time()
            return p.RUNNING
        raise ProducerUnavailableError(
            f"the producer of stream {self.stream_id!r} did not answer within "
            f"{hub.settings.resume_timeout}s"
        )

    async def _resend(self, request: p.Request) -> None:
        with contextlib.suppress(BackendError):  # the wait for the answer tells
            await self._send(request)

    def _new_request(self, after_end: bool = False) -> p.Request:
        hub = self._hub
        hub.forget(self.listener)  # answers to an earlier request no longer count
        self.listener = uuid.uuid4().hex
        hub.listen(self.listener, self)
        self._awaiting = True
        self._answered = False
        self._progress = anyio.current_time()
        window = hub.settings.replay_window
        reply_to = hub.reply_channel(self.stream_id)
        traceparent = hub.telemetry.traceparent()  # the resume's span, if it is traced
        return p.Request(self.listener, reply_to, self._position, after_end, window, traceparent)

    async def _send(self, request: p.Request) -> bool:
        """Publish `request`; True if somebody (the producer) was subscribed."""
        channel = self._hub.keys.request(self.stream_id)
        return bool(await self._hub.connection.publish(channel, request.pack()))

    async def _recover(self, deadline: float) -> None:
        """Ask again for the text from this follower's position: after a gap, silence, or for
        the next window of a replay; once more if another reason came up meanwhile."""
        self._recovering = True
        try:
            while True:
                self._again = False
                if not await self._ask_again(deadline):
                    return
                if not self._again:
                    return
                deadline = anyio.current_time() + self._hub.lost_after
        except ResumableStreamError as exc:  # BackendError
            self.fail(exc)
        finally:
            self._recovering = False
            if self._detached:
                self._hub.forget(self.listener)  # a request sent after the reader let go
            self._signal.notify()

    async def _ask_again(self, deadline: float) -> bool:
        """Send a request from the position; False if the follower failed instead.

        Nobody subscribed to the request channel may be a producer subscribing again after an
        outage or a failover (a finished one too, while it lingers); that is retried until
        `deadline`, and then until this side's own connection shows that the producer is gone
        (`Hub.may_declare_lost`), within a bound.
        """
        hub = self._hub
        request = self._new_request()
        nobody_since: float | None = None
        bound = deadline
        delays = p.retry_delays()
        while True:
            if await self._send(request):
                self._progress = anyio.current_time()  # the answer's wait starts now
                return True
            if self._early_fills():
                # What was missing came meanwhile (late, held aside): no answer is needed.
                self._release_early()
                return True
            now = anyio.current_time()
            if nobody_since is None:
                # From the first answer that said "nobody" (its request may have waited long
                # for a stalled backend): it must go on saying so for a while, a heartbeat's
                # time at least, before the producer counts as gone.
                nobody_since = now
                deadline = max(deadline, now + hub.settings.heartbeat)
                if not (self.acked.is_set() or self._announced):
                    # The producer never heard of this follower: it sent no heartbeats to it,
                    # so silence says nothing; only requests that reach nobody for as long as
                    # a resume's would do.
                    deadline = max(deadline, now + hub.lost_after)
                bound = max(deadline, now + hub.lost_bound)
            if now >= deadline and hub.may_declare_lost(nobody_since, deadline - nobody_since):
                lost = True
                break
            if now >= bound:
                lost = False
                break
            await anyio.sleep(next(delays))
        sentinel = await hub.sentinel(self.stream_id)
        state = p.stream_state(sentinel)
        if state == p.DONE and await hub.lingering(self.stream_id):
            return await self._await_lingering(request, bound, delays)
        if state == p.RUNNING:
            if not lost:
                self._fail_after_store(
                    ProducerUnavailableError(
                        f"nobody listened for the producer of stream {self.stream_id!r}, while "
                        "the connection to the backend was not settled enough to tell whether "
                        "it is gone"
                    )
                )
                return False
            if await self._send(request):  # back just now: the state read took a while
                self._progress = anyio.current_time()
                return True
            # Compare-and-set: never over an end written meanwhile; a reader's INCR may change
            # a running sentinel's count meanwhile, so it is read again a few times.
            for _ in range(_RECORD_TRIES):
                assert sentinel is not None
                if await hub.record_lost(self.stream_id, sentinel):
                    state = p.LOST
                    break
                sentinel = await hub.sentinel(self.stream_id)
                state = p.stream_state(sentinel)
                if state != p.RUNNING:
                    break
            if state == p.RUNNING:
                state = p.LOST  # nobody listens for it: dead, as far as this reader can tell
            elif state != p.LOST:
                # It ended meanwhile (its producer was alive, its end on its way): the end may
                # have come while the state was read, or its producer may linger with it.
                if self._early_fills():
                    self._release_early()
                    return True
                if state == p.DONE and await hub.lingering(self.stream_id):
                    return await self._await_lingering(request, bound, delays)
        if state is None:
            self._fail_after_store(StreamIncompleteError(f"stream {self.stream_id!r} is gone"))
            return False
        error = p.end_error(self.stream_id, state, None)
        self._fail_after_store(
            error  # type: ignore[arg-type]
            or StreamIncompleteError(
                f"stream {self.stream_id!r} ended but its end never arrived, and its "
                f"producer no longer has the text: what came after offset {self._position} "
                "is unknown"
            )
        )
        return False

    async def _await_lingering(
        self, request: p.Request, bound: float, delays: Iterator[float]
    ) -> bool:
        """A producer that ended well still keeps its text, but is not subscribed right now
        (subscribing again after an outage): it may come back before the bound."""
        while anyio.current_time() < bound:
            await anyio.sleep(next(delays))
            if await self._send(request):
                self._progress = anyio.current_time()
                return True
            if self._early_fills():
                self._release_early()
                return True
        self._fail_after_store(
            ProducerUnavailableError(
                f"stream {self.stream_id!r} ended and its producer, which should still keep "
                "its text, did not answer"
            )
        )
        return False

    def _early_fills(self) -> bool:
        """Whether the live messages held aside (while an answer was awaited) go on from this
        follower's position with no gap: then they hold what the request asked for."""
        position = self._position
        if not self._early:
            return False
        for message in self._early:
            if isinstance(message, p.Live):
                if message.start > position or message.producer != self._producer:
                    return False
                position = max(position, message.start + p.wire_length(message.chunks))
            elif isinstance(message, p.End):
                return message.length <= position and message.producer == self._producer
        return True

    def _fail_after_store(self, error: ResumableStreamError) -> None:
        """End with `error`; a durable stream's reader first gets what its log still holds
        (everything its producer wrote before it died)."""
        if not self._durable or self._store_useless:
            self.fail(error)
            return
        self._after_store = error
        self._store_pending = True
        self._signal.notify()

    def resync(self) -> None:
        """Messages may have been lost (the subscriber reconnected): ask from the position."""
        if not (self._detached or self.ended.is_set()):
            if self._durable:
                self._announce()  # its heartbeats may have stopped, reaching nobody meanwhile
            self._recover_soon()

    def _announce(self) -> None:
        """Tell a durable stream's producer that this follower reads the log (it asks the
        producer nothing): it heartbeats its followers while idle, so that silence means
        what it means to any follower. In the background: nobody waits for it."""
        self._hub.spawn(self.stream_id, self._announcing)

    async def _announcing(self) -> None:
        channel = self._hub.keys.request(self.stream_id)
        try:
            # Only a notice that reached the producer makes its silence count for a death.
            self._announced = bool(await self._hub.connection.publish(channel, p.Follow().pack()))
        except BackendError:
            self._announced = False

    def _recover_soon(self) -> None:
        """Ask again, in the background: after a gap, or for the next window of a replay.

        A durable stream's log is read again (by the reader, when it next reads), unless it
        already failed to hold what was missing. Else the producer is asked: it was alive a
        moment ago, so it gets `Hub.lost_after` to be found. If a request is being sent right
        now, its task sends another once it is out.
        """
        if self._detached:
            return
        self._awaiting = True  # hold live messages aside from now on
        if self._durable and not self._store_useless:
            self._store_pending = True
            self._signal.notify()
            return
        self._again = True
        if not self._recovering:
            deadline = anyio.current_time() + self._hub.lost_after
            self._recovering = self._hub.spawn(self.stream_id, self._recover, deadline)

    # Messages

    def deliver(self, message: p.Message) -> None:
        """Called by the hub for every message addressed to this follower."""
        self.heard = anyio.current_time()
        if self._overflowed or self._detached:
            return
        kind = type(message)
        if kind is p.Started:
            return  # for readers waiting for the stream to start
        try:
            if kind is p.Replay:
                assert isinstance(message, p.Replay)
                self._replay(message)
            elif self._awaiting:
                if kind is not p.Heartbeat:
                    self._early.append(message)
            else:
                self._apply(message)
        except ValueError:
            self._error = ResumableStreamError(f"malformed message for stream {self.stream_id!r}")
        if self._error is not None or self._end is not None:
            self.ended.set()
        self._signal.notify()

    def _replay(self, replay: p.Replay) -> None:
        if replay.listener != self.listener:
            return  # the answer to an earlier request
        if not self._same_producer(replay.producer):
            self.acked.set()  # answered, by a producer whose text is not this reader's
            return
        self.acked.set()
        self._answered = True
        self._progress = anyio.current_time()
        self._unanswered = 0
        if replay.start > self._position:
            # A piece of the answer before this one was lost on the way (this side's
            # subscriber dropped meanwhile): ask again from the position.
            self._recover_soon()
            return
        self._take(replay.start, replay.chunks, replay.cont)
        if replay.more:
            self._recover_soon()  # this window is complete: ask for the next one
        elif replay.upto is not None:
            self._store_useless = False
            self._release_early()

    def _release_early(self) -> None:
        """The text asked for arrived: the live messages held aside meanwhile follow."""
        self._awaiting = False
        early, self._early = self._early, []
        for i, message in enumerate(early):
            if self._awaiting or self._error is not None:
                self._early.extend(early[i:])  # another gap: held until the next answer
                break
            self._apply(message)

    def _same_producer(self, token: str) -> bool:
        """Whether `token` names the producer whose text this follower reads (the first one it
        hears of, of the attempt it expects); a later attempt ends it (restarted), an earlier
        one's stray messages are ignored, another of the same attempt is a conflict."""
        if token == self._producer:
            return True
        attempt = p.attempt_of(token)
        if self._producer is None:
            if self._attempt is None or attempt == self._attempt:
                self._producer = token  # the first we hear of
                self._attempt = attempt
                return True
            if attempt < self._attempt:
                return False  # an older attempt's last words
            self._restart(attempt)
            return False
        mine = p.attempt_of(self._producer)
        if attempt > mine:
            self._restart(attempt)
        elif attempt == mine and self._error is None:
            self._error = ProducerConflictError(
                f"stream {self.stream_id!r} has two producers: the backend lost its state "
                "(Redis evicting keys under memory pressure?), so another caller started it again"
            )
        return False

    def _restart(self, attempt: int) -> None:
        if self.restarted is None:
            self.restarted = StreamRestartedError(
                f"stream {self.stream_id!r} was started again (attempt {attempt}): read it "
                "from its start",
                attempt,
            )
        if self._error is None:
            self._error = self.restarted

    @property
    def attempt(self) -> int:
        """The attempt of the stream this follower reads."""
        return self._attempt or 1

    def _apply(self, message: p.Message) -> None:
        kind = type(message)
        if kind is p.Live:
            assert isinstance(message, p.Live)
            if not self._same_producer(message.producer):
                return
            if message.start > self._position:
                self._early.append(message)  # text was lost before it: ask again
                self._recover_soon()
                return
            self._take(message.start, message.chunks, message.cont)
        elif kind is p.Heartbeat:
            assert isinstance(message, p.Heartbeat)
            if self._same_producer(message.producer) and message.length > self._position:
                self._recover_soon()  # the producer has text that never arrived
        elif kind is p.End:
            assert isinstance(message, p.End)
            if not self._same_producer(message.producer):
                return
            if message.length > self._position:
                self._early.append(message)
                self._recover_soon()
                return
            self._end = message

    def fail(self, error: ResumableStreamError) -> None:
        if self._error is None:
            self._error = error
        self.acked.set()
        self.ended.set()
        self._signal.notify()

    def _nothing_left(self) -> str | None:
        """The end state, once the stream ended with nothing more for this reader."""
        if self._end is None or self._error is not None or self._ready or self._partial:
            return None
        if self._position < self._end.length:
            return None
        return self._end.state

    def _take(self, start: int, chunks: list[p.WireChunk], cont: bool) -> None:
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            # Inline, not through helpers: this runs for every chunk a follower reads.
            label: tuple[Any, Any] | None
            if type(chunk) is str:
                text, label = chunk, None
            else:
                text, label = chunk[0], (chunk[1], chunk[2])
            end = start + len(text)
            if not i and start == self._cont_end:
                # The rest of a chunk cut across messages: its name came with its first part
                # (which a reader that starts in the middle of it took none of).
                self._cont_end = None
                if label is None:
                    label = self._cont_label
            if cont and i == last:
                self._cont_end, self._cont_label = end, label
            if end > self._position:
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
                self._ready.append((piece if label is None else Event(piece, *label), end))
            start = end
        backlog = self._position - self._consumed
        if backlog > self._hub.settings.max_backlog:
            # A reader this far behind would make the process hold the stream twice; drop
            # what it has not read and end it, so memory stays bounded.
            self._overflowed = True
            self._ready.clear()
            self._partial.clear()
            self._early.clear()
            self._error = SlowReaderError(
                f"a reader of stream {self.stream_id!r} fell {backlog} characters behind "
                f"(max_backlog={self._hub.settings.max_backlog}); resume from offset "
                f"{self._consumed} to catch up"
            )

    # Reading

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> str:
        ready = self._ready
        if ready and not len(ready) & CHECKPOINT_MASK:
            await anyio.lowlevel.checkpoint()  # let other tasks run
            ready = self._ready  # aclose() may have emptied it meanwhile
        if ready:
            item, self._consumed = ready.popleft()
        else:
            item = (await self.next_batch(1))[0][0]
        return item if isinstance(item, str) else item.data

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
        settings = self._hub.settings
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
            if self._end is not None:
                end = self._end
                await self._finish_reading(end.state)
                ended = p.end_error(self.stream_id, end.state, end.detail)
                if ended is not None:
                    raise ended
                raise StopAsyncIteration
            if self._detached:
                raise StopAsyncIteration
            if self._store_pending:
                try:
                    await self._read_store()
                except ResumableStreamError as exc:  # BackendError
                    self.fail(exc)
                continue
            if self._recovering:
                await self._signal.wait()  # the recovery ends with an answer or an error
                continue
            if self._awaiting:
                # A replay comes in pieces; one that stops coming was lost on the way.
                wake = self._progress + settings.resume_timeout
            else:
                # A producer with followers is heard three times per liveness_timeout: after
                # two silent periods, ask; it counts as gone at the end of the third.
                wake = self.heard + settings.heartbeat * 2
            with anyio.move_on_after(max(0.0, wake - anyio.current_time())):
                await self._signal.wait()
                continue
            if self._awaiting:
                self._unanswered += 1
                if self._unanswered >= _MAX_UNANSWERED:
                    self.fail(
                        ProducerUnavailableError(
                            f"the producer of stream {self.stream_id!r} got {self._unanswered} "
                            "requests in a row and answered none in time"
                        )
                    )
                    continue
            # The producer counts as gone once it was silent for liveness_timeout (its
            # heartbeats stopped; a request it got and never answered adds no time: it may have
            # died right after it got it). At least a heartbeat's time: `heard` may be old
            # because this side could not hear (its subscriber was reconnecting), not because
            # the producer was silent; and `_ask_again` waits longer for a producer that never
            # heard of this follower.
            now = anyio.current_time()
            deadline = max(self.heard + settings.liveness_timeout, now + settings.heartbeat)
            await self._recover(deadline)

    async def _finish_reading(self, outcome: str) -> None:
        await self._detach(outcome)
        self._end = p.End(None, "", 0, p.DONE, None)  # any later call just stops

    async def aclose(self) -> None:
        """Stop following; the producer and every other reader carry on."""
        self._ready.clear()
        await self._detach()

    @property
    def received(self) -> int:
        """The offset up to which text has arrived."""
        return self._position

    def activate(self) -> None:
        """The reader got this follower: it counts as active until it ends."""
        self._active = True
        self._hub.telemetry.follower_started()

    async def _detach(self, outcome: str = "detached") -> None:
        if not self._detached:
            self._detached = True
            if self._active:
                # Unread: what arrived and was not handed out (all of it, if it was too slow).
                self._hub.telemetry.follower_ended(outcome, self._position - self._consumed)
            self._hub.forget(self.listener)
            await self._hub.unfollow(self)
