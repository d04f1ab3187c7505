"""One process's link to Redis, through a proxy the campaign can cut, stall and slow down.

`LinkProxy(ports)` runs a proxy in a process of its own (threads inside), with one listener
per Redis node (a cluster's six, a Sentinel setup's two data nodes, a server): the process
behind it connects to the listeners (the campaign remaps the nodes' addresses to them), and
each command acts on every listener at once, as a fault of that process's network would:

- `stall()` holds every byte in both directions while the connections stay open (a frozen
  network), `resume()` lets them through;
- `cut()` closes every open connection (new ones are accepted);
- `delay(seconds)` adds that much latency each way: every piece of data is forwarded
  `seconds` after it arrived, pieces in flight overlapping as on a long link (unlike
  `tests/tcp_proxy.py`, whose delay holds one piece at a time, so that a busy connection falls
  further and further behind: a throughput limit rather than a latency).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections import deque
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


class _Link:
    """The state every listener of one proxy process shares."""

    def __init__(self) -> None:
        self.flowing = threading.Event()
        self.flowing.set()
        self.delay = 0.0
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.closed = False
        self.changed = threading.Condition()  # a delay changed, or the link resumed

    def cut(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, set()
        for sock in sockets:
            _close(sock)

    def set_delay(self, seconds: float) -> None:
        with self.changed:
            self.delay = seconds
            self.changed.notify_all()

    def resume(self) -> None:
        self.flowing.set()
        with self.changed:
            self.changed.notify_all()


class _Direction:
    """One direction of one connection: a thread reads and stamps, another forwards each
    piece once it is `delay` old (and the link flows)."""

    def __init__(self, link: _Link, source: socket.socket, target: socket.socket) -> None:
        self.link = link
        self.source, self.target = source, target
        self.queue: deque[tuple[float, bytes]] = deque()
        self.ready = threading.Condition()
        self.eof = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.source.recv(65536)
                if not data:
                    break
                with self.ready:
                    self.queue.append((time.monotonic(), data))
                    self.ready.notify()
        except OSError:
            pass
        with self.ready:
            self.eof = True
            self.ready.notify()

    def _write(self) -> None:
        link = self.link
        try:
            while True:
                with self.ready:
                    while not self.queue and not self.eof:
                        self.ready.wait()
                    if not self.queue:
                        break
                    received, data = self.queue[0]
                while True:
                    link.flowing.wait()
                    with link.changed:
                        due = received + link.delay - time.monotonic()
                        if due <= 0 and link.flowing.is_set():
                            break
                        if due > 0:
                            link.changed.wait(due)  # until it is due, or the delay changes
                if link.closed:
                    break
                self.target.sendall(data)
                with self.ready:
                    self.queue.popleft()
        except OSError:
            pass
        for sock in (self.source, self.target):
            with link.lock:
                link.sockets.discard(sock)
            _close(sock)


class _Listener:
    def __init__(self, link: _Link, target_port: int) -> None:
        self.link = link
        self.target = ("127.0.0.1", target_port)
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.socket.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.link.closed:
            try:
                client, _ = self.socket.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)  # the node is down: as a refused connection, nearly
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.link.lock:
                self.link.sockets.update((client, upstream))
            _Direction(self.link, client, upstream)
            _Direction(self.link, upstream, client)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _serve(targets: list[int]) -> None:
    link = _Link()
    listeners = [_Listener(link, port) for port in targets]
    print("ports", *(listener.port for listener in listeners), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "stall":
            link.flowing.clear()
        elif command == "resume":
            link.resume()
        elif command == "cut":
            link.cut()
        elif command == "delay":
            link.set_delay(float(args[0]))
        elif command == "quit":
            break
        print("ok", flush=True)
    link.closed = True
    link.resume()
    for listener in listeners:
        _close(listener.socket)
    link.cut()
    with contextlib.suppress(OSError):  # stdin ended: nobody reads this any more
        print("ok", flush=True)


if __name__ == "__main__":
    _serve([int(port) for port in sys.argv[1:]])
