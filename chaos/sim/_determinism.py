"""What makes one seed give one run: the sources of nondeterminism, and how each is neutralised.

Inside a run, everything that decides what happens when is derived from the seed:

- **Time.** The loop's clock is virtual (`_loop`); anyio and the engine read it through the
  running loop. The engine's one direct read of the monotonic clock, `_buffer.BatchSignal`'s
  burst test (`time.monotonic()`, a performance heuristic), is pointed at the virtual clock for
  the run: `_buffer`'s module reference `time` is replaced by a stand-in whose `monotonic()` is
  the loop's clock (the engine keeps the real clock in production: uvloop's `loop.time()` has
  millisecond resolution, too coarse for the heuristic's 0.5 ms). The wall clock
  (`time.time()`) is read by the engine for `ctx.stats()` only, which decides nothing.
- **Random tokens.** `uuid.uuid4` (context and request ids) and `secrets.token_hex` (producer
  tokens) are replaced for the run by counters, so ids and channel names are the same on every
  run and a history reads the same on every replay.
- **Iteration order of sets of objects.** Objects hash by address, and addresses differ
  between runs, so iterating a set of objects can differ between two runs of one seed in one
  process. anyio's asyncio cancel scopes keep their tasks and child scopes in sets, and cancel
  them in that order (`CancelScope._deliver_cancellation`): for the run, every new cancel scope
  gets insertion-ordered sets instead. The engine's own sets of objects that it iterates where
  the order matters are dicts now (see the engine commit that made them so).
- **Sets of strings** would depend on PYTHONHASHSEED: neither the simulator nor the engine
  iterates one where the order matters.
- **Garbage collection** runs at moments that depend on the process's whole allocation
  history; a finalizer that schedules work (an unclosed async generator) would make a run
  depend on it. The sources are iterators, not async generators, and the collector is off for
  the run.

Everything is restored when the run ends, so the process is left as it was.
"""

from __future__ import annotations

import gc
import secrets
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio._backends._asyncio as anyio_asyncio

import resumable_stream._buffer as engine_buffer

__all__ = ["deterministic"]


class _OrderedSet(dict[Any, None]):
    """A set that iterates in insertion order: the methods of `set` that anyio uses."""

    __slots__ = ()

    def add(self, item: Any) -> None:
        self[item] = None

    def discard(self, item: Any) -> None:
        self.pop(item, None)

    def remove(self, item: Any) -> None:
        del self[item]


class _Clock:
    """What `_buffer` sees as the `time` module during a run: the loop's clock."""

    __slots__ = ("monotonic",)

    def __init__(self, now: Callable[[], float]) -> None:
        self.monotonic = now


@contextmanager
def deterministic(now: Callable[[], float]) -> Iterator[None]:
    """Neutralise the sources of nondeterminism above, for one run on the clock `now`."""
    scope_init = anyio_asyncio.CancelScope.__init__

    def ordered_init(self: anyio_asyncio.CancelScope, *args: Any, **kwargs: Any) -> None:
        scope_init(self, *args, **kwargs)
        self._child_scopes = _OrderedSet()  # type: ignore[assignment]
        self._tasks = _OrderedSet()  # type: ignore[assignment]

    counter = iter(range(1, 1 << 62))

    def uuid4() -> uuid.UUID:
        return uuid.UUID(int=next(counter), version=4)

    def token_hex(nbytes: int | None = None) -> str:
        return f"{next(counter):0{2 * (nbytes or 32)}x}"

    saved_uuid4, saved_token_hex = uuid.uuid4, secrets.token_hex
    module = vars(engine_buffer)  # the module's globals: where its `time` is looked up
    saved_time = module["time"]
    gc_was_enabled = gc.isenabled()
    anyio_asyncio.CancelScope.__init__ = ordered_init  # type: ignore[method-assign]
    uuid.uuid4 = uuid4
    secrets.token_hex = token_hex
    module["time"] = _Clock(now)
    gc.disable()
    try:
        yield
    finally:
        anyio_asyncio.CancelScope.__init__ = scope_init  # type: ignore[method-assign]
        uuid.uuid4 = saved_uuid4
        secrets.token_hex = saved_token_hex
        module["time"] = saved_time
        if gc_was_enabled:
            gc.enable()
