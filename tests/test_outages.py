"""Redis outages: a real redis-server killed and restarted, and fakeredis's connection switch."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio

import resumable_stream as rs
from resumable_stream.redis import RedisBackend

from .conftest import start_redis_server
from .helpers import TestingSource, read

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_redis_killed_mid_stream_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    server = start_redis_server()
    port = server.port
    assert port is not None
    try:
        options = {"key_prefix": "outage", "liveness_timeout": 1.0, "resume_timeout": 0.5}
        async with (
            rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as P,  # type: ignore[arg-type]
            rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as C,  # type: ignore[arg-type]
        ):
            source = TestingSource()
            own = await P.resumable_stream("s", source.make)
            follower = await C.resume_existing_stream("s")
            source.write("before ")
            assert await read(follower, 1) == "before "

            server.stop()  # Redis dies mid-stream
            source.write("during ")
            # The producer's own reader carries on; the follower ends with a clear error.
            assert await read(own, 2) == "before during "
            with anyio.fail_after(10), pytest.raises(rs.BackendError):
                await read(follower)

            # A stream started while Redis is down still works, non-resumable, with a warning.
            caplog.clear()
            with caplog.at_level(logging.WARNING, "resumable_stream"):
                offline = TestingSource()
                alone = await C.resumable_stream("offline", offline.make)
                offline.write("still works")
                offline.close()
                assert await read(alone) == "still works"
            assert "runs without resumability" in caplog.text

            server = start_redis_server(port)  # back, on the same port
            source.write("after")
            source.close()
            assert await read(own) == "after"

            # New streams work again without restarting anything, resumable across workers.
            fresh = TestingSource()
            with anyio.fail_after(15):
                while True:
                    try:
                        stream = await P.resumable_stream("fresh", fresh.make)
                    except rs.BackendError:
                        await anyio.sleep(0.05)  # the reconnect is in progress
                        continue
                    break
            fresh.write("resumable ")
            with anyio.fail_after(15):
                while True:  # the subscriber reconnects with backoff, then re-subscribes
                    try:
                        again = await C.resume_existing_stream("fresh")
                        break
                    except rs.ResumableStreamError:
                        await anyio.sleep(0.05)
            fresh.write("again")
            fresh.close()
            assert await read(stream) == "resumable again"
            assert await read(again) == "resumable again"
    finally:
        server.stop()


async def test_raise_instead_of_degrading_when_asked() -> None:
    from fakeredis import FakeAsyncRedis, FakeServer

    server = FakeServer()
    backend = RedisBackend(FakeAsyncRedis(server=server))
    async with rs.ResumableStreamContext(backend=backend, on_backend_error="raise") as ctx:
        server.connected = False
        with pytest.raises(rs.BackendError):
            await ctx.resumable_stream("s", TestingSource().make)
        server.connected = True


async def test_fakeredis_connection_switch_degrades_then_recovers() -> None:
    from fakeredis import FakeAsyncRedis, FakeServer

    server = FakeServer()
    backend = RedisBackend(FakeAsyncRedis(server=server))

    async def words() -> AsyncIterator[str]:
        yield "a"
        yield "b"

    async with rs.ResumableStreamContext(backend=backend) as ctx:
        server.connected = False
        assert await read(await ctx.resumable_stream("down", words)) == "ab"
        server.connected = True
        # It never won the election, so the id stays free for a real stream.
        assert await ctx.has_existing_stream("down") is None
        assert await read(await ctx.resumable_stream("up", words)) == "ab"
        assert await ctx.has_existing_stream("up") == "DONE"


async def test_a_resume_during_a_subscriber_blip_waits_for_the_reconnection() -> None:
    """Redis drops a subscriber now and then (a reply over `client-output-buffer-limit
    pubsub`, `CLIENT KILL`, a failover): it is connected again within one backoff (50 ms). A
    resume that subscribes in that window is subscribed by the reconnection, not failed
    with "the subscriber connection is down" (a 503 for a blip)."""
    server = start_redis_server()
    admin = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    try:
        async with rs.create_resumable_stream_context(server.url, key_prefix="blip") as producer:
            source = TestingSource()
            own = await producer.resumable_stream("s", source.make)
            source.write("before ")
            before = {int(c["id"]) for c in await admin.client_list() if int(c["sub"]) > 0}
            async with rs.create_resumable_stream_context(
                server.url, key_prefix="blip"
            ) as follower:
                (subscriber,) = {
                    int(c["id"]) for c in await admin.client_list() if int(c["sub"]) > 0
                } - before
                await admin.client_kill_filter(_id=str(subscriber))
                with anyio.fail_after(5):
                    # No event tells a drop (it is found by a failed read): one loop turn at a
                    # time until the reader found it, so the resume comes within the backoff.
                    while follower.stats().backend_connected:
                        await anyio.lowlevel.checkpoint()
                    tail = await follower.resume_existing_stream("s", resume_at=0)
                    assert tail is not None
                    assert await read(tail, 1) == "before "
                    source.write("after")
                    source.close()
                    assert await read(tail) == "after"
                    assert await read(own) == "before after"
    finally:
        await admin.aclose()
        server.stop()
