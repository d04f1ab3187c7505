"""`compat="vercel"`: a context's streams over the wire protocol of npm `resumable-stream` 2.x.

The context hands every public call to `VercelStreams` when it was made with `compat="vercel"`
(one check per call; native mode's paths are otherwise untouched). Producers run in the
context's task group as native ones do (`launch`), and everything else here speaks the
reference's names, messages and sentinel values (`_vercel_wire`), so that a Next.js app on the
npm package and this library share streams on one Redis: either side produces, either resumes.

Offsets (`resume_at`, the end offsets of `next_batch`, hence SSE ids, `Last-Event-ID` and
`?resumeAt=`) count UTF-16 code units, as the reference's `skipCharacters` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import anyio

from . import _protocol as p
from ._backend import Connection
from ._exceptions import (
    BackendError,
    ResumableStreamError,
    StreamNotCancellableError,
    StreamRestartedError,
)
from ._hub import Hub
from ._options import check_make_stream, check_resume_at, check_seconds
from ._reader import ResumableStream
from ._telemetry import Resume
from ._vercel_follower import FINISHED, VercelFollower
from ._vercel_hub import VercelHub
from ._vercel_producer import MakeStream, VercelProducer
from ._vercel_reader import LocalReader
from ._vercel_wire import (
    DONE_VALUE,
    Outcome,
    VercelNames,
    running,
    validate_stream_id,
)

__all__ = ["COMPAT_MODES", "Compat", "VercelProducer", "VercelStreams", "check_compat"]

logger = logging.getLogger("resumable_stream")

Compat = Literal["vercel"]
COMPAT_MODES: tuple[Compat, ...] = ("vercel",)

Launch = Callable[[VercelProducer], None]


def check_compat(compat: object) -> Compat | None:
    """The `compat` option, checked: None (this library's own protocol) or "vercel"."""
    if compat is None:
        return None
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be None or 'vercel', got {compat!r}")
    return "vercel"


class VercelStreams:
    """The public API of a compat context (see `ResumableStreamContext`)."""

    def __init__(self, hub: Hub, key_prefix: str, launch: Launch, degrade: bool) -> None:
        if hub.settings.durable:
            raise ValueError(
                "durable=True cannot be combined with compat='vercel': the reference keeps the "
                "text in its producer's memory only, and its readers would never read it"
            )
        self._hub = VercelHub(hub, VercelNames(key_prefix))
        self._launch = launch
        self._degrade = degrade
        self._local: dict[str, VercelProducer] = {}  # running producers, by stream id

    # The context's side

    def opened(self, connection: Connection) -> None:
        if connection.sharded:
            raise ResumableStreamError(
                "compat='vercel' needs a Redis server (or a Sentinel's master): the reference's "
                "classic pub/sub and names have no Redis Cluster support"
            )

    def dispatch(self, channel: str, data: bytes) -> None:
        self._hub.dispatch(channel, data)

    def resync(self) -> None:
        self._hub.resync()

    def close(self) -> None:
        for follower in self._hub.followers():
            follower.fail(ResumableStreamError("the stream context was closed"))

    def follower_count(self) -> int:
        return self._hub.follower_count()

    # Producers

    def _producer(
        self, stream_id: str, make_stream: MakeStream, *, offline: bool = False, armed: bool = True
    ) -> VercelProducer:
        return VercelProducer(
            self._hub,
            stream_id,
            make_stream,
            offline=offline,
            subscribed=not armed,
            armed=armed,
            on_ended=self._ended,
        )

    def _start(self, producer: VercelProducer) -> VercelProducer:
        self._launch(producer)  # raises if the context is not open
        if not producer.offline:
            self._local[producer.stream_id] = producer
        return producer

    def _ended(self, producer: VercelProducer) -> None:
        if self._local.get(producer.stream_id) is producer:
            del self._local[producer.stream_id]

    def _local_reader(self, stream_id: str, offset: int) -> ResumableStream | None:
        producer = self._local.get(stream_id)
        if producer is None:
            return None
        with self._hub.telemetry.resume(stream_id, offset) as resume:
            replayed = max(0, producer.buffer.length - offset)
            resume.answered("replayed" if replayed else "live", replayed)
            return LocalReader(producer, offset)

    # The public API

    async def resumable_stream(
        self,
        stream_id: str,
        make_stream: MakeStream,
        resume_at: int | None,
        attempt: int | None = None,
    ) -> ResumableStream | None:
        stream_id, offset = _validate(stream_id, make_stream, resume_at)
        _check_attempt(stream_id, attempt)
        local = self._local_reader(stream_id, offset)
        if local is not None:
            return local
        hub = self._hub
        started = time.time_ns()
        try:
            # INCR (+ EXPIRE): 1 elects this caller, as with the reference; a "DONE" is no
            # integer (finished).
            count = await hub.connection.incr(hub.names.sentinel(stream_id), hub.settings.ttl)
        except BackendError as exc:
            if not self._degrade:
                raise
            logger.warning(
                "stream %r runs without resumability: the backend failed (%s)",
                stream_id,
                exc,
                extra={"stream_id": stream_id},
            )
            producer = self._start(self._producer(stream_id, make_stream, offline=True))
            return LocalReader(producer, offset)
        if count == 1:
            return LocalReader(self._start(self._producer(stream_id, make_stream)), offset)
        with hub.telemetry.resume(stream_id, offset, started) as resume:
            if count is None:
                return await self._finished(stream_id, offset, resume_at is not None, resume)
            return await self._follow(stream_id, offset, resume)

    async def create_new_resumable_stream(
        self, stream_id: str, make_stream: MakeStream, resume_at: int | None
    ) -> ResumableStream:
        stream_id, offset = _validate(stream_id, make_stream, resume_at)
        hub = self._hub
        connection = hub.connection
        names = hub.names
        # As the reference (2.2.13): subscribed before the sentinel says the stream runs, so
        # that no request finds nobody; requests that come meanwhile wait until it is sure.
        producer = self._producer(stream_id, make_stream, armed=False)
        channels = names.producer_channels(stream_id)
        won = False
        hub.add_producer(producer)
        try:
            await connection.subscribe(*channels, wait=True)
            previous = await connection.swap(names.sentinel(stream_id), "1", hub.settings.ttl)
            won = not running(previous)
        finally:
            if not won:
                hub.remove_producer(producer)
                with anyio.CancelScope(shield=True):
                    try:
                        await connection.unsubscribe(*channels)
                    except BackendError as exc:
                        logger.warning("could not unsubscribe %r: %s", channels, exc)
        if not won:
            raise ResumableStreamError(f"stream {stream_id!r} is already running")
        producer.arm()
        return LocalReader(self._start(producer), offset)

    async def resume_existing_stream(
        self,
        stream_id: str,
        resume_at: int | None,
        wait: float | None = None,
        attempt: int | None = None,
    ) -> ResumableStream | None:
        stream_id = validate_stream_id(stream_id)
        offset = check_resume_at(resume_at)  # UTF-16 units
        _check_attempt(stream_id, attempt)
        if wait is not None:
            wait = check_seconds("wait", wait, zero=True)
        local = self._local_reader(stream_id, offset)
        if local is not None:
            return local
        hub = self._hub
        with hub.telemetry.resume(stream_id, offset) as resume:
            value = await hub.connection.get(hub.names.sentinel(stream_id))
            if value is None and wait:
                # The reference announces no start: the sentinel is polled, with backoff
                # (from 2 ms to 100 ms between reads).
                with anyio.move_on_after(wait):
                    for delay in p.retry_delays():
                        await anyio.sleep(delay)
                        local = self._local_reader(stream_id, offset)
                        if local is not None:
                            return local
                        value = await hub.connection.get(hub.names.sentinel(stream_id))
                        if value is not None:
                            break
            if value is None:
                resume.answered("not_found")
                return None
            if value == DONE_VALUE:
                return await self._finished(stream_id, offset, resume_at is not None, resume)
            return await self._follow(stream_id, offset, resume)

    async def has_existing_stream(self, stream_id: str) -> Literal[True, "DONE"] | None:
        """As the reference's `hasExistingStream`: None, "DONE", or True for anything else
        (a stream whose producer died is still True: its sentinel says it runs)."""
        stream_id = validate_stream_id(stream_id)
        value = await self._hub.connection.get(self._hub.names.sentinel(stream_id))
        if value is None:
            return None
        return "DONE" if value == DONE_VALUE else True

    async def cancel_stream(self, stream_id: str) -> None:
        """Stop a stream: a Python producer hears it on `cancel:<id>` (never on the request
        channel, where anything but a request kills a Node producer). A stream that did not
        start yet is recorded finished (`"DONE"`, outcome cancelled); a Node producer cannot
        be stopped: `StreamNotCancellableError`."""
        stream_id = validate_stream_id(stream_id)
        producer = self._local.get(stream_id)
        if producer is not None:
            producer.stop()
            return
        hub = self._hub
        connection = hub.connection
        names = hub.names
        ttl = hub.settings.ttl
        sentinel = names.sentinel(stream_id)
        with anyio.move_on_after(hub.settings.resume_timeout):
            for delay in p.retry_delays():
                value = await connection.get(sentinel)
                if value is None:
                    if await connection.create(sentinel, DONE_VALUE, ttl):
                        # Nobody started it: whoever tries next finds it finished (Node: null),
                        # and Python readers learn it was cancelled.
                        outcome = Outcome(p.CANCELLED, 0, None, "")
                        await connection.set(names.outcome(stream_id), outcome.pack(), ttl)
                        return
                    continue
                if value == DONE_VALUE:
                    return  # it ended already
                if await connection.publish(names.cancel(stream_id), b"cancel"):
                    return
                # Running, with no Python producer listening (yet).
                await anyio.sleep(delay)
        if await connection.numsub(names.request(stream_id)):
            raise StreamNotCancellableError(
                f"stream {stream_id!r} is produced by a peer that cannot be cancelled (a Node "
                "resumable-stream producer: the reference has no cancellation)"
            )
        # Nobody produces it (its producer died): there is nothing to stop.

    async def set_alias(self, name: str, stream_id: str) -> None:
        name = validate_stream_id(name)
        stream_id = validate_stream_id(stream_id)
        hub = self._hub
        await hub.connection.set(hub.names.alias(name), stream_id, hub.settings.ttl)

    async def resolve_alias(self, name: str) -> str | None:
        name = validate_stream_id(name)
        return await self._hub.connection.get(self._hub.names.alias(name))

    # Followers

    async def _follow(self, stream_id: str, offset: int, resume: Resume) -> ResumableStream | None:
        follower = VercelFollower(self._hub, stream_id, offset)
        state = await follower.join()
        if state == p.RUNNING:
            return _following(follower, offset, resume)
        resume.answered("not_found" if state is None else "finished")
        if state == FINISHED:
            await self._raise_outcome(stream_id)
        return None

    async def _finished(
        self, stream_id: str, offset: int, has_cursor: bool, resume: Resume
    ) -> ResumableStream | None:
        """A finished stream: its tail from a Python producer lingering with it (a reader with
        a cursor), None, or how it ended badly."""
        if has_cursor:
            follower = VercelFollower(self._hub, stream_id, offset)
            if await follower.join(late=True) == p.RUNNING:
                return _following(follower, offset, resume)
        resume.answered("finished")
        await self._raise_outcome(stream_id)
        return None

    async def _raise_outcome(self, stream_id: str) -> None:
        """Raise how a finished stream ended, if a Python producer recorded that it ended
        badly (a Node producer records nothing: its streams end well)."""
        hub = self._hub
        outcome = Outcome.parse(await hub.connection.get(hub.names.outcome(stream_id)))
        # "lost" is a running stream's (its producer died): one that ended is not that one.
        if outcome is not None and outcome.state != p.LOST:
            error = p.end_error(stream_id, outcome.state, outcome.detail)
            if error is not None:
                raise error


def _following(follower: VercelFollower, offset: int, resume: Resume) -> VercelFollower:
    replayed = follower.received - offset
    resume.answered("replayed" if replayed else "live", replayed)
    follower.activate()
    return follower


def _check_attempt(stream_id: str, attempt: object) -> None:
    """A compat stream has one attempt (the reference starts nothing again): a cursor from
    another one is told to read this one from its start, as a restart would be."""
    if attempt is None or attempt == 1:
        return
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
    raise StreamRestartedError(
        f"stream {stream_id!r} has one attempt (compat='vercel'): read it from its start", 1
    )


def _validate(stream_id: object, make_stream: object, resume_at: object) -> tuple[str, int]:
    check_make_stream(make_stream)
    return validate_stream_id(stream_id), check_resume_at(resume_at)
