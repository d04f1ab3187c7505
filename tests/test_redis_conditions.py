"""A real redis-server in the states people run it in: full, evicting, stalled, restarted.

Each test starts its own server, since each changes the server's configuration or kills it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import redis.asyncio

import resumable_stream as rs
from resumable_stream._protocol import Keys
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
    client = redis.asyncio.Redis.from_url(server.url)
    yield client
    await client.aclose()


async def words() -> AsyncIterator[str]:
    yield "all "
    yield "the words"


# A full Redis (maxmemory with noeviction) refuses writes with an OOM error reply.


@pytest.mark.parametrize("mode", ["degrade", "raise"])
async def test_a_full_redis_is_a_backend_error_never_a_finished_stream(
    server: RedisServer,
    admin: redis.asyncio.Redis,
    mode: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await admin.config_set("maxmemory-policy", "noeviction")
    async with rs.ResumableStreamContext(
        backend=RedisBackend(server.url), on_backend_error=mode
    ) as ctx:
        await admin.config_set("maxmemory", 1)  # already over it: every write is refused
        with caplog.at_level(logging.WARNING, "resumable_stream"):
            if mode == "raise":
                with pytest.raises(rs.BackendError, match="maxmemory"):
                    await ctx.resumable_stream("new", words)
            else:
                # It runs for its caller, not resumable, and says why.
                assert await read(await ctx.resumable_stream("new", words)) == "all the words"
                assert "runs without resumability" in caplog.text
                assert "maxmemory" in caplog.text
        # The other writes the library interprets fail the same way.
        with pytest.raises(rs.BackendError, match="maxmemory"):
            await ctx.create_new_resumable_stream("other", words)
        with pytest.raises(rs.BackendError, match="maxmemory"):
            await ctx.cancel_stream("unknown")
        await admin.config_set("maxmemory", 0)
        # Nothing was recorded as finished: the id is free for the stream once Redis has room.
        assert await ctx.has_existing_stream("new") is None
        assert await read(await ctx.resumable_stream("new", words)) == "all the words"


async def test_a_key_of_another_type_is_a_backend_error(
    server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    ctx = rs.ResumableStreamContext(
        backend=RedisBackend(server.url), key_prefix="x", on_backend_error="raise"
    )
    async with ctx:
        # Somebody else's list where our sentinel should be: WRONGTYPE, not "finished".
        await admin.execute_command("RPUSH", Keys("x").sentinel("s"), "not ours")
        with pytest.raises(rs.BackendError, match="WRONGTYPE"):
            await ctx.resume_existing_stream("s")
        with pytest.raises(rs.BackendError):
            await ctx.resumable_stream("s", words)


# A stalled network: the server stops answering but keeps the connections open.


@pytest.mark.parametrize("mode", ["degrade", "raise"])
async def test_a_stalled_redis_fails_commands_within_the_command_timeout(
    server: RedisServer, mode: Any
) -> None:
    assert server.port is not None
    with TcpProxy(server.port) as proxy:
        # socket_timeout=None: redis-py's default in versions 5 and 6, no deadline of its own.
        client = redis.asyncio.Redis(port=proxy.port, socket_timeout=None)
        backend = RedisBackend(client, command_timeout=0.5)
        try:
            async with rs.ResumableStreamContext(backend=backend, on_backend_error=mode) as ctx:
                proxy.stall()
                with anyio.fail_after(2):
                    if mode == "raise":
                        with pytest.raises(rs.BackendError, match="command_timeout"):
                            await ctx.resumable_stream("s", words)
                    else:
                        stream = await ctx.resumable_stream("s", words)
                        assert await read(stream) == "all the words"
                with anyio.fail_after(2), pytest.raises(rs.BackendError):
                    await ctx.has_existing_stream("s")
                proxy.resume()
                # The stalled connection was dropped; the next commands use a fresh one. (The
                # INCR sent into the stall may still reach Redis once it ends: a network that
                # held bytes delivers them late, so "s" may be taken now.)
                with anyio.fail_after(5):
                    assert await ctx.has_existing_stream("s") in (None, True)
                    stream = await ctx.resumable_stream("s2", words)
                    assert await read(stream) == "all the words"
                proxy.stall()  # leaving the context is bounded too
        finally:
            proxy.resume()
            await client.aclose()


async def test_followers_learn_of_a_stalled_redis_instead_of_hanging(server: RedisServer) -> None:
    assert server.port is not None
    with TcpProxy(server.port) as proxy:
        client = redis.asyncio.Redis(port=proxy.port, socket_timeout=None)
        options: dict[str, Any] = {"key_prefix": "stall", "liveness_timeout": 0.5}
        try:
            async with (
                rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as P,
                rs.ResumableStreamContext(
                    backend=RedisBackend(client, command_timeout=0.5), **options
                ) as C,
            ):
                source = TestingSource()
                own = await P.resumable_stream("s", source.make)
                follower = await C.resume_existing_stream("s")
                source.write("before ")
                assert await read(follower, 1) == "before "
                proxy.stall()
                source.write("during")
                assert await read(own, 2) == "before during"
                # Silence, then a probe that Redis never answers: an error within about
                # liveness_timeout + command_timeout, not a wait for the stall to end.
                with anyio.fail_after(3), pytest.raises(rs.BackendError):
                    await read(follower)
                source.close()
                proxy.resume()
        finally:
            proxy.resume()
            await client.aclose()


# A restart: every pooled connection is dead, which redis-py finds out on its next command.


async def test_the_first_command_after_a_restart_succeeds(server: RedisServer) -> None:
    async with rs.ResumableStreamContext(backend=RedisBackend(server.url)) as ctx:
        assert await ctx.has_existing_stream("s") is None  # the command connection is pooled
        server.stop()
        restarted = start_redis_server(server.port)
        try:
            with anyio.fail_after(5):
                assert await ctx.has_existing_stream("s") is None
                await ctx.cancel_stream("s")  # GET, then SET NX: not sent twice on failure
                assert await ctx.has_existing_stream("s") == "DONE"
        finally:
            restarted.stop()


async def test_followers_carry_on_through_a_quick_restart(server: RedisServer) -> None:
    options: dict[str, Any] = {"key_prefix": "restart", "liveness_timeout": 1.0}
    async with (
        rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as P,
        rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as C,
    ):
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        follower = await C.resume_existing_stream("s")
        source.write("before ")
        assert await read(follower, 1) == "before "
        server.stop()
        restarted = start_redis_server(server.port)
        try:
            # Written during and after the restart: the follower, whose subscriber reconnects
            # and whose probe reaches the producer again, gets every word exactly once.
            source.write("during ")
            source.write("after")
            source.close()
            assert await read(own) == "before during after"
            with anyio.fail_after(10):
                assert await read(follower) == "during after"
        finally:
            restarted.stop()


async def test_a_context_warns_once_about_an_evicting_policy(
    server: RedisServer, admin: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await admin.config_set("maxmemory", 100 << 20)
    await admin.config_set("maxmemory-policy", "volatile-lru")  # every key of ours has a TTL
    with caplog.at_level(logging.WARNING, "resumable_stream"):
        async with rs.ResumableStreamContext(backend=RedisBackend(server.url)) as ctx:
            await poll_until(lambda: _anyio_true(caplog), True)
            assert await read(await ctx.resumable_stream("s", words)) == "all the words"
    warnings = [r for r in caplog.records if "maxmemory-policy volatile-lru" in r.getMessage()]
    assert len(warnings) == 1
    caplog.clear()
    await admin.config_set("maxmemory-policy", "noeviction")
    with caplog.at_level(logging.WARNING, "resumable_stream"):
        async with rs.ResumableStreamContext(backend=RedisBackend(server.url)) as ctx:
            assert await read(await ctx.resumable_stream("s2", words)) == "all the words"
    assert "maxmemory-policy" not in caplog.text


async def _anyio_true(caplog: pytest.LogCaptureFixture) -> bool:
    return "maxmemory-policy" in caplog.text
