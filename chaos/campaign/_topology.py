"""The Redis a campaign runs on, and the faults it does to it.

Each topology reuses the test suite's harness (`tests/cluster.py`): a server (with AOF
persistence, so that a restart can keep its data or, with its files removed, lose it), a
Sentinel setup (1 master, 1 replica, 3 sentinels) or the local cluster (3 masters, 3
replicas). `fault(spec)` carries out one Redis-level fault of the schedule, holds it, heals it,
waits until the servers have settled, and returns what it did (`FaultRecord`): when, on which
nodes (on a cluster, which slots), and whether it could make a node unreachable (`outage`) or
lose keys (`keys_lost`), which is what the checker needs to judge a reader's claims.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.cluster import (
    HOST,
    ClusterNode,
    HarnessError,
    LocalCluster,
    LocalSentinel,
    ServerProcess,
    wait_for,
)
from tests.machine import server_binary

from ._connect import Link
from ._plan import FaultSpec

__all__ = [
    "FaultRecord",
    "HarnessError",
    "Topology",
    "client_kill",
    "make_topology",
    "wait_for",
]

# How long a fault waits for the servers to settle after it healed.
_SETTLE = 60.0


@dataclass
class FaultRecord:
    """What one fault did. Times are wall clock (`time.time()`)."""

    kind: str
    lane: str
    start: float
    end: float = 0.0
    nodes: list[int] = field(default_factory=list)  # the ports of the nodes it hit
    slots: list[tuple[int, int]] | None = None  # a cluster's slot ranges it hit (None: all)
    procs: list[str] = field(default_factory=list)  # the processes it hit
    outage: bool = False  # a node (or a process's link) was unreachable meanwhile
    keys_lost: bool = False  # keys (of its slots) may have been lost
    detail: str = ""
    error: str = ""  # the fault could not be carried out as planned (a harness error)
    incarnation: int = -1  # kill-proc: the incarnation killed
    delay: float = 0.0  # proxy-delay: the delay added each way (s)


def _stop(node: ServerProcess) -> None:
    assert node.process is not None
    node.process.send_signal(signal.SIGSTOP)


def _cont(node: ServerProcess) -> None:
    if node.process is not None and node.process.poll() is None:
        node.process.send_signal(signal.SIGCONT)


def _admin(port: int) -> redis.Redis:
    return redis.Redis(
        host=HOST, port=port, socket_timeout=3, socket_connect_timeout=1, decode_responses=True
    )


class Topology:
    """The interface of the three topologies."""

    name = ""

    def __init__(self) -> None:
        self.binary = server_binary().path
        self._stopped: set[int] = set()  # ports of SIGSTOPped nodes
        self._lock = threading.Lock()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def nodes(self) -> list[ServerProcess]:
        """Every data node (not the sentinels)."""
        raise NotImplementedError

    def link(self, remap: dict[int, int]) -> Link:
        raise NotImplementedError

    def heal(self) -> None:
        """Back to a healthy shape: nodes running, not stopped, settled, memory unlimited."""
        raise NotImplementedError

    def fault(
        self, spec: FaultSpec, now: Callable[[], float], running: Callable[[], list[str]]
    ) -> FaultRecord:
        raise NotImplementedError

    # Shared steps

    @contextlib.contextmanager
    def _stopped_node(self, node: ServerProcess) -> Iterator[None]:
        with self._lock:
            self._stopped.add(node.port)
        _stop(node)
        try:
            yield
        finally:
            _cont(node)
            with self._lock:
                self._stopped.discard(node.port)

    def resume_all(self) -> None:
        for node in self.nodes():
            _cont(node)

    def live_ports(self) -> list[int]:
        """The data nodes that run and are not stopped (for commands of the process lane)."""
        with self._lock:
            stopped = set(self._stopped)
        return [n.port for n in self.nodes() if n.alive and n.port not in stopped]

    @staticmethod
    def _memory(
        node: ServerProcess, record: FaultRecord, kind: str, hold: float, pick: int
    ) -> None:
        """A full memory (`noeviction`: writes fail with OOM) or evictions (`volatile-random`
        with a limit a little under the memory in use: keys of ours go), for `hold` seconds."""
        client = node.client
        used = int(client.info("memory")["used_memory"])
        if kind == "oom":
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)
        else:
            before = int(client.info("stats")["evicted_keys"])
            client.config_set("maxmemory-policy", "volatile-random")
            client.config_set("maxmemory", max(1, used - 4096 - pick % 60000))
        try:
            time.sleep(hold)  # the fault's planned length
        finally:
            client.config_set("maxmemory", 0)
            client.config_set("maxmemory-policy", "noeviction")
        if kind == "evict":
            after = int(client.info("stats")["evicted_keys"])
            record.detail += f"; {after - before} keys evicted"
            record.keys_lost = after > before


class ServerTopology(Topology):
    """One server, with AOF persistence."""

    name = "server"

    def __init__(self) -> None:
        super().__init__()
        from tests.cluster import _free_ports

        self.root = Path(tempfile.mkdtemp(prefix="rs-campaign-server-"))
        (port,) = _free_ports(1)
        args = [
            *("--port", str(port), "--bind", HOST, "--dir", str(self.root)),
            *("--logfile", str(self.root / "server.log"), "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "everysec"),
        ]
        self.node = ServerProcess(self.binary, port, self.root, args)

    def start(self) -> None:
        self.node.start()

    def stop(self) -> None:
        _cont(self.node)
        self.node.stop()
        self.node.client.close()
        self.node.raw.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def nodes(self) -> list[ServerProcess]:
        return [self.node]

    def link(self, remap: dict[int, int]) -> Link:
        return Link("server", (self.node.port,), tuple(remap.items()))

    def heal(self) -> None:
        _cont(self.node)
        if not self.node.alive:
            self.node.start()
        self.node.client.config_set("maxmemory", 0)
        self.node.client.config_set("maxmemory-policy", "noeviction")

    def fault(
        self, spec: FaultSpec, now: Callable[[], float], running: Callable[[], list[str]]
    ) -> FaultRecord:
        node = self.node
        record = FaultRecord(spec.kind, spec.lane, time.time(), nodes=[node.port])
        if spec.kind == "kill":
            record.outage = True
            record.keys_lost = not spec.flag
            persistence = "with" if spec.flag else "without"
            record.detail = f"SIGKILL, down {spec.hold}s, restarted {persistence} its AOF"
            node.kill()
            time.sleep(spec.hold)  # the planned downtime
            if not spec.flag:
                shutil.rmtree(self.root / "appendonlydir", ignore_errors=True)
            node.start()
        elif spec.kind == "stall":
            record.outage = True
            record.detail = f"SIGSTOP for {spec.hold}s"
            with self._stopped_node(node):
                time.sleep(spec.hold)  # the planned stall
        else:
            record.detail = f"{spec.kind} for {spec.hold}s"
            self._memory(node, record, spec.kind, spec.hold, spec.pick)
        record.end = time.time()
        return record


class SentinelTopology(Topology):
    name = "sentinel"

    def __init__(self) -> None:
        super().__init__()
        self.setup = LocalSentinel(self.binary)

    def start(self) -> None:
        self.setup.start()

    def stop(self) -> None:
        self.resume_all()
        self.setup.stop()

    def nodes(self) -> list[ServerProcess]:
        return list(self.setup.data_nodes)

    def link(self, remap: dict[int, int]) -> Link:
        return Link(
            "sentinel",
            tuple(n.port for n in self.setup.data_nodes),
            tuple(remap.items()),
            sentinels=tuple(n.port for n in self.setup.sentinel_nodes),
            service=self.setup.service_name,
        )

    def heal(self) -> None:
        self.resume_all()
        self._reconfigure()
        for node in self.setup.data_nodes:
            node.client.config_set("maxmemory", 0)
            node.client.config_set("maxmemory-policy", "noeviction")

    def _reconfigure(self) -> None:
        """What Sentinel does to a master it no longer names (at its next INFO of it, ~10 s
        later), done now: REPLICAOF the master it names, and drop the node's clients (normal
        and pub/sub), in one transaction, as Sentinel sends them. Then wait until all agree.

        (The harness's `reset()` sends REPLICAOF alone: clients stay connected to a replica,
        which no Sentinel deployment does.)"""
        setup = self.setup
        for node in setup.data_nodes + setup.sentinel_nodes:
            if not node.alive:
                node.start()
        try:
            master = wait_for(self._agreed_master, 20.0, "the sentinels agree", setup.describe)
        except HarnessError:
            # The sentinels name a node that is no master (a demotion raced with their own
            # failover and left the two data nodes replicas of each other): make it one.
            named = setup.master()
            named.client.replicaof("NO", "ONE")
            master = wait_for(self._agreed_master, _SETTLE, "the sentinels agree", setup.describe)
        for node in setup.data_nodes:
            if node is not master and node.role() == "master":
                pipe = node.client.pipeline(transaction=True)
                pipe.replicaof(HOST, master.port)
                pipe.client_kill_filter(_type="normal", skipme=True)
                pipe.client_kill_filter(_type="pubsub", skipme=True)
                pipe.execute()
        setup.settle(_SETTLE)

    def _agreed_master(self) -> ServerProcess | None:
        """The master every sentinel names, with no failover under way (flags `master` and
        nothing else), if it is one (ROLE)."""
        setup = self.setup
        infos = [setup._master_info(sentinel) for sentinel in setup.sentinel_nodes]
        ports = {int(info["port"]) for info in infos}
        if len(ports) != 1 or any(info["flags"] != "master" for info in infos):
            return None
        (port,) = ports
        node = next(n for n in setup.data_nodes if n.port == port)
        return node if node.alive and node.role() == "master" else None

    def fault(
        self, spec: FaultSpec, now: Callable[[], float], running: Callable[[], list[str]]
    ) -> FaultRecord:
        setup = self.setup
        master = setup.master()
        record = FaultRecord(
            spec.kind, spec.lane, time.time(), nodes=[n.port for n in setup.data_nodes]
        )
        if spec.kind == "kill-master":
            record.outage = record.keys_lost = True
            record.detail = f"master {master.port} SIGKILLed, restarted {spec.hold}s later, empty"
            master.kill()
            time.sleep(spec.hold)  # the planned downtime
            master.start()
            self._reconfigure()
        elif spec.kind == "kill-replica":
            replica = next(n for n in setup.data_nodes if n is not master)
            record.detail = f"replica {replica.port} SIGKILLed, restarted {spec.hold}s later"
            replica.kill()
            time.sleep(spec.hold)  # the planned downtime
            replica.start()
            self._reconfigure()
        elif spec.kind == "failover":
            # The old master takes writes until Sentinel turns it into a replica: lost ones.
            record.outage = record.keys_lost = True
            new = setup.failover(_SETTLE)
            record.detail = f"SENTINEL FAILOVER {master.port} -> {new}"
            if spec.flag:
                self._reconfigure()  # end the two-masters window at once
                record.detail += ", the old master reconfigured at once"
            else:
                setup.settle(_SETTLE)
                record.detail += ", the old master reconfigured by Sentinel"
        elif spec.kind == "stall":
            record.outage = True
            record.keys_lost = spec.flag
            record.detail = f"master {master.port} SIGSTOPped for {spec.hold}s"
            with self._stopped_node(master):
                time.sleep(spec.hold)  # the planned stall
            self._reconfigure()
        else:
            record.detail = f"{spec.kind} on master {master.port} for {spec.hold}s"
            self._memory(master, record, spec.kind, spec.hold, spec.pick)
        record.end = time.time()
        return record


def _ranges(cluster: LocalCluster, master: ClusterNode) -> list[tuple[int, int]]:
    return [(a, b) for a, b, owner in cluster._view(master).owners if owner == master.node_id]


class ClusterTopology(Topology):
    name = "cluster"

    def __init__(self) -> None:
        super().__init__()
        self.cluster = LocalCluster(self.binary)

    def start(self) -> None:
        self.cluster.start()

    def stop(self) -> None:
        self.resume_all()
        self.cluster.stop()

    def nodes(self) -> list[ServerProcess]:
        return list(self.cluster.nodes)

    def link(self, remap: dict[int, int]) -> Link:
        return Link("cluster", tuple(n.port for n in self.cluster.nodes), tuple(remap.items()))

    def heal(self) -> None:
        self.resume_all()
        for node in self.cluster.nodes:
            if not node.alive:
                node.start()
        self.cluster.reset(_SETTLE)
        for node in self.cluster.nodes:
            node.client.config_set("maxmemory", 0)
            node.client.config_set("maxmemory-policy", "noeviction")

    def fault(
        self, spec: FaultSpec, now: Callable[[], float], running: Callable[[], list[str]]
    ) -> FaultRecord:
        cluster = self.cluster
        masters = sorted(cluster.masters(), key=lambda n: n.port)
        master = masters[spec.pick % len(masters)]
        slots = _ranges(cluster, master)
        record = FaultRecord(spec.kind, spec.lane, time.time(), nodes=[master.port], slots=slots)
        if spec.kind == "failover":
            (replica, *_) = cluster.replicas_of(master)
            record.nodes.append(replica.port)
            record.detail = f"CLUSTER FAILOVER of {master.port} to {replica.port}"
            cluster.failover(replica, _SETTLE)
        elif spec.kind == "kill-master":
            record.outage = record.keys_lost = True
            replicas = cluster.replicas_of(master)
            record.nodes += [r.port for r in replicas]
            cluster.kill(master)
            promoted = cluster.wait_for_promotion(_SETTLE)
            record.detail = (
                f"master {master.port} SIGKILLed, {promoted.port} promoted, restarted "
                f"{spec.hold}s later"
            )
            time.sleep(spec.hold)  # the planned downtime, after the promotion
            cluster.restart(master, _SETTLE)
        elif spec.kind == "kill-replica":
            replicas = sorted(cluster.replicas(), key=lambda n: n.port)
            replica = replicas[spec.pick % len(replicas)]
            record.nodes, record.slots = [replica.port], []
            record.detail = f"replica {replica.port} SIGKILLed, restarted {spec.hold}s later"
            replica.kill()
            time.sleep(spec.hold)  # the planned downtime
            cluster.restart(replica, _SETTLE)
        elif spec.kind == "migrate":
            from redis.crc import key_slot

            streams = running()
            if streams:
                stream = streams[spec.pick % len(streams)]
                slot = key_slot(f"{{{stream}}}".encode())
            else:
                stream, slot = "", spec.pick % 16384
            source = cluster.master_of_slot(slot)
            others = [m for m in masters if m is not source]
            destination = others[spec.pick % len(others)]
            record.nodes, record.slots = [source.port, destination.port], [(slot, slot)]
            record.detail = (
                f"slot {slot} ({'stream ' + stream if stream else 'no stream running'}) "
                f"migrated from {source.port} to {destination.port}"
            )
            cluster.migrate_slot(slot, destination, _SETTLE)
        elif spec.kind == "stall":
            record.outage = True
            record.keys_lost = spec.flag
            record.detail = f"master {master.port} SIGSTOPped for {spec.hold}s"
            with self._stopped_node(master):
                time.sleep(spec.hold)  # the planned stall
            cluster.wait_settled(_SETTLE, "the cluster settles after a stall")
        else:
            record.detail = f"{spec.kind} on master {master.port} for {spec.hold}s"
            self._memory(master, record, spec.kind, spec.hold, spec.pick)
        record.end = time.time()
        return record


def make_topology(name: str) -> Topology:
    if name == "server":
        return ServerTopology()
    if name == "sentinel":
        return SentinelTopology()
    if name == "cluster":
        return ClusterTopology()
    raise ValueError(f"unknown topology {name!r}")


def client_kill(topology: Topology, process: str) -> tuple[int, list[int]]:
    """`CLIENT KILL` every subscriber connection of `process` (named `campaign-<process>`) on
    every data node that answers; (how many, on which ports)."""
    from ._connect import client_name

    name = client_name(process)
    killed, ports = 0, []
    for port in topology.live_ports():
        client = _admin(port)
        try:
            for entry in client.client_list():
                flags = str(entry.get("flags", ""))
                if entry.get("name") == name and "P" in flags:
                    client.execute_command("CLIENT", "KILL", "ID", entry["id"])  # type: ignore[no-untyped-call]
                    killed += 1
                    ports.append(port)
        except (redis.RedisError, OSError):
            pass  # a node that is restarting or stopped: nothing of ours to kill there
        finally:
            client.close()
    return killed, ports
