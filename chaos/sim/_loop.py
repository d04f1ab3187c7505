"""An asyncio event loop on virtual time.

The loop's `time()` is a clock of its own that only moves when nothing is ready to run: then it
jumps to the next timer. So a run of minutes of simulated time takes milliseconds, every timer
fires in the same order on every run, and anyio's `current_time`, `sleep`, `move_on_after` and
`fail_after` (which all read the running loop's clock) run on virtual time.

It is a real `SelectorEventLoop` (the engine's asyncio fast paths: producers in the loop's own
tasks, future-based signals, `call_soon` batching, all run as in production) whose selector
never blocks: asked to wait `timeout` seconds, it moves the clock by that much and reports no
I/O. Asked to wait forever (nothing ready, no timer), every task waits for something that can
never happen: a global deadlock, raised as `Deadlock`. A run that keeps the loop busy without
letting time pass (a retry loop that never awaits a timer) is stopped after `max_turns` loop
turns (`Runaway`), and one whose clock passes `max_time` too.
"""

from __future__ import annotations

import asyncio
import selectors

__all__ = ["Deadlock", "Runaway", "VirtualClock", "VirtualLoop"]


class Deadlock(Exception):
    """Nothing is ready and no timer is scheduled: every task waits forever."""


class Runaway(Exception):
    """The run exceeded its budget of loop turns or of virtual time."""


class VirtualClock:
    """Seconds of virtual time; moved only by the loop's selector."""

    __slots__ = ("max_time", "max_turns", "now", "turns")

    def __init__(self, max_time: float, max_turns: int) -> None:
        self.now = 0.0
        self.turns = 0
        self.max_time = max_time
        self.max_turns = max_turns


class _VirtualSelector(selectors._BaseSelectorImpl):  # register/unregister/get_map as usual
    """A selector with no I/O: `select(timeout)` moves the clock instead of blocking."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        clock = self._clock
        clock.turns += 1
        if clock.turns > clock.max_turns:
            raise Runaway(f"more than {clock.max_turns} loop turns")
        if timeout is None:
            raise Deadlock("nothing is ready and no timer is scheduled")
        if timeout > 0:
            clock.now += timeout
            if clock.now > clock.max_time:
                raise Runaway(f"virtual time passed {clock.max_time}s")
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """A `SelectorEventLoop` whose time is `clock`'s."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        super().__init__(_VirtualSelector(clock))

    def time(self) -> float:
        return self.clock.now
