"""A producer process killed with SIGKILL: its followers and late readers learn it."""

from __future__ import annotations

import os
import signal
import sys
import textwrap

import anyio
import pytest

import resumable_stream as rs
from resumable_stream.redis import RedisBackend

from .conftest import RedisServer
from .helpers import TestingSource, poll_until, read

pytestmark = pytest.mark.anyio

PRODUCER = textwrap.dedent(
    """
    import sys, anyio, resumable_stream as rs
    from resumable_stream.redis import RedisBackend

    async def llm():
        yield "first words"
        print("ready", flush=True)
        await anyio.sleep_forever()
        yield "never"

    async def main():
        async with rs.ResumableStreamContext(backend=RedisBackend(sys.argv[1]),
                                             key_prefix=sys.argv[2]) as ctx:
            stream = await ctx.resumable_stream("victim", llm)
            await stream.__anext__()
            await anyio.sleep_forever()

    anyio.run(main)
    """
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_followers_learn_a_killed_producer_within_the_liveness_timeout(
    redis_server: RedisServer,
) -> None:
    prefix = f"kill-{os.getpid()}-{id(redis_server)}"
    command = [sys.executable, "-c", PRODUCER, redis_server.url, prefix]
    async with await anyio.open_process(command, stderr=None) as process:
        assert process.stdout is not None
        output = b""
        with anyio.fail_after(20):
            while b"ready" not in output:
                output += await process.stdout.receive()
        backend = RedisBackend(redis_server.url)
        async with rs.ResumableStreamContext(
            backend=backend, key_prefix=prefix, liveness_timeout=3.0, lost_ttl=1
        ) as C:
            follower = await C.resume_existing_stream("victim")
            assert await read(follower, 1) == "first words"
            process.send_signal(signal.SIGKILL)
            await process.wait()
            killed_at = anyio.current_time()
            with anyio.fail_after(3.0 + 1.0), pytest.raises(rs.ProducerLostError):
                await read(follower)
            assert anyio.current_time() - killed_at < 3.0 + 0.5
            # Late readers learn the same, until the id is released after lost_ttl.
            with pytest.raises(rs.ProducerLostError):
                await C.resume_existing_stream("victim")
            await poll_until(lambda: C.has_existing_stream("victim"), None)
            source = TestingSource()
            fresh = await C.resumable_stream("victim", source.make)
            source.write("a new stream")
            source.close()
            assert await read(fresh) == "a new stream"
