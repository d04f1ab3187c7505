"""Running seeds: one run per seed on a fresh virtual-time loop, then the model check."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ._determinism import deterministic
from ._history import History
from ._loop import Deadlock, Runaway, VirtualClock, VirtualLoop
from ._model import Violation, check
from ._plan import Plan, make_plan
from ._world import World

__all__ = ["RunResult", "run_seed"]

# A run that takes more loop turns than this, or more virtual time, is a runaway (a loop
# that never lets time pass): reported, not waited for.
MAX_TURNS = 60_000
MAX_TIME = 3_600.0


@dataclass(slots=True)
class RunResult:
    seed: int
    plan: Plan
    violations: list[Violation]
    digest: str
    history: History
    world: World | None
    stats: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    virtual_time: float = 0.0
    turns: int = 0
    elapsed: float = 0.0


def run_seed(seed: int, plan: Plan | None = None) -> RunResult:
    """Run `seed`'s plan (or `plan`, one frozen earlier: see `_frozen`) and check it against
    the model."""
    started = time.perf_counter()
    plan = make_plan(seed) if plan is None else plan
    clock = VirtualClock(MAX_TIME, MAX_TURNS)
    loop = VirtualLoop(clock)
    history = History(loop.time)
    loop_errors: list[str] = []
    worlds: list[World] = []

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message"))
        if exc is not None:
            message += f" [{type(exc).__name__}: {exc}]"
        history.add("loop", "error", message[:300])
        loop_errors.append(message)

    async def main() -> None:
        world = World(plan, history, loop)
        worlds.append(world)
        await world.run()

    violations: list[Violation] = []
    loop.set_exception_handler(on_loop_error)
    with deterministic(loop.time):
        try:
            loop.run_until_complete(main())
        except (Deadlock, Runaway) as exc:
            history.add("sim", "stopped", type(exc).__name__, str(exc))
            waiting = _unfinished(worlds[0]) if worlds else ""
            violations.append(
                Violation("hang", f"the run stopped: {type(exc).__name__}: {exc}{waiting}")
            )
        finally:
            history.frozen = True
            _shut_down(loop)
    world = worlds[0] if worlds else None
    if world is not None:
        violations.extend(check(world, loop_errors))
    result = RunResult(seed, plan, violations, history.digest(), history, world)
    result.virtual_time = clock.now
    result.turns = clock.turns
    if world is not None:
        result.stats.update(
            streams=len(plan.streams),
            instances=len(world.instances),
            calls=sum(1 for r in world.records if r.outcome != "skipped"),
            readers=sum(1 for r in world.records if r.read is not None),
        )
        result.faults.update(world.ledger.counts)
    result.elapsed = time.perf_counter() - started
    return result


def _unfinished(world: World) -> str:
    """The calls and reads a stopped run was still waiting for."""
    waiting = []
    for record in world.records:
        call = record.plan
        if record.t_call < float("inf") and record.t_return == float("inf"):
            waiting.append(f"call {call.index} ({call.api} of {call.stream} on {call.proc})")
        elif record.read is not None and record.read.end == "open":
            waiting.append(f"the read of call {call.index} ({call.stream} on {call.proc})")
    return f"; still waiting: {', '.join(waiting)}" if waiting else ""


def _shut_down(loop: VirtualLoop) -> None:
    """Close the loop, ending whatever a stopped run left running."""
    loop.set_exception_handler(lambda loop, context: None)
    loop.clock.max_turns = loop.clock.turns + 20_000
    try:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except (Deadlock, Runaway):
        pass
    finally:
        loop.close()
