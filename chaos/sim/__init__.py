"""A seeded, deterministic fault simulator for resumable_stream (issue 22).

    python -m chaos.sim run --seeds N [--start S] [--random K] [--jobs J]
    python -m chaos.sim replay SEED [-v]

Each seed is one run: a random workload (`_plan`: 2-4 processes, each a context with random
options on one simulated Redis; 1-3 streams of random chunks, unicode and events, some failing
or cancelled; producers, followers at random offsets, late readers, readers that stop early or
are cancelled, `has_existing_stream` and `cancel_stream` calls) under random faults
(`_redis`: latency, failed and lost commands, dropped connections, stalls, restarts, evictions,
a full server, slow links, processes dying or closing), on virtual time (`_loop`), the same on
every run of the seed (`_determinism`). What happened (`_world`, `_ledger`, `_history`) is then
checked against the model (`_model`, whose docstring states the rules).

The engine runs unmodified: the simulator drives it through its public API and a `Backend` of
its own, and reads a few private attributes only to record ground truth (which call's
generator a producer runs, a context's subscriptions when it should hold none).
"""

from ._model import Violation
from ._run import RunResult, run_seed

__all__ = ["RunResult", "Violation", "run_seed"]
