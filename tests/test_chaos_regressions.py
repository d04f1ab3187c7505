"""The defects a randomized fault campaign found (issue 22), each replayed on a real Redis.

Every reader gets `text[offset:]` exactly, or an exact prefix of it and then a typed
`ResumableStreamError`; what failed was how readers were told the end:

1. a finished stream's tail answered "nothing to resume" while its producer, lingering with the
   text, was subscribing again (a killed connection) or the follower's link was slow;
2. a live producer declared dead by a follower on a slow link;
3. an untyped error of one of redis-py's connections that ended the whole context;
4. an `ExceptionGroup` out of a durable resume whose two side-by-side reads both failed;
5. an HTTP 500 for a durable stream whose stored text was lost.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio
from redis.asyncio.connection import Connection as RedisConnection

import resumable_stream as rs
from resumable_stream._protocol import Keys
from resumable_stream.asgi import EventStreamApp
from resumable_stream.redis import RedisBackend

from .conftest import RedisServer, start_redis_server
from .helpers import TestingSource, poll_until, read
from .tcp_proxy import TcpProxy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = start_redis_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    yield client
    await client.aclose()


async def hello_world() -> AsyncIterator[str]:
    yield "hello"
    yield " world"


async def subscriber_ids(admin: redis.asyncio.Redis) -> set[int]:
    return {int(c["id"]) for c in await admin.client_list() if int(c.get("sub", 0)) > 0}


# 1. A finished stream's tail, while its lingering producer subscribes again


async def test_a_lingering_tail_survives_the_producers_subscriber_reconnecting(
    server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    options: dict[str, Any] = dict(key_prefix="defect-1", linger=30.0)
    async with rs.create_resumable_stream_context(server.url, **options) as producer:
        producers_subscriber = await subscriber_ids(admin)
        async with rs.create_resumable_stream_context(server.url, **options) as follower:
            own = await producer.resumable_stream("finished", hello_world)
            assert await read(own) == "hello world"
            for client_id in producers_subscriber:  # the producer's subscriber only
                await admin.client_kill_filter(_id=str(client_id))
            # Its request reaches nobody until the producer is subscribed again: that is
            # not "no longer lingering" (it was None, "nothing to resume": a 204 over SSE).
            with anyio.fail_after(10):
                tail = await follower.resume_existing_stream("finished", resume_at=5)
                assert await read(tail) == " world"


# 1 and 2. A follower whose link to Redis is slower than `resume_timeout`

SLOW: dict[str, Any] = dict(linger=30.0, resume_timeout=0.5)


async def test_a_slow_link_is_not_nothing_to_resume(server: RedisServer) -> None:
    with TcpProxy(server.port or 0) as proxy:
        slow_url = f"redis://127.0.0.1:{proxy.port}/0"
        async with (
            rs.create_resumable_stream_context(server.url, key_prefix="defect-1b", **SLOW) as p,
            rs.create_resumable_stream_context(slow_url, key_prefix="defect-1b", **SLOW) as f,
        ):
            own = await p.resumable_stream("finished", hello_world)
            assert await read(own) == "hello world"
            proxy.delay(0.3)  # a round trip of 0.6 s, over `resume_timeout`
            with anyio.fail_after(20):
                # A request that has not got there yet is not a request that reached nobody.
                tail = await f.resume_existing_stream("finished", resume_at=5)
                assert await read(tail) == " world"


async def test_a_slow_link_does_not_declare_a_live_producer_dead(
    server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    with TcpProxy(server.port or 0) as proxy:
        slow_url = f"redis://127.0.0.1:{proxy.port}/0"
        async with (
            rs.create_resumable_stream_context(server.url, key_prefix="defect-2", **SLOW) as p,
            rs.create_resumable_stream_context(slow_url, key_prefix="defect-2", **SLOW) as f,
        ):
            source = TestingSource()
            running = await p.resumable_stream("running", source.make)
            source.write("start ")
            proxy.delay(0.3)
            with anyio.fail_after(20):
                try:
                    live = await f.resume_existing_stream("running", resume_at=0)
                except rs.ProducerLostError:
                    pytest.fail("a live producer was declared dead")
                except rs.ProducerUnavailableError:
                    live = None  # no answer in time: within the model ("try again")
                assert await admin.get(Keys("defect-2").sentinel("running")) != "LOST"
                proxy.delay(0)
                source.write("end")
                source.close()
                assert await read(running) == "start end"
                if live is not None:
                    assert await read(live) == "start end"
            assert await admin.get(Keys("defect-2").sentinel("running")) == "DONE"


# 3. No untyped error of a connection ends the context


class _Pool(redis.asyncio.ConnectionPool):
    """Marks the connections it makes: the subscriber's own connection is not one of them."""

    def make_connection(self) -> Any:
        connection = super().make_connection()
        connection.pooled = True
        return connection


