"""Real servers for tests: an app under uvicorn in a subprocess, on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Poll until the server accepts connections (a server offers nothing to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


@contextmanager
def uvicorn_server(
    app: str, env: dict[str, str] | None = None, *, loop: str = "asyncio"
) -> Iterator[str]:
    """Run `uvicorn <app>` from the repository root on event loop `loop` (asyncio, uvloop);
    yields its base URL."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    environ.update(env or {})
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    # Always explicit: uvicorn's default ("auto") picks uvloop whenever it is installed.
    command += ["--loop", loop]
    process = subprocess.Popen(
        [*command, "--log-level", "warning"], cwd=ROOT, env=environ, stderr=subprocess.PIPE
    )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        if b"Traceback" in stderr:
            raise AssertionError(f"the server logged an error:\n{stderr.decode()}")
