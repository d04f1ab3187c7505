"""The seeded fault simulator (`chaos.sim`): the CI batch, determinism, and known bugs found.

The batch runs a fixed range of seeds plus a few fresh random ones (printed, so that a failure
replays: `python -m chaos.sim replay SEED`), and asserts that no run violates the model (the
rules are in `chaos/sim/_model.py`): 5,100 seeds, about 45 s of one core here (110 seeds/s;
`CHAOS_SIM_SEEDS`, `CHAOS_SIM_FRESH` and `CHAOS_SIM_JOBS` change the numbers).

Known bugs: each test below puts a bug back into the engine (a small patch that brings back
what a fix removed, or the symptom of a defect) and asserts that the seeds of the CI batch
catch it, with a violation of the kind that names it (one the seed does not show without it).

The same, with issue 10's fixes reverted in the code itself (scratch branches, not merged),
caught in seeds 0-4999 (the first seeds that catch each, which show nothing on `sim`):
- `scratch/revert-end-announce` (defect 4: an end whose state cannot be written is announced
  anyway, and written later): 93 seeds, `false-lost` (later readers told the producer died),
  first 92, 112, 128;
- `scratch/revert-gap-recovery` (defect 8: a gap is asked for again): 51 seeds,
  `false-incomplete`, first 30, 79, 224;
- `scratch/revert-lost-replay-none` (defect 7: a lost replay of a finished stream is
  `ProducerUnavailableError`, never None): 24 seeds, `false-none`, first 1005, 1030, 1537;
- `scratch/revert-producer-identity` (defect 3: two producers of one id are never merged):
  11 seeds, `wrong-text`, first 193, 380, 600.
Defect 1 of issue 22 (not fixed yet on this base) shows as `false-none` in seeds 36, 243, 386.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from chaos.sim._batch import run_many
from chaos.sim._frozen import load_plan
from chaos.sim._run import run_seed
from resumable_stream import StreamIncompleteError
from resumable_stream._follower import Follower
from resumable_stream._hub import Hub
from resumable_stream._producer import Producer

ROOT = Path(__file__).resolve().parent.parent

# The CI batch: seeds 0..FIXED-1, and FRESH random ones.
FIXED = int(os.environ.get("CHAOS_SIM_SEEDS", "5000"))
FRESH = int(os.environ.get("CHAOS_SIM_FRESH", "100"))
JOBS = int(os.environ.get("CHAOS_SIM_JOBS", "1"))


def _batch_seeds() -> list[int]:
    fresh = [random.SystemRandom().randrange(1 << 31, 1 << 40) for _ in range(FRESH)]
    print(f"fresh random seeds: {' '.join(map(str, fresh))}")
    return [*range(FIXED), *fresh]


@pytest.mark.timeout(900)
def test_the_ci_batch_violates_nothing() -> None:
    failing = []
    for outcome in run_many(_batch_seeds(), JOBS):
        if outcome.violations:
            kinds = sorted({kind for kind, _ in outcome.violations})
            failing.append(f"seed {outcome.seed} ({', '.join(kinds)}): {outcome.violations[0][1]}")
    assert not failing, (
        f"{len(failing)} seeds violate the model (replay one with "
        "`python -m chaos.sim replay SEED -v`):\n" + "\n".join(failing)
    )


# The seeds that found defects, fixed since (each also acted out exactly, on every backend, in
# `test_chaos_findings.py` or `test_chaos_regressions.py`), their plans frozen in
# `tests/sim_regressions/` when they found them: the plans seeds make change as the simulator
# grows, the workload that found a defect does not.
REGRESSIONS = Path(__file__).parent / "sim_regressions"
REGRESSION_SEEDS = {
    3234: "a durable follower the producer never answered declared it dead after a short silence",
    3847: "a stream replaced by create_new_resumable_stream: a restart",
    5021: "a cursor into a replaced stream answered None",
    5609: "a producer's short outage taken for a death",
    6478: "requests held by a stalled Redis counted as reaching nobody",
    7089: "LOST written over an end written meanwhile",
    9013: "the end held aside while a recovery asked nobody",
    28093: "a helper started under a cancelled scope spun, holding the loop",
    32126: "an end that came while the follower recorded a live producer dead",
    44196: "an end that came while the follower recorded a live producer dead",
    50188: "a cursor's reader read running after LOST, its producer back: None",
    72531: "a durable end given up at start + TTL, a late write making the keys again",
    103807: "a writer elected and failed before it started, its stream left running",
    105076: "an election that met LOST, then running again, answered None",
    163941: "an answer's later piece without the first: 'malformed message'",
}


@pytest.mark.parametrize("seed", sorted(REGRESSION_SEEDS))
def test_the_seeds_that_found_defects_run_clean(seed: int) -> None:
    plan = load_plan(REGRESSIONS / f"seed-{seed}.json")
    violations = [v.line() for v in run_seed(seed, plan).violations]
    assert not violations, f"seed {seed} ({REGRESSION_SEEDS[seed]}):\n" + "\n".join(violations)


# Determinism

# Calm, light and heavy faults, durable, defect 1 showing, a run stopped as a livelock (765).
DETERMINISM_SEEDS = (0, 1, 4, 36, 765, 968, 1723)


def test_a_seed_gives_the_same_run_twice() -> None:
    for seed in DETERMINISM_SEEDS:
        first, second = run_seed(seed), run_seed(seed)
        assert first.digest == second.digest, f"seed {seed} ran differently twice"
        assert [v.line() for v in first.violations] == [v.line() for v in second.violations]


def test_a_seed_gives_the_same_run_in_another_process() -> None:
    """Another interpreter, another PYTHONHASHSEED: string hashes, object addresses, every
    source of randomness but the seed differ."""
    here = {seed: run_seed(seed).digest for seed in DETERMINISM_SEEDS}
    code = (
        "from chaos.sim._run import run_seed\n"
        f"print(' '.join(run_seed(s).digest for s in {DETERMINISM_SEEDS!r}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [here[seed] for seed in DETERMINISM_SEEDS]


# Known bugs: put back, then found within the CI batch's fixed seeds.


@contextmanager
def _patched(target: Any, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    saved = getattr(target, name)
    setattr(target, name, replacement)
    try:
        yield
    finally:
        setattr(target, name, saved)


def _first_catch(
    bug: Callable[[], AbstractContextManager[None]], kinds: set[str], limit: int = FIXED
) -> tuple[int, str]:
    """The first seed of the batch that `bug` makes violate the model with a violation of one
    of `kinds` (one the same seed does not show without it), and that violation."""
    for seed in range(limit):
        with bug():
            found = [v.line() for v in run_seed(seed).violations if v.kind in kinds]
        if found:
            without = {v.line() for v in run_seed(seed).violations}
            new = [line for line in found if line not in without]
            if new:
                return seed, new[0]
    pytest.fail(f"no seed of the first {limit} found a violation of {sorted(kinds)}")


def test_it_finds_two_producers_merged() -> None:
    """Issue 10, defect 3, without its fix: a follower takes any producer's text as its own
    (no `ProducerConflictError`), so two producers that Redis let run under one id (keys
    evicted, expired, lost in a restart) get merged."""
    bug = partial(_patched, Follower, "_same_producer", lambda self, token: True)
    seed, line = _first_catch(bug, {"wrong-text"})
    print(f"seed {seed}: {line}")


def test_it_finds_a_gap_ending_a_follower() -> None:
    """Issue 10, defect 8, without its fix: any gap in what a follower receives (a lost
    message, a live batch before its subscription took effect, the next replay window) ends
    it with `StreamIncompleteError` instead of asking the producer again."""

    def give_up(self: Follower) -> None:
        self.fail(StreamIncompleteError(f"a gap in stream {self.stream_id!r}"))

    seed, line = _first_catch(
        partial(_patched, Follower, "_recover_soon", give_up), {"false-incomplete"}
    )
    print(f"seed {seed}: {line}")


def test_it_finds_an_unwritten_end_never_announced() -> None:
    """Issue 10, defect 4, without its fix: when the end state cannot be written (a full or
    unreachable Redis), the end is not announced and not written later: followers wait for an
    end that never comes, and later readers find a stream that seems to run with nobody."""
    record = Producer._record

    async def record_once(self: Producer, state: str, *, retry: bool = False) -> bool:
        recorded = await record(self, state, retry=retry)
        if not recorded:
            self._following = False  # so `_finish` announces nothing
            self._store = None
        return True  # and nothing retries it

    bug = partial(_patched, Producer, "_record", record_once)
    seed, line = _first_catch(bug, {"false-lost", "hang", "false-incomplete"})
    print(f"seed {seed}: {line}")


def test_it_finds_a_finished_streams_tail_answered_none() -> None:
    """Defect 1 (issue 22), put back: a resume short of a finished stream's end whose request
    reaches nobody (its lingering producer subscribing again after an outage, or a slow link)
    is not retried; it is taken for "no longer lingering", and answered `None`, "nothing to
    resume" (a 204 over SSE: the browser stops with a truncated text)."""

    async def never_lingering(self: Hub, stream_id: str) -> bool:
        return False

    bug = partial(_patched, Hub, "lingering", never_lingering)
    seed, line = _first_catch(bug, {"false-none"})
    print(f"seed {seed}: {line}")