class _FailingOnce(RedisConnection):
    """A connection whose first read after arming fails the way redis-py's pub/sub connection
    failed when read from two places at once: with a `RuntimeError`, not a `RedisError` (and
    dropped first, as redis-py drops a connection whose read raised anything)."""

    armed: str | None = None  # "subscriber" or "commands": which connection fails
    pooled = False

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if _FailingOnce.armed == ("commands" if self.pooled else "subscriber"):
            _FailingOnce.armed = None
            await self.disconnect(nowait=True)
            raise RuntimeError(
                "readuntil() called while another coroutine is already waiting for incoming data"
            )
        return await super().read_response(*args, **kwargs)


@pytest.mark.parametrize("connection", ["subscriber", "commands"])
async def test_an_untyped_error_of_a_connection_does_not_end_the_context(
    server: RedisServer, caplog: pytest.LogCaptureFixture, connection: str
) -> None:
    pool = _Pool(connection_class=_FailingOnce, port=server.port or 0)
    client = redis.asyncio.Redis(connection_pool=pool)
    other = rs.create_resumable_stream_context(server.url, key_prefix="defect-3")
    try:
        async with (
            rs.ResumableStreamContext(backend=RedisBackend(client), key_prefix="defect-3") as ctx,
            other,
        ):
            source = TestingSource()
            own = await ctx.resumable_stream("s", source.make)
            source.write("before ")
            with caplog.at_level(logging.WARNING, logger="resumable_stream"):
                _FailingOnce.armed = connection
                # Something for either connection to read: a follower's request comes in on
                # the subscriber, and the producer's answer goes out on a pooled connection.
                follower = await other.resume_existing_stream("s", resume_at=0)
                assert await read(follower, 1) == "before "
                assert _FailingOnce.armed is None  # it failed

                if connection == "subscriber":

                    async def reconnects() -> int:
                        return ctx.stats().reconnects

                    await poll_until(reconnects, 1, timeout=10)
            source.write("after")
            source.close()
            assert await read(own) == "before after"
            assert await read(follower) == "after"
            assert ctx.stats().backend_connected
            if connection == "subscriber":
                assert ctx.stats().reconnects == 1
                assert any("restored" in r.getMessage() for r in caplog.records)
    finally:
        _FailingOnce.armed = None
        await client.aclose()
        await pool.disconnect()  # a pool passed in is not the client's to close


# 4. Reads run side by side fail as one typed error


async def test_a_durable_resume_whose_reads_both_fail_raises_one_backend_error(
    server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    # A user who may elect and subscribe but not read: the state read and the log read of a
    # durable resume, sent side by side, are both refused in one round trip.
    await admin.acl_setuser(
        "noreads",
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-get", "-xrevrange", "-xrange"],
    )
    options: dict[str, Any] = dict(key_prefix="defect-4", durable=True)
    url = f"redis://noreads:secret@127.0.0.1:{server.port}/0"
    async with (
        rs.create_resumable_stream_context(server.url, **options) as producer,
        rs.create_resumable_stream_context(url, **options) as reader,
    ):
        source = TestingSource()
        own = await producer.resumable_stream("s", source.make)
        source.write("text")
        with pytest.raises(rs.BackendError) as raised:  # not a group of two
            await reader.resumable_stream("s", lambda: source.make(), resume_at=0)
        assert "no permissions" in str(raised.value)
        if sys.version_info >= (3, 11):  # the other failure is noted on the one raised
            assert any("no permissions" in note for note in raised.value.__notes__)
        source.close()
        assert await read(own) == "text"


# 5. A lost durable text is an error frame over HTTP, not a 500


async def test_a_lost_durable_text_is_an_incomplete_error_frame(
    server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    options: dict[str, Any] = dict(key_prefix="defect-5", durable=True, linger=0.1)
    async with rs.create_resumable_stream_context(server.url, **options) as producer:
        own = await producer.resumable_stream("lost", hello_world)
        assert await read(own) == "hello world"
    # What a restart without persistence or a failover that lost writes does.
    await admin.delete(Keys("defect-5").text("lost"))
    async with rs.create_resumable_stream_context(server.url, **options) as ctx:
        with pytest.raises(rs.StreamIncompleteError):
            await ctx.resume_existing_stream("lost", resume_at=3)
        sse = await get(EventStreamApp(ctx), "/lost", {"Last-Event-ID": "3"})
        raw = await get(EventStreamApp(ctx, raw=True), "/lost?resumeAt=3", {})
    assert sse.status_code == 200
    assert sse.text.startswith("event: error\nid: end\n")
    assert '"code": "incomplete"' in sse.text
    assert raw.status_code == 410  # a raw reader of a stream that ended badly


async def get(app: Any, path: str, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # an exception in the app fails the test
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.get(path, headers=headers)
