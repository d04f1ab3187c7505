"""A short soak (the full one is `python benchmarks/soak.py`): chaos on a real Redis, no leaks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).parent.parent / "benchmarks" / "soak.py"


@pytest.mark.redis_server
def test_short_soak_with_a_redis_restart_leaks_nothing() -> None:
    out = subprocess.run(
        [sys.executable, str(SOAK), "--streams", "150", "--duration", "6"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert '"client exact"' in out.stdout
    assert '"redis restarts": 1' in out.stdout
