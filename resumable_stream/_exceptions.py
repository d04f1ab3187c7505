"""Every error this library raises.

Invalid arguments (a bad stream id or offset) raise the builtin `ValueError`. Everything else
derives from one base class:

    ResumableStreamError
    ├── StreamExistsError          a writer asked for an id that a stream has already
    ├── StreamRestartedError       a newer attempt replaced the stream a cursor was taken from
    ├── StreamFailedError          the producer's generator raised
    ├── StreamCancelledError       the stream was stopped before it finished
    ├── StreamNotCancellableError  cancel_stream: its producer cannot be stopped (a Node
    │                              producer, in compat mode)
    ├── StreamIncompleteError      the stream ended but some of its text never arrived
    │   └── ProducerConflictError  two producers wrote under one id (the backend lost its state)
    ├── SlowReaderError            a reader fell too far behind and was ended
    ├── ProducerUnavailableError   no producer answered a resume request (also a TimeoutError)
    │   └── ProducerLostError      the producer died (its process went away) before the end
    └── BackendError               the backend (Redis) failed or could not be reached
                                   (also a ConnectionError)

Errors of the Redis client are translated at the boundary: callers never see `redis.*`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "BackendError",
    "ProducerConflictError",
    "ProducerLostError",
    "ProducerUnavailableError",
    "ResumableStreamError",
    "SlowReaderError",
    "StreamCancelledError",
    "StreamExistsError",
    "StreamFailedError",
    "StreamIncompleteError",
    "StreamNotCancellableError",
    "StreamRestartedError",
]


class ResumableStreamError(Exception):
    """Base class of every error the library raises (other than `ValueError` for bad input)."""


class StreamExistsError(ResumableStreamError):
    """Raised by `ctx.writer(stream_id)` when a stream with that id exists already (running or
    ended; with `restart=True`, one that ended well or whose writer is alive)."""


class StreamRestartedError(ResumableStreamError):
    """Raised to a reader whose cursor was taken from an earlier attempt of the stream: a
    retried job started it again (`ctx.writer(stream_id, restart=True)`). The text at the
    cursor's offset in the new attempt is not the text the reader had: read the new attempt
    from its start (`resume_at=0, attempt=error.attempt`, or no cursor at all)."""

    def __init__(self, message: str, attempt: int) -> None:
        super().__init__(message)
        self.attempt = attempt
        """The attempt the stream is at now (the first is 1)."""


class StreamFailedError(ResumableStreamError):
    """Raised by a reader when the producer's generator raised an exception.

    In the producer's own process the original exception is chained as `__cause__`; readers in
    other processes only learn the exception's type name.
    """


class StreamCancelledError(ResumableStreamError):
    """Raised by a reader when the stream was stopped before its generator finished."""


class StreamNotCancellableError(ResumableStreamError):
    """Raised by `cancel_stream` in compat mode (`compat="vercel"`) when the stream runs but its
    producer cannot be stopped: the npm `resumable-stream` package has no cancellation, so a
    stream that a Node producer runs goes on to its end."""


class StreamIncompleteError(ResumableStreamError):
    """Raised by a reader when the stream ended but part of its text was lost in transit."""


class ProducerConflictError(StreamIncompleteError):
    """Raised by a follower that heard from two producers of one stream id.

    It happens only when the backend lost a running stream's state (Redis evicting its keys
    under memory pressure, say): a second caller then became a producer too. The follower stops
    rather than mix the two texts.
    """


class ProducerUnavailableError(ResumableStreamError, TimeoutError):
    """Raised when a resume request got no answer in time and the stream is not finished."""


class BackendError(ResumableStreamError, ConnectionError):
    """Raised when the backend failed or could not be reached; the cause is chained."""


class ProducerLostError(ProducerUnavailableError):
    """Raised when the stream's producer died before the end: the stream can never complete.

    Followers learn it within the context's `liveness_timeout`; the id stays in this state for
    `lost_ttl` seconds, then a new stream may take it.
    """


class SlowReaderError(ResumableStreamError):
    """Raised by a follower that fell more than the context's `max_backlog` characters behind.

    Its unread text was dropped to keep memory bounded; the stream itself and every other reader
    carry on. Resuming from the offset in the message catches up.
    """


class single_exception_out:  # lower case, like contextlib.suppress: a context manager
    """Lets an exception group holding a single exception out as that exception.

    A task group wraps whatever crosses it, so an exception raised inside `async with ctx:`
    would come out in a group (two on Redis) that `except SomeError:` never matches. The
    exception keeps its traceback, cause and context. A group of several exceptions (distinct
    failures at the same time) is let out as it is.
    """

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not isinstance(exc, BaseExceptionGroup):
            return
        leaves = _leaves(exc)
        if len(leaves) != 1:
            return
        leaf = leaves[0]
        context = leaf.__context__
        try:
            raise leaf
        finally:
            # Raising it here made the group its context; it had its own.
            leaf.__context__ = context


@contextmanager
def one_error() -> Iterator[None]:
    """Lets the failures of operations run side by side (in a task group) out as one error.

    Two reads that fail together (the state and the log, with Redis down) would come out of
    their task group as an exception group, which no caller expects from a call that raises
    `ResumableStreamError`s: the first failure is raised as itself, the others are noted on
    it. A failure that is not ours (a bug) is raised first, as itself.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        first = next((e for e in leaves if not isinstance(e, ResumableStreamError)), leaves[0])
        add_note = getattr(first, "add_note", None)  # Python 3.11+
        if add_note is not None:
            for other in leaves:
                if other is not first:
                    add_note(f"also: {type(other).__name__}: {other}")
        context = first.__context__
        try:
            raise first
        finally:
            # Raising it here made the group its context; it had its own.
            first.__context__ = context


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        for leaf in _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]:
            if not any(leaf is seen for seen in found):  # the same one twice is still one
                found.append(leaf)
    return found
