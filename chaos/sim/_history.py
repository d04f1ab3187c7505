"""The history of one run: every event, with its virtual time and who did it.

Events are small tuples of plain values, recorded always (a replay prints them; the same
seed must give the same events, which `digest` compares), formatted only when printed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

__all__ = ["Event", "History"]

Event = tuple[float, str, str, tuple[object, ...]]
"""(virtual time, who: a process "P0".., "redis" or "sim", kind, details)."""


class History:
    __slots__ = ("_now", "events", "frozen")

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self.events: list[Event] = []
        self.frozen = False  # a run that was stopped: what its teardown does is not history

    def add(self, who: str, kind: str, *details: object) -> None:
        if not self.frozen:
            self.events.append((self._now(), who, kind, details))

    def digest(self) -> str:
        """A hash of the whole history: equal for two runs that did the same things."""
        h = hashlib.sha256()
        for event in self.events:
            h.update(repr(event).encode("utf-8", "backslashreplace"))
        return h.hexdigest()[:16]

    def format(self, events: Iterable[Event] | None = None) -> list[str]:
        return [format_event(event) for event in (self.events if events is None else events)]


def format_event(event: Event) -> str:
    t, who, kind, details = event
    shown = " ".join(_show(detail) for detail in details)
    return f"{t:11.6f}  {who:<5} {kind:<12} {shown}"


def _show(value: object) -> str:
    if isinstance(value, str):
        return value if value and value.isprintable() and " " not in value else repr(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)
