"""Redis outages: a real redis-server killed and restarted, and fakeredis's connection switch."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import pytest

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
