"""Telemetry: what the engine reports, as a tiny interface with a no-op implementation.

The engine calls a context's `Telemetry` at a few points: a stream starts or ends (per role), a
resume starts and is answered, a producer serves a resume request, a backend command is sent
(`CountedConnection`, at the backend boundary), the backend reconnects; the context runs its
`run` task and `flush`es it when it closes. The class below does nothing at all; it is what a
context uses when `opentelemetry-api` is not installed or telemetry is turned off, so that the
engine pays one no-op call per such event and nothing per chunk. `resumable_stream._otel`
(imported only when the OpenTelemetry API imports, by `_telemetry_setup`, which chooses)
implements the same interface with OpenTelemetry instruments and spans; every name and
attribute it emits is listed in the documentation (`docs/operations/telemetry.md`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal

from ._exceptions import (
    BackendError,
    ProducerLostError,
    ProducerUnavailableError,
    ResumableStreamError,
    SlowReaderError,
    StreamCancelledError,
    StreamFailedError,
    StreamIncompleteError,
)

__all__ = ["NOOP", "Resume", "Telemetry", "outcome_of", "resume_result_of"]

Role = Literal["producer", "follower"]
Serve = Callable[[Any], Awaitable[None]]


class Resume:
    """One resume being observed: `with telemetry.resume(...) as resume:`, then say how it
    was answered. This one records nothing."""

    __slots__ = ()

    def __enter__(self) -> Resume:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def answered(self, result: str, replayed: int = 0) -> None:
        """The answer: `result` (`replayed`, `live`, `finished`, `not_found`), with `replayed`
        characters of text that was there already. An exception leaving the block answers
        `lost` or `unavailable` (or `finished`, for a stream that ended with an error)."""


_NO_RESUME = Resume()


class Telemetry:
    """The no-op: every method does nothing and returns at once."""

    __slots__ = ()

    enabled = False

    def producer_started(self, stream_id: str) -> object:
        """A producer starts; returns a token for `producer_ended`, made current meanwhile
        (the generator runs under the produce span)."""
        return None

    def producer_ended(self, token: object, outcome: str | None, length: int) -> None:
        """The producer's generator ended in `outcome` after `length` characters."""

    def follower_started(self) -> None:
        """A follower joined its stream (it counts as active until `follower_ended`)."""

    def follower_ended(self, outcome: str, backlog: int) -> None:
        """A follower ended (`outcome`), holding `backlog` unread characters."""

    def resume(self, stream_id: str, resume_at: int, started: int | None = None) -> Resume:
        """A resume starts (or started at `started`, in `time.time_ns()`): its span is current
        until the block ends."""
        return _NO_RESUME

    def traceparent(self) -> str | None:
        """The W3C `traceparent` of the current span, for a resume request; None if none."""
        return None

    def serving(self, stream_id: str, traceparent: str | None, serve: Serve) -> Serve:
        """How a producer serves a resume request: `serve` itself, or `serve` inside a span of
        the follower's trace (`traceparent`)."""
        return serve

    def command(self, name: str) -> None:
        """The engine sent the backend command `name`."""

    def reconnect(self) -> None:
        """The backend reconnected."""

    def flush(self) -> None:
        """Hand what was measured since the last flush to the instruments."""

    async def run(self) -> None:
        """Flush now and then while the context is open (a task of its task group)."""


NOOP = Telemetry()


def outcome_of(error: BaseException | None, state: str | None = None) -> str:
    """How a reader's stream ended, as the `outcome` attribute: from the error it ended with,
    else from the end state it learnt."""
    if error is None:
        return state or "done"
    if isinstance(error, StreamFailedError):
        return "failed"
    if isinstance(error, StreamCancelledError):
        return "cancelled"
    if isinstance(error, ProducerLostError):
        return "lost"
    if isinstance(error, StreamIncompleteError):
        return "incomplete"
    if isinstance(error, SlowReaderError):
        return "too_slow"
    # ProducerUnavailableError, BackendError, a closed context.
    return "unavailable"


def resume_result_of(error: BaseException) -> str | None:
    """The `result` of a resume that raised `error`; None if it was not answered at all (the
    caller cancelled it, or an argument was invalid)."""
    if isinstance(error, ProducerLostError):
        return "lost"
    if isinstance(error, (ProducerUnavailableError, BackendError)):
        return "unavailable"
    if isinstance(error, (StreamFailedError, StreamCancelledError, StreamIncompleteError)):
        return "finished"  # the stream had ended, and its reader learns how
    if isinstance(error, ResumableStreamError):
        return "unavailable"
    return None
