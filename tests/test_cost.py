"""The cost model, checked deterministically against a real redis-server (INFO commandstats)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
import redis.asyncio

import resumable_stream as rs
from resumable_stream._protocol import Keys
from resumable_stream.redis import RedisBackend

from .conftest import RedisServer
from .helpers import TestingSource, never_called, poll_until, read, read_chunks

pytestmark = pytest.mark.anyio

# CONFIG GET: once per context, to warn about an evicting policy.
_ADMIN = {
    *("info", "client|info", "client|setinfo", "hello", "ping", "pubsub|numsub", "select"),
    "config|get",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def commandstats(client: redis.asyncio.Redis) -> Counter[str]:
    info = await client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): stats["calls"] for name, stats in info.items()})


class Meter:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.before: Counter[str] = Counter()

    async def __aenter__(self) -> Meter:
        self.before = await commandstats(self.client)
        return self

    async def __aexit__(self, *exc: object) -> None:
        after = await commandstats(self.client)
        self.delta = Counter({k: v for k, v in (after - self.before).items() if k not in _ADMIN})


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def contexts(
    url: str, **options: Any
) -> tuple[rs.ResumableStreamContext, rs.ResumableStreamContext]:
    # Without lingering, the producer unsubscribes before its reader ends, so counts are exact.
    options.setdefault("linger", 0)
    prefix = f"cost-{uuid.uuid4().hex}"
    return (
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix, **options),
        rs.ResumableStreamContext(backend=RedisBackend(url), key_prefix=prefix, **options),
    )


async def chunks(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield f"chunk {i};"


@pytest.mark.parametrize("n_chunks", [3, 1000])
async def test_uncontended_stream_costs_six_commands_and_none_per_chunk(
    redis_server: RedisServer, admin: redis.asyncio.Redis, n_chunks: int
) -> None:
    P, _ = contexts(redis_server.url)
    async with P, Meter(admin) as meter:
        stream = await P.resumable_stream("s", lambda: chunks(n_chunks))
        assert len(await read_chunks(stream)) == n_chunks
    # The PUBLISH announces the start, for readers that wait (`wait=`); nobody awaits it.
    assert meter.delta == {
        **{"incr": 1, "expire": 1, "subscribe": 1, "publish": 1},
        **{"set": 1, "unsubscribe": 1},
    }


async def test_explicit_api_costs_five_commands(
    redis_server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    P, _ = contexts(redis_server.url)
    async with P, Meter(admin) as meter:
        stream = await P.create_new_resumable_stream("s", lambda: chunks(100))
        assert len(await read_chunks(stream)) == 100
    assert meter.delta == {"subscribe": 1, "publish": 1, "set": 2, "unsubscribe": 1}


@pytest.mark.parametrize("n_followers", [1, 20])
async def test_one_publish_per_live_chunk_whatever_the_number_of_followers(
    redis_server: RedisServer, admin: redis.asyncio.Redis, n_followers: int
) -> None:
    live_chunks = 50
    P, C = contexts(redis_server.url)
    async with P, C:
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        source.write("buffered;")
        assert await read(own, 1) == "buffered;"
        async with Meter(admin) as meter:
            followers = [await C.resumable_stream("s", never_called) for _ in range(n_followers)]
            for f in followers:
                assert await read(f, 1) == "buffered;"
            for i in range(live_chunks):
                # Lock-step, so that no batching hides a second publish of the same chunk.
                source.write(f"{i};")
                assert await read(followers[0], 1) == f"{i};"
            source.close()
            for f in followers[1:]:
                assert len(await read_chunks(f)) == live_chunks
            assert await read(followers[0]) == ""
            assert len(await read_chunks(own)) == live_chunks
    # Per follower: INCR + EXPIRE, a request and its replay; per context: one subscription to
    # the live channel; per live chunk: one PUBLISH; at the end: one PUBLISH and one SET.
    assert meter.delta == {
        "incr": n_followers,
        "expire": n_followers,
        "subscribe": 1,
        "unsubscribe": 2,
        "publish": 2 * n_followers + live_chunks + 1,
        "set": 1,
    }


async def test_a_resume_on_the_producers_process_costs_no_command(
    redis_server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    P, _ = contexts(redis_server.url)
    async with P:
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        source.write("abc")
        assert await read(own, 1) == "abc"
        async with Meter(admin) as meter:
            # Served from the producer's buffer: no INCR, GET, SUBSCRIBE or PUBLISH.
            readers = [
                await P.resumable_stream("s", never_called),
                await P.resume_existing_stream("s"),
                await P.resume_existing_stream("s", resume_at=1),
                await P.resumable_stream("s", never_called, resume_at=2),
            ]
            assert [await read(r, 1) for r in readers] == ["abc", "abc", "bc", "c"]
            source.write("def")
            assert [await read(r, 1) for r in readers] == ["def"] * 4
        source.close()
        assert [await read(r) for r in [own, *readers]] == ["def", "", "", "", ""]
    assert meter.delta == {}


async def test_replies_come_to_one_inbox_per_context(
    redis_server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    """On a server (not a cluster), producers answer a context's followers on the context's
    inbox, subscribed once for its life: a resume subscribes to its stream's live channel only."""
    prefix = f"cost-{uuid.uuid4().hex}"
    keys = Keys(prefix)
    P, C = (
        rs.ResumableStreamContext(
            backend=RedisBackend(redis_server.url), key_prefix=prefix, linger=0
        )
        for _ in range(2)
    )

    async def channels() -> list[str]:
        names = await admin.pubsub_channels(f"{prefix}:*")
        return sorted(c.decode() if isinstance(c, bytes) else c for c in names)

    async with P, C:
        inboxes = await channels()
        assert [c.split(":")[-2] for c in inboxes] == ["inbox", "inbox"]
        sources = [TestingSource() for _ in range(3)]
        owns = [await P.resumable_stream(f"s{i}", s.make) for i, s in enumerate(sources)]
        for source in sources:
            source.write("a")
        requests = [keys.request(f"s{i}") for i in range(3)]
        await poll_until(channels, sorted(inboxes + requests))  # the producers listen
        async with Meter(admin) as meter:
            followers = [await C.resumable_stream(f"s{i}", never_called) for i in range(3)]
            assert [await read(f, 1) for f in followers] == ["a"] * 3
        assert meter.delta["subscribe"] == 3, meter.delta
        lives = [keys.live(f"s{i}") for i in range(3)]
        assert await channels() == sorted(inboxes + requests + lives)
        for source in sources:
            source.close()
        assert [await read(r) for r in [*owns, *followers]] == ["a"] * 3 + [""] * 3
        # Unsubscribing is not awaited by the readers: the last UNSUBSCRIBE may be on its way.
        await poll_until(channels, inboxes)
    assert await channels() == []


