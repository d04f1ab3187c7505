"""What the simulator did to the system, as the model check needs it: faults and their spans.

Every injected fault is recorded here (and in the history) with the virtual times it began and
ended, so that the model can tell which claims a reader was entitled to make: an outage long
enough to take a live producer for dead, a loss of keys that makes a text incomplete, a command
that failed (a `BackendError` is a fair answer then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["KeyTimeline", "Ledger", "Outage"]


@dataclass(slots=True)
class Outage:
    """A span during which `proc`'s connection (or, with `proc` None, the whole server) did not
    work: `kind` is "sub" or "cmd" (a connection down or restoring), "stall" or "restart"."""

    proc: str | None
    kind: str
    start: float
    end: float = math.inf

    @property
    def length(self) -> float:
        return self.end - self.start


class KeyTimeline:
    """Every write and loss of one key: whether it existed at any moment is known exactly."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        # (time, expiry) for a write that leaves the key with that expiry; (time, -1.0) for
        # a deletion (evicted, lost in a restart, deleted by the engine).
        self.ops: list[tuple[float, float]] = []

    def wrote(self, now: float, expiry: float) -> None:
        self.ops.append((now, expiry))

    def gone(self, now: float) -> None:
        self.ops.append((now, -1.0))

    def absent_during(self, start: float, end: float) -> bool:
        """Whether the key was missing at some moment of [start, end]."""
        expiry = -1.0  # the key is missing while expiry <= now
        ops = self.ops
        i = 0
        while i < len(ops) and ops[i][0] <= start:
            expiry = ops[i][1]
            i += 1
        if expiry <= start:
            return True
        for at, new_expiry in ops[i:]:
            if at > end:
                break
            if expiry <= at or new_expiry < 0:
                return True
            expiry = new_expiry
        return expiry <= end

    def written_before(self, end: float) -> bool:
        """Whether the key was written (it existed) at some moment before `end`."""
        return any(at <= end and expiry >= 0 for at, expiry in self.ops)

    def lost_before(self, end: float) -> bool:
        """Whether the key existed and then was lost (expired, evicted, restarted) before `end`."""
        expiry = -1.0
        existed = False
        for at, new_expiry in self.ops:
            if at > end:
                break
            if existed and (expiry <= at or new_expiry < 0):
                return True
            if new_expiry >= 0:
                existed = True
            expiry = new_expiry
        return existed and expiry <= end


@dataclass(slots=True)
class Ledger:
    outages: list[Outage] = field(default_factory=list)
    # (time, process, command, what): "fail" (no effect), "lost" (took effect, reply lost),
    # "timeout" (no reply by the deadline; it may take effect later), "dropped" (in flight
    # when the connection dropped), "oom" (a write refused).
    command_faults: list[tuple[float, str, str, str]] = field(default_factory=list)
    # Elections (INCR to 1, SET of a new stream) that took effect but whose caller never
    # learned it: a producer that never ran, as far as Redis knows.
    ghosts: list[tuple[float, str]] = field(default_factory=list)
    # Streams started again as a later attempt (a finished one replaced): (time, sentinel key).
    restarts: list[tuple[float, str]] = field(default_factory=list)
    # Writes of "LOST" into a stream's sentinel: (time, key).
    lost_writes: list[tuple[float, str]] = field(default_factory=list)
    # Slow links: (process, start, end, added one-way delay).
    slow_links: list[tuple[str, float, float, float]] = field(default_factory=list)
    # Keys lost by a fault: (time, key, reason), reason "evicted" or "restart".
    losses: list[tuple[float, str, str]] = field(default_factory=list)
    # Every key's writes and losses, for the keys the model asks about.
    keys: dict[str, KeyTimeline] = field(default_factory=dict)
    # Faults by kind, for the summary.
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def timeline(self, key: str) -> KeyTimeline:
        found = self.keys.get(key)
        if found is None:
            found = self.keys[key] = KeyTimeline()
        return found

    def outages_of(self, proc: str) -> list[Outage]:
        """The outages that cut `proc` off: its own connections', and the server's."""
        return [o for o in self.outages if o.proc is None or o.proc == proc]
