"""Many seeds, in this process or in a pool of worker processes.

A worker sends back an `Outcome`: what the summary and the failing lines need, not the
history (a replay makes that again from the seed).
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ._run import run_seed

__all__ = ["Outcome", "run_many", "run_one"]


@dataclass(slots=True)
class Outcome:
    seed: int
    violations: list[tuple[str, str]]  # (kind, line)
    digest: str
    elapsed: float
    stats: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)


def run_one(seed: int) -> Outcome:
    result = run_seed(seed)
    stats = Counter(result.stats)
    stats["virtual_seconds"] = round(result.virtual_time)
    return Outcome(
        seed,
        [(v.kind, v.line()) for v in result.violations],
        result.digest,
        result.elapsed,
        stats,
        Counter(result.faults),
    )


def run_many(seeds: Sequence[int], jobs: int = 1) -> Iterator[Outcome]:
    """Each seed's outcome, in the order of `seeds`."""
    if jobs <= 1:
        yield from map(run_one, seeds)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(jobs) as pool:
        yield from pool.imap(run_one, seeds, chunksize=16)
