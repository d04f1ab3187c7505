"""The orchestrator: one campaign run, from its plan to its records.

It starts the topology, a proxy per proxied process, the worker processes, the SSE servers
(uvicorn, one on asyncio and one on uvloop) and the SSE client process; tells them the run's
start (`go <t0>`); runs the fault schedule in three lanes (Redis-level faults, process-level
faults, and faults aimed at planned resumes), each one fault at a time; watches for processes
that exit when nobody killed them (recorded, and started again); then heals everything, lets
the processes finish what they started, stops them, checks that every key of the run has a
TTL, and stops everything it started, whatever happens (SIGTERM and SIGINT included).

Every child runs in the orchestrator's process group (a fault kills one by its pid), so that
killing the group (`kill -- -PGID`) ends the whole run, servers included.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import redis

from tests.servers import free_port, wait_for_port

from ._connect import HOST
from ._plan import FaultSpec, Plan, dump
from ._process import ProcessSpec
from ._proxy import LinkProxy
from ._topology import FaultRecord, HarnessError, Topology, client_kill, make_topology

__all__ = ["RunOutcome", "SetupError", "execute", "restore"]

ROOT = Path(__file__).resolve().parents[2]
# How long a process may take to be ready (imports, contexts opened while Redis may be down).
_READY = 90.0
# How long the processes get, after the schedule, to finish what they started.
_FINISH = 150.0
_STOP = 60.0


class SetupError(RuntimeError):
    """The campaign could not start (a topology, a process): not a finding about the engine."""


@dataclass
class RunOutcome:
    """What the orchestrator saw; the checker reads the rest from the records."""

    plan: Plan
    folder: Path
    t0: float = 0.0
    t_end: float = 0.0  # when the schedule ended (the faults healed)
    t_stop: float = 0.0  # when the processes were told to stop
    faults: list[FaultRecord] = field(default_factory=list)
    crashes: list[dict[str, Any]] = field(default_factory=list)  # exits nobody caused
    leaks: list[str] = field(default_factory=list)  # keys without a TTL
    not_idle: list[str] = field(default_factory=list)  # processes still busy at the stop
    notes: list[str] = field(default_factory=list)


class Child:
    """One supervised process (a worker, an SSE server, the SSE client), across its
    incarnations."""

    def __init__(
        self,
        name: str,
        role: str,
        spec: Path,
        logs: Path,
        env: dict[str, str],
        port: int = 0,
        loop: str = "asyncio",
    ) -> None:
        self.name, self.role, self.spec, self.logs = name, role, spec, logs
        self.env, self.port, self.loop = env, port, loop
        self.incarnation = -1
        self.process: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.expected = True  # its exit would be ours (not started, killed, stopped)
        self.lock = threading.RLock()
        self._stderr: IO[bytes] | None = None

    def stderr_path(self, incarnation: int) -> Path:
        return self.logs / f"{self.name}.{incarnation}.stderr"

    def start(self) -> None:
        self.incarnation += 1
        self.lines = queue.Queue()
        self._stderr = self.stderr_path(self.incarnation).open("wb")
        env = {
            **self.env,
            "CAMPAIGN_SPEC": str(self.spec),
            "CAMPAIGN_INCARNATION": str(self.incarnation),
        }
        if self.role == "server":
            command = [
                sys.executable, "-m", "uvicorn", "chaos.campaign.app:app",
                "--host", HOST, "--port", str(self.port), "--loop", self.loop,
                "--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "20",
            ]  # fmt: skip
            stdin = subprocess.DEVNULL
        else:
            module = "chaos.campaign.worker" if self.role == "worker" else "chaos.campaign.client"
            command = [sys.executable, "-m", module, str(self.spec), str(self.incarnation)]
            stdin = subprocess.PIPE
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True,
        )  # fmt: skip
        self.expected = False
        threading.Thread(target=self._read, args=(self.process, self.lines), daemon=True).start()

    @staticmethod
    def _read(process: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.strip())
        lines.put("<eof>")

    def wait_line(self, word: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return False
            if line == word:
                return True
            if line == "<eof>":
                self.lines.put(line)
                return False

    def ready(self, timeout: float = _READY) -> None:
        assert self.process is not None
        if self.role == "server":
            wait_for_port(self.port, self.process, timeout)  # type: ignore[arg-type]
            return
        if not self.wait_line("ready", timeout):
            raise SetupError(f"{self.name} did not get ready:\n{self.stderr_tail()}")

    def send(self, line: str) -> None:
        if self.process is None or self.process.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()

    def kill(self) -> None:
        """SIGKILL (a fault, or the end of a run that cannot stop nicely)."""
        self.expected = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self._close_pipes()

    def stop(self, timeout: float) -> bool:
        """Ask it to stop (`stop`, or SIGTERM for a server) and wait; SIGKILL after
        `timeout`. Whether it stopped by itself."""
        self.expected = True
        process = self.process
        if process is None or process.poll() is not None:
            self._close_pipes()
            return True
        if self.role == "server":
            process.send_signal(signal.SIGTERM)
        else:
            self.send("stop")
            with contextlib.suppress(OSError, ValueError):
                assert process.stdin is not None
                process.stdin.close()
        try:
            process.wait(timeout=timeout)
            stopped = True
        except subprocess.TimeoutExpired:
            stopped = False
        self.kill()
        return stopped

    def _close_pipes(self) -> None:
        if self.process is not None:
            for pipe in (self.process.stdin,):
                if pipe is not None:
                    with contextlib.suppress(OSError, ValueError):
                        pipe.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path(self.incarnation).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Orchestrator:
    def __init__(self, plan: Plan, folder: Path, log: Callable[[str], None]) -> None:
        self.plan = plan
        self.folder = folder
        self.log = log
        self.outcome = RunOutcome(plan, folder)
        self.records = folder / "records"
        self.logs = folder / "logs"
        self.records.mkdir(parents=True)
        self.logs.mkdir()
        self.topology: Topology | None = None
        self.proxies: dict[str, LinkProxy] = {}
        self.children: dict[str, Child] = {}
        self.stop_faults = threading.Event()
        self.lock = threading.Lock()
        self.t0 = 0.0

    # Setting up

    def setup(self) -> None:
        plan = self.plan
        self.log(f"starting the {plan.topology} topology")
        topology = self.topology = make_topology(plan.topology)
        try:
            topology.start()
        except Exception as exc:
            raise SetupError(f"the {plan.topology} topology did not start: {exc}") from exc
        ports = [node.port for node in topology.nodes()]
        for name in plan.proxied:
            self.proxies[name] = LinkProxy(ports)
        plan_path = self.folder / "plan.json"
        plan_path.write_text(dump(plan), encoding="utf-8")
        server_ports = {name: free_port() for name in plan.servers}
        servers = [f"http://{HOST}:{server_ports[name]}" for name in plan.servers]
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        for name in (*plan.workers, *plan.servers, "C0"):
            proxy = self.proxies.get(name)
            link = topology.link(proxy.ports if proxy is not None else {})
            spec = self.folder / f"{name}.json"
            ProcessSpec.write(spec, name, plan_path, self.records, link, servers)
            if name in plan.workers:
                child = Child(name, "worker", spec, self.logs, env)
            elif name in plan.servers:
                loop = "uvloop" if name == "S1" else "asyncio"
                child = Child(name, "server", spec, self.logs, env, server_ports[name], loop)
            else:
                child = Child(name, "client", spec, self.logs, env)
            self.children[name] = child
        self.log(f"starting {len(self.children)} processes")
        for child in self.children.values():
            child.start()
        for child in self.children.values():
            child.ready()

    # Running

    def run(self) -> None:
        plan = self.plan
        self.t0 = self.outcome.t0 = time.time() + 0.5
        for child in self.children.values():
            if child.role != "server":
                child.send(f"go {self.t0}")
        self.log(f"running for {plan.duration:g} s with {len(plan.faults)} planned faults")
        lanes = [
            threading.Thread(target=self._lane, args=(lane,), name=f"lane-{lane}", daemon=True)
            for lane in ("redis", "process", "aimed")
        ]
        watcher = threading.Thread(target=self._watch, name="watcher", daemon=True)
        for thread in (*lanes, watcher):
            thread.start()
        end = self.t0 + plan.duration
        while time.time() < end and not self.stop_faults.wait(min(1.0, end - time.time())):
            pass
        self.stop_faults.set()
        for thread in lanes:
            thread.join()
        self.log("healing")
        assert self.topology is not None
        try:
            self.topology.heal()
        except Exception as exc:  # the processes still finish, and are checked
            self.outcome.notes.append(f"the topology could not be healed: {exc!r}")
        for proxy in self.proxies.values():
            proxy.resume()
            proxy.delay(0.0)
        self.outcome.t_end = time.time()
        self.log("letting the processes finish")
        deadline = time.monotonic() + _FINISH
        for child in self.children.values():
            if child.role == "server":
                continue
            with child.lock:
                idle = child.wait_line("idle", max(0.0, deadline - time.monotonic()))
            if not idle:
                self.outcome.not_idle.append(child.name)
        self.watching = False
        self.outcome.t_stop = time.time()
        watcher.join()
        self.log("stopping the processes")
        clients = [c for c in self.children.values() if c.role != "server"]
        for child in clients:
            child.expected = True
            child.send("stop")
        for child in clients:
            if not child.stop(_STOP):
                self.outcome.notes.append(f"{child.name} did not stop within {_STOP:g} s")
        for child in self.children.values():
            if child.role == "server" and not child.stop(_STOP):
                self.outcome.notes.append(f"{child.name} did not stop within {_STOP:g} s")
        self.outcome.leaks = self._leaks()

    watching = True

    def _watch(self) -> None:
        """Record (and start again) processes that exit when nobody killed them."""
        while self.watching:
            time.sleep(0.2)  # a poll of the children (a process offers nothing to wait on)
            for child in self.children.values():
                with child.lock:
                    process = child.process
                    if child.expected or process is None or process.poll() is None:
                        continue
                    self.outcome.crashes.append({
                        "process": child.name,
                        "incarnation": child.incarnation,
                        "t": time.time(),
                        "returncode": process.returncode,
                        "stderr": child.stderr_tail(),
                    })  # fmt: skip
                    self.log(f"{child.name} exited by itself ({process.returncode})")
                    child.expected = True
                    if not self.stop_faults.is_set():
                        self._restart(child)

    def _restart(self, child: Child) -> None:
        child.start()
        try:
            child.ready()
        except (SetupError, TimeoutError, RuntimeError) as exc:
            self.outcome.notes.append(f"{child.name} did not come back: {exc}")
            return
        if child.role != "server":
            child.send(f"go {self.t0}")

    def _lane(self, lane: str) -> None:
        for spec in self.plan.faults:
            if spec.lane != lane:
                continue
            delay = self.t0 + spec.at - time.time()
            if delay > 0 and self.stop_faults.wait(delay):
                return
            if self.stop_faults.is_set():
                return
            record = self._fault(spec)
            with self.lock:
                self.outcome.faults.append(record)

    def _fault(self, spec: FaultSpec) -> FaultRecord:
        assert self.topology is not None
        try:
            if spec.lane == "redis":
                return self.topology.fault(spec, self._now, self._running)
            return self._process_fault(spec)
        except (HarnessError, redis.RedisError, OSError, RuntimeError) as exc:
            self.log(f"fault {spec.kind} at {spec.at}: {exc!r}")
            record = FaultRecord(
                spec.kind,
                spec.lane,
                time.time(),
                time.time(),
                outage=True,
                keys_lost=True,
                error=repr(exc)[:2000],
            )
            # Whatever it left half-done: as the worst case, everything may have been hit.
            try:
                self.topology.heal()
            except Exception as again:  # the topology broke: the run cannot go on
                self.outcome.notes.append(f"the topology could not be healed: {again!r}")
                self.stop_faults.set()
            record.end = time.time()
            return record

    def _now(self) -> float:
        return time.time() - self.t0

    def _running(self) -> list[str]:
        now = self._now()
        return [s.id for s in self.plan.streams if s.start <= now <= s.start + s.duration + 1.0]

    def _process_fault(self, spec: FaultSpec) -> FaultRecord:
        assert self.topology is not None
        target = spec.target
        record = FaultRecord(spec.kind, spec.lane, time.time(), procs=[target])
        if spec.kind == "kill-proc":
            child = self.children[target]
            with child.lock:
                record.incarnation = child.incarnation
                record.start = time.time()
                child.kill()
                record.outage = True
                record.detail = (
                    f"{target}.{record.incarnation} SIGKILLed, restarted {spec.hold}s later"
                )
                time.sleep(spec.hold)  # the planned downtime
                self._restart(child)
        elif spec.kind == "client-kill":
            killed, ports = client_kill(self.topology, target)
            record.nodes = ports
            record.detail = f"CLIENT KILL of {killed} subscriber connections of {target}"
        else:
            if target not in self.proxies:
                # A process that is not behind a proxy: one that is, chosen by its name.
                proxied = list(self.plan.proxied)
                target = proxied[self.plan.process_index(target) % len(proxied)]
                record.procs = [target]
            proxy = self.proxies[target]
            if spec.kind == "proxy-cut":
                proxy.cut()
                record.detail = f"the link of {target} cut"
            elif spec.kind == "proxy-stall":
                record.outage = True
                record.detail = f"the link of {target} stalled for {spec.hold}s"
                proxy.stall()
                try:
                    time.sleep(spec.hold)  # the planned stall
                finally:
                    proxy.resume()
            else:
                record.delay = spec.value
                record.detail = (
                    f"the link of {target} slowed by {spec.value}s each way for {spec.hold}s"
                )
                proxy.delay(spec.value)
                try:
                    time.sleep(spec.hold)  # the planned slow period
                finally:
                    proxy.delay(0.0)
        record.end = time.time()
        return record

    def _leaks(self) -> list[str]:
        """Keys of this run without a TTL, on every data node that is a master now."""
        assert self.topology is not None
        leaks = []
        for port in self.topology.live_ports():
            client = redis.Redis(host=HOST, port=port, socket_timeout=5, decode_responses=True)
            try:
                role = client.execute_command("ROLE")  # type: ignore[no-untyped-call]
                if str(role[0]) != "master":
                    continue
                for key in client.scan_iter(match=f"{self.plan.prefix}-*", count=1000):
                    if client.ttl(key) == -1:
                        leaks.append(f"{key} on {port}")
            except redis.RedisError as exc:
                self.outcome.notes.append(f"the leak check on {port} failed: {exc!r}")
            finally:
                client.close()
        return leaks

    # Tearing down

    def close(self) -> None:
        self.stop_faults.set()
        self.watching = False
        for child in self.children.values():
            child.kill()
        for proxy in self.proxies.values():
            proxy.close()
        if self.topology is not None:
            self.topology.stop()


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI timeout, `kill`) ends the run as Ctrl-C does: through every `finally`."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(plan: Plan, folder: Path, log: Callable[[str], None]) -> RunOutcome:
    """Run `plan` with its records under `folder`; stops everything it started."""
    orchestrator = Orchestrator(plan, folder, log)
    with _terminated_as_interrupt():
        try:
            orchestrator.setup()
            orchestrator.run()
        finally:
            orchestrator.close()
    save(orchestrator.outcome)
    return orchestrator.outcome


def save(outcome: RunOutcome) -> None:
    """What the checker needs of the orchestrator's view, next to the records."""
    data = {
        "t0": outcome.t0,
        "t_end": outcome.t_end,
        "t_stop": outcome.t_stop,
        "faults": [asdict(f) for f in outcome.faults],
        "crashes": outcome.crashes,
        "leaks": outcome.leaks,
        "not_idle": outcome.not_idle,
        "notes": outcome.notes,
    }
    (outcome.folder / "outcome.json").write_text(json.dumps(data), encoding="utf-8")


def restore(plan: Plan, folder: Path) -> RunOutcome:
    data = json.loads((folder / "outcome.json").read_text(encoding="utf-8"))
    faults = []
    for fault in data["faults"]:
        slots = fault["slots"]
        fault["slots"] = None if slots is None else [tuple(pair) for pair in slots]
        faults.append(FaultRecord(**fault))
    return RunOutcome(
        plan,
        folder,
        data["t0"],
        data["t_end"],
        data["t_stop"],
        faults,
        data["crashes"],
        data["leaks"],
        data["not_idle"],
        data["notes"],
    )
