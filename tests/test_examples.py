"""The README's runnable example works, in memory and on Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import RedisServer

EXAMPLE = Path(__file__).parent.parent / "examples" / "quickstart.py"


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_quickstart_runs(backend: str, request: pytest.FixtureRequest) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        env["REDIS_URL"] = server.url
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "client, after resuming at" in out.stdout
    assert "state: DONE" in out.stdout
