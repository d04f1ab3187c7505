"""The simulator's command line.

    python -m chaos.sim run --seeds N [--start S] [--random K] [--jobs J]
    python -m chaos.sim replay SEED [-v]

`run` runs seeds S..S+N-1 and K fresh random ones (printed, so that a failure replays), prints
each failing seed with its violations, one line each, then a summary; it exits 1 if any seed
violated the model. `replay` runs one seed again and prints its plan, its history (what each
process did, when, the faults) and what broke the model; `-v` adds every command and message.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence

from ._batch import Outcome, run_many
from ._run import RunResult, run_seed

__all__ = ["main"]

# Events a replay leaves out unless -v: one per command and per message.
_CHATTER = frozenset({"cmd", "deliver", "subscribed", "unsubscribed", "gen"})


def _seeds(start: int, count: int, fresh: int) -> tuple[list[int], list[int]]:
    system = random.SystemRandom()
    extra = [system.randrange(1 << 31, 1 << 40) for _ in range(fresh)]
    return list(range(start, start + count)), extra


def _run(args: argparse.Namespace) -> int:
    fixed, fresh = _seeds(args.start, args.seeds, args.random)
    if fresh:
        print(f"fresh random seeds: {' '.join(map(str, fresh))}", flush=True)
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    for outcome in run_many([*fixed, *fresh], args.jobs):
        outcomes.append(outcome)
        if outcome.violations:
            first = outcome.violations[0]
            more = f" (+{len(outcome.violations) - 1} more)" if len(outcome.violations) > 1 else ""
            print(f"seed {outcome.seed}: {first[1][:240]}{more}", flush=True)
    elapsed = time.perf_counter() - started
    print(summary(outcomes, elapsed))
    return 1 if any(o.violations for o in outcomes) else 0


def summary(outcomes: Sequence[Outcome], elapsed: float) -> str:
    stats: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    failing = 0
    for outcome in outcomes:
        stats.update(outcome.stats)
        faults.update(outcome.faults)
        kinds.update(kind for kind, _ in outcome.violations)
        failing += bool(outcome.violations)
    rate = len(outcomes) / elapsed if elapsed else 0.0
    lines = [
        f"{len(outcomes)} seeds in {elapsed:.1f}s ({rate:.0f} seeds/s), {failing} failing",
        "  "
        + ", ".join(
            f"{stats[k]} {k}" for k in ("streams", "instances", "readers", "calls") if k in stats
        )
        + f"; {stats['virtual_seconds']} virtual seconds",
        "  faults: " + (", ".join(f"{k} {v}" for k, v in sorted(faults.items())) or "none"),
        "  violations: " + (", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"),
    ]
    return "\n".join(lines)


def _replay(args: argparse.Namespace) -> int:
    result = run_seed(args.seed)
    for line in describe(result, verbose=args.verbose):
        print(line)
    return 1 if result.violations else 0


def describe(result: RunResult, *, verbose: bool = False) -> Iterator[str]:
    """A readable account of one run: its plan, its history, what broke the model."""
    plan = result.plan
    yield f"seed {result.seed}: profile {plan.profile}, history digest {result.digest}"
    yield "processes:"
    for proc in plan.processes:
        options = ", ".join(f"{k}={v}" for k, v in proc.context.options().items())
        link = proc.link
        yield (
            f"  {proc.name}: {options}; link latency {link.latency * 1000:.2f}ms"
            f" +{link.jitter * 1000:.2f}ms, spikes {link.spike_p} to {link.spike:.2f}s,"
            f" fail {link.fail_p}, lost {link.lost_p}, command_timeout {link.command_timeout}s"
        )
    yield "streams:"
    for stream in plan.streams:
        steps = " ".join(
            f"[{s.delay:.3f}s {s.text!r}{' ' + s.event if s.event else ''}]" for s in stream.steps
        )
        fails = ", then fails" if stream.fails else ""
        yield f"  {stream.id}: {len(stream.steps)} chunks{fails}: {steps}"
    yield "calls:"
    for call in plan.calls:
        reading = ""
        if call.api not in ("has_existing_stream", "cancel_stream"):
            reading = f" read by {call.mode}"
            if call.limit is not None:
                reading += f" (limit {call.limit})"
            if call.stop_after is not None:
                reading += f", aclose after {call.stop_after}"
            if call.cancel_after is not None:
                reading += f", cancelled after {call.cancel_after}s"
            if call.pause:
                reading += f", {call.pause}s between reads"
        yield (
            f"  #{call.index} at {call.at:.4f}s {call.proc}: {call.api}({call.stream!r}"
            f"{'' if reading == '' else f', resume_at={call.resume_at}'}){reading}"
        )
    yield "faults planned:"
    for fault in plan.faults:
        yield f"  {fault}"
    yield f"history ({'all events' if verbose else 'without commands and messages: -v for all'}):"
    events = result.history.events
    if not verbose:
        events = [e for e in events if e[2] not in _CHATTER]
    yield from ("  " + line for line in result.history.format(events))
    world = result.world
    if world is not None:
        yield "instances (producer runs):"
        for instance in world.instances:
            yield (
                f"  {instance.name} on {instance.proc} (call {instance.call}"
                f"{', offline' if instance.offline else ''}): elected {instance.elected_at:.6f},"
                f" started {instance.started_at:.6f}, ended {instance.ended} at"
                f" {instance.ended_at:.6f}, {len(instance.text)} characters: {instance.text!r}"
            )
        involved = {v.call for v in result.violations if v.call is not None}
        if involved:
            yield "calls that broke the model:"
        for record in world.records:
            if record.plan.index not in involved:
                continue
            call = record.plan
            yield (
                f"  #{call.index} {call.proc} {call.api}({call.stream!r}, resume_at="
                f"{call.resume_at}) from {record.t_call:.6f} to {record.t_return:.6f}:"
                f" {record.outcome} {record.error or ''} {record.message[:200]}"
            )
            if record.read is not None:
                read = record.read
                yield f"    read {read.text!r}"
                yield f"    then {read.end} at {read.t_end:.6f} {read.error or ''} {read.message}"
                offset = call.resume_at or 0
                for instance in world.instances:
                    if instance.stream.id == call.stream:
                        yield (
                            f"    allowed by {instance.name} ({instance.ended}): "
                            f"{instance.text[offset:]!r} or a prefix of it then a typed error"
                        )
    yield f"violations ({len(result.violations)}):"
    for violation in result.violations:
        yield f"  {violation.line()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.sim", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run seeds, print the failing ones and a summary")
    run.add_argument("--seeds", type=int, default=1000, help="how many seeds from --start")
    run.add_argument("--start", type=int, default=0, help="the first seed")
    run.add_argument("--random", type=int, default=0, help="fresh random seeds to add")
    run.add_argument("--jobs", type=int, default=1, help="processes to run seeds in")
    replay = commands.add_parser("replay", help="replay one seed and print its history")
    replay.add_argument("seed", type=int)
    replay.add_argument("-v", "--verbose", action="store_true", help="every command and message")
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    return _replay(args)


if __name__ == "__main__":
    sys.exit(main())