@contextmanager
def tasks_started() -> Iterator[list[asyncio.Task[Any]]]:
    """The tasks the running loop starts meanwhile, but redis-py 8's returns of a pipeline's
    connection to its pool (a task of its own, shielded from cancellation: bookkeeping, off the
    path of the answer)."""
    loop = asyncio.get_running_loop()
    started: list[asyncio.Task[Any]] = []
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        if getattr(coro, "__qualname__", "") != "ConnectionPool.release":
            started.append(task)
        return task

    loop.set_task_factory(factory)
    try:
        yield started
    finally:
        loop.set_task_factory(previous)


async def test_a_redis_command_starts_no_task(redis_server: RedisServer) -> None:
    """A backend made from a URL leaves the deadline of each command to `command_timeout`: with
    a socket timeout, redis-py (on Python 3.11 and older) starts a task for every write, two
    more loop turns on every command of a resume."""
    P, C = contexts(redis_server.url)
    async with P, C:
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        source.write("a")
        assert await read(own, 1) == "a"
        with tasks_started() as started:
            for _ in range(5):
                assert await C.has_existing_stream("s") is True
        assert started == []
        with tasks_started() as started:
            follower = await C.resumable_stream("s", never_called)  # INCR, SUBSCRIBE, PUBLISH
            assert await read(follower, 1) == "a"
        # The producer's helpers only: one answers the request, one publishes what comes next.
        names = sorted(task.get_name().rpartition(".")[2] for task in started)
        assert names == ["_contained", "_contained"], started
        source.close()
        assert [await read(r) for r in (own, follower)] == ["", ""]


async def test_nothing_is_published_while_nobody_follows(
    redis_server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    P, C = contexts(redis_server.url)
    async with P, C:
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        follower = await C.resumable_stream("s", never_called)
        assert follower is not None
        source.write("a")
        assert await read(follower, 1) == "a"
        await follower.aclose()
        source.write("b")  # published once more: the publish that finds nobody listening
        assert await read(own, 2) == "ab"
        async with Meter(admin) as meter:
            for i in range(100):
                source.write(f"{i}")
                await read(own, 1)
            with anyio.fail_after(5):
                source.close()
                await read(own)
    # At most the one publish of "b" still in flight when measuring started; none per chunk.
    assert meter.delta.pop("publish", 0) <= 1
    assert meter.delta == {"set": 1, "unsubscribe": 1}


async def test_one_round_trip_before_the_generator_starts() -> None:
    """Only INCR (pipelined with EXPIRE) is awaited before make_stream runs; SUBSCRIBE is sent
    without waiting for its confirmation, and the start's notice without waiting at all."""
    calls: list[str] = []
    seen_at_start: list[str] = []

    class Recording:
        def __init__(self, backend: rs.MemoryBackend) -> None:
            self.backend = backend

        def connect(self, on_message, on_reconnect=None):
            return _recording(self.backend, on_message, calls)

    async def source() -> AsyncIterator[str]:
        seen_at_start.extend(calls)
        yield "x"

    ctx = rs.ResumableStreamContext(backend=Recording(rs.MemoryBackend()))
    async with ctx:
        calls.clear()
        assert await read(await ctx.resumable_stream("s", source)) == "x"
    assert seen_at_start == ["incr", "subscribe(wait=False)", "notify(not awaited)"]


def _recording(backend: rs.MemoryBackend, on_message, calls: list[str]):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def connect():
        async with backend.connect(on_message) as inner:

            class Proxy:
                def __getattr__(self, name: str):
                    method = getattr(inner, name)
                    if name == "notify":  # sent, never awaited

                        def send(*args, **kwargs):
                            calls.append(name + "(not awaited)")
                            return method(*args, **kwargs)

                        return send

                    async def call(*args, **kwargs):
                        suffix = "(wait=False)" if kwargs.get("wait") is False else ""
                        calls.append(name + suffix)
                        return await method(*args, **kwargs)

                    return call

            yield Proxy()

    return connect()


async def test_two_connections_per_context_whatever_the_number_of_streams(
    redis_server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    newest_before = await admin.client_id()  # ids grow: older, closing connections are ignored
    P, C = contexts(redis_server.url)
    async with P, C:
        sources = [TestingSource() for _ in range(50)]
        owns = [await P.resumable_stream(f"s{i}", s.make) for i, s in enumerate(sources)]
        for source in sources:
            source.write("x")
        followers = [await C.resumable_stream(f"s{i}", never_called) for i in range(50)]
        clients = [c for c in await admin.client_list() if int(c["id"]) > newest_before]
        for source in sources:
            source.close()
        for stream in [*owns, *followers]:
            assert await read(stream) == "x"
    assert len(clients) == 4  # one command and one pub/sub connection for each of P and C
