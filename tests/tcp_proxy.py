"""A loopback TCP proxy that tests can stall or cut, to act out a bad network.

It runs in a process of its own (threads inside), so it serves clients on any event loop and
never competes with the test for the GIL. `stall()` stops forwarding in both directions while
every connection stays open (a frozen server or a black-holed network); `resume()` lets the held
bytes through; `cut()` closes every open connection (a dropped network), while new connections
are accepted; `delay(seconds)` holds every piece of data that long before forwarding it, in each
direction (a slow link: a round trip takes twice as long more); `retarget(port)` sends the
connections made from then on to another port (a load balancer's next pick). Each call returns
once the proxy has done it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import Any


class TcpProxy:
    """The test's handle on a proxy process forwarding a loopback port to `target_port`."""

    def __init__(self, target_port: int) -> None:
        self._process = subprocess.Popen(
            [sys.executable, __file__, str(target_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self.port = int(self._process.stdout.readline().split()[1])

    def _command(self, command: str) -> None:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        if self._process.stdout.readline().strip() != "ok":
            raise RuntimeError(f"the proxy did not do {command!r}")

    def stall(self) -> None:
        self._command("stall")

    def resume(self) -> None:
        self._command("resume")

    def cut(self) -> None:
        self._command("cut")

    def delay(self, seconds: float) -> None:
        self._command(f"delay {seconds}")

    def retarget(self, port: int) -> None:
        self._command(f"retarget {port}")

    def close(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):
                self._command("quit")
            self._process.wait(timeout=10)
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._delay = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def delay(self, seconds: str) -> None:
        self._delay = float(seconds)

    def retarget(self, port: str) -> None:
        self._target = (self._target[0], int(port))

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        _close(self._listener)
        self.cut()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                # As Redis and its clients do: no Nagle delay on small writes.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, target), name="tcp-proxy-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                if self._delay:
                    time.sleep(self._delay)
                if self._closed:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with self._lock:
                    self._sockets.discard(sock)
                _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _serve(target_port: int) -> None:
    proxy = _Proxy(target_port)
    print(f"port {proxy.port}", flush=True)
    actions: dict[str, Any] = {
        "stall": proxy.stall,
        "resume": proxy.resume,
        "cut": proxy.cut,
        "delay": proxy.delay,
        "retarget": proxy.retarget,
        "quit": proxy.close,
    }
    for line in sys.stdin:
        command, *args = line.split()
        actions[command](*args)
        print("ok", flush=True)
        if command == "quit":
            return
    proxy.close()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
