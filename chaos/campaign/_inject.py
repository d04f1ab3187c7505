"""Known bugs put back into the engine of a campaign's processes, to show that the campaign
finds them: `CAMPAIGN_INJECT=<name>` in the orchestrator's environment (each process patches
its own engine at start; nothing is changed on disk).

- `deaf-linger`: issue 22's defect 1 as its symptom, as `tests/test_simulation.py` puts it
  back: a finished producer stops listening for requests as soon as it ends, so a resume of
  its tail while it lingers gets `None` (over SSE, a 204): `false-none`.
- `merged-producers`: issue 10's defect 3: a follower takes any producer's text as its own,
  so two producers that Redis let run under one id get merged: `wrong-text`.
"""

from __future__ import annotations

import os
from typing import Any

import anyio

__all__ = ["inject"]


def inject() -> None:
    name = os.environ.get("CAMPAIGN_INJECT", "")
    if not name:
        return
    from resumable_stream._follower import Follower
    from resumable_stream._producer import Producer

    if name == "deaf-linger":
        linger = Producer.linger

        async def deaf_linger(self: Producer) -> None:
            with anyio.CancelScope(shield=True):
                await self._stop_listening()
            await linger(self)

        Producer.linger = deaf_linger  # type: ignore[method-assign]
    elif name == "merged-producers":

        def same(self: Any, token: str) -> bool:
            return True

        Follower._same_producer = same  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown CAMPAIGN_INJECT {name!r}")
