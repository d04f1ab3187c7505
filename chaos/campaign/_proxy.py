"""One process's link to Redis, through a proxy the campaign can cut, stall and slow down.

`LinkProxy(ports)` runs `tests/tcp_proxy.py`'s proxy in a process of its own, with one listener
per Redis node (a cluster's six, a Sentinel setup's two data nodes, a server): the process
behind it connects to the listeners (the campaign remaps the nodes' addresses to them), and
each command acts on every listener at once, as a fault of that process's network would.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["LinkProxy"]


class LinkProxy:
    """The campaign's handle on one link's proxy process: `ports` maps each Redis node's port
    to the proxy's listener for it."""

    def __init__(self, targets: Sequence[int]) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "chaos.campaign._proxy", *map(str, targets)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline().split()
        if not line or line[0] != "ports":
            self.close()
            raise RuntimeError(f"the link proxy did not start: {line!r}")
        self.ports = dict(zip(targets, map(int, line[1:]), strict=True))
        self.pid = self._process.pid

    def _command(self, command: str) -> None:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        if self._process.stdout.readline().strip() != "ok":
            raise RuntimeError(f"the link proxy did not do {command!r}")

    def stall(self) -> None:
        self._command("stall")

    def resume(self) -> None:
        self._command("resume")

    def cut(self) -> None:
        self._command("cut")

    def delay(self, seconds: float) -> None:
        self._command(f"delay {seconds}")

    def close(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self._command("resume")
                self._command("quit")
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _serve(targets: list[int]) -> None:
    from tests.tcp_proxy import _Proxy

    proxies = [_Proxy(port) for port in targets]
    print("ports", *(proxy.port for proxy in proxies), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        for proxy in proxies:
            if command == "stall":
                proxy.stall()
            elif command == "resume":
                proxy.resume()
            elif command == "cut":
                proxy.cut()
            elif command == "delay":
                proxy.delay(args[0])
            elif command == "quit":
                proxy.close()
        print("ok", flush=True)
        if command == "quit":
            return
    for proxy in proxies:
        proxy.close()


if __name__ == "__main__":
    _serve([int(port) for port in sys.argv[1:]])
