"""A chunk with a name: what a generator yields when its readers need more than text."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Event"]


@dataclass(frozen=True, slots=True)
class Event:
    """A chunk of text with an event name and an optional reconnection time (milliseconds).

    Generators may yield `Event`s among plain `str` chunks. The name and the chunk's boundaries
    survive replay: an SSE response sends it as `event: <name>`. Its `data` counts towards the
    stream's character offsets like any chunk, so it must not be empty (an empty chunk has no
    offset of its own to resume from). Iterating a stream yields only the `data`.
    """

    data: str
    event: str | None = None
    retry: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data:
            raise ValueError("Event.data must be a non-empty str")
        if self.event is not None and (
            not isinstance(self.event, str) or "\r" in self.event or "\n" in self.event
        ):
            raise ValueError("Event.event must be a str without CR or LF, or None")
        if self.retry is not None and (
            isinstance(self.retry, bool) or not isinstance(self.retry, int) or self.retry < 0
        ):
            raise ValueError("Event.retry must be a non-negative int (milliseconds), or None")
