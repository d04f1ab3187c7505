"""Gaps in writers and restarts that the job-queue work ran into (they were strict xfails until
they were closed), each acted out:

1. A writer whose process died is `lost`; that state keeps the id for `lost_ttl` (60 s by
   default), then the id is free. A job redelivered after that (Celery redelivers a job whose
   worker died after `visibility_timeout`, an hour by default) starts it with `restart=True`:
   still a new attempt, so that a reader holding a cursor into the lost one learns of it,
   never gets the new attempt's text from its old offset.
2. A reader that saw an attempt end badly holds the id of its end frame (`end`); when it
   reconnects (`EventSource` does, by itself) after the job's retry started a new attempt, it
   is told (`event: restart`), where it used to get 204 and stop for good.
3. A durable stream's followers, which read the log and ask the producer nothing, learn that
   its writer's process died within the liveness timeout, as a memory-only stream's do: they
   tell the producer they follow (`Follow`), and it heartbeats them while idle.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import uuid

import anyio
import pytest

import resumable_stream as rs
from resumable_stream.http import EventStream

from .conftest import RedisServer
from .helpers import poll_until

pytestmark = pytest.mark.anyio

WRITER = textwrap.dedent(
    """
    import sys, anyio, resumable_stream as rs

    async def main():
        async with rs.create_resumable_stream_context(
            sys.argv[1], key_prefix=sys.argv[2], durable=True, liveness_timeout=1.0, lost_ttl=1
        ) as ctx:
            async with ctx.writer(sys.argv[3]) as w:
                await w.write("first attempt: its text ")
                print("ready", flush=True)
                await anyio.sleep_forever()

    anyio.run(main)
    """
)


LIVENESS_WRITER = textwrap.dedent(
    """
    import sys, anyio, resumable_stream as rs

    async def main():
        async with rs.create_resumable_stream_context(
            sys.argv[1], key_prefix=sys.argv[2], durable=sys.argv[3] == "durable",
            liveness_timeout=1.0,
        ) as ctx:
            async with ctx.writer("job") as w:
                await w.write("first words ")
                print("ready", flush=True)
                await anyio.sleep_forever()

    anyio.run(main)
    """
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    "mode",
    [
        "memory-only",
        "durable",
    ],
)
async def test_followers_learn_of_a_killed_writer_within_the_liveness_timeout(
    redis_server: RedisServer, mode: str
) -> None:
    prefix = f"finding-{uuid.uuid4().hex}"
    command = [sys.executable, "-c", LIVENESS_WRITER, redis_server.url, prefix, mode]
    async with (
        rs.create_resumable_stream_context(
            redis_server.url, key_prefix=prefix, durable=mode == "durable", liveness_timeout=1.0
        ) as ctx,
        await anyio.open_process(command, stderr=None) as process,
    ):
        assert process.stdout is not None
        output = b""
        with anyio.fail_after(20):
            while b"ready" not in output:
                output += await process.stdout.receive()
        reader = await ctx.resume_existing_stream("job")
        assert reader is not None
        assert await reader.__anext__() == "first words "
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        killed_at = anyio.current_time()
        with anyio.fail_after(10), pytest.raises(rs.ProducerLostError):
            await reader.__anext__()
        assert anyio.current_time() - killed_at < 1.0 + 0.5


async def test_a_restart_after_a_lost_streams_id_was_released_is_still_a_restart(
    redis_server: RedisServer,
) -> None:
    prefix, sid = f"finding-{uuid.uuid4().hex}", "job"
    command = [sys.executable, "-c", WRITER, redis_server.url, prefix, sid]
    async with rs.create_resumable_stream_context(
        redis_server.url, key_prefix=prefix, durable=True, liveness_timeout=1.0, lost_ttl=1
    ) as ctx:
        async with await anyio.open_process(command, stderr=None) as process:
            assert process.stdout is not None
            output = b""
            with anyio.fail_after(20):
                while b"ready" not in output:
                    output += await process.stdout.receive()
            reader = await ctx.resume_existing_stream(sid)
            assert reader is not None
            assert await reader.__anext__() == "first attempt: its text "
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            with anyio.fail_after(10), pytest.raises(rs.ProducerLostError):
                await reader.__anext__()
        # The job is redelivered after the lost state expired.
        await poll_until(lambda: ctx.has_existing_stream(sid), None, timeout=10)
        async with ctx.writer(sid, restart=True) as w:
            await w.write("second attempt, which is another text altogether")
            assert w.attempt == 2  # fails: 1, a new stream
            with pytest.raises(rs.StreamRestartedError):
                await ctx.resume_existing_stream(sid, resume_at=6)  # a cursor of attempt 1


async def test_a_reader_that_saw_an_attempt_fail_learns_of_the_next_attempt() -> None:
    async with rs.create_resumable_stream_context(backend=rs.MemoryBackend()) as ctx:

        async def failed_attempt() -> None:
            async with ctx.writer("job") as w:
                await w.write("first try")
                raise ConnectionError("the model's service broke")

        with pytest.raises(ConnectionError):
            await failed_attempt()
        async with ctx.writer("job", restart=True) as w:
            await w.write("second try")
            endpoint = EventStream(ctx, "job", wait=1.0)
            # What EventSource sends after the first attempt's `event: error` (id: end).
            answer = await endpoint.prepare(headers={"last-event-id": "end"})
            assert answer.status == 200  # fails: 204, and EventSource stops for good
            assert b"event: restart" in answer.content


async def test_a_reader_that_saw_an_attempt_stopped_is_not_kept_waiting_for_a_retry() -> None:
    """A stopped job is not retried: the endpoint's `wait` for a next attempt is for attempts
    that failed or died. EventSource's reconnect after `event: error` (cancelled) gets 204 at
    once, not after `wait`."""
    async with rs.create_resumable_stream_context(backend=rs.MemoryBackend()) as ctx:
        async with ctx.writer("job") as w:
            await w.write("first words")
            await ctx.cancel_stream("job")
            with anyio.fail_after(5):
                await anyio.sleep_forever()  # until the stop reaches the writer
        assert w.cancelled
        endpoint = EventStream(ctx, "job", wait=30.0)
        with anyio.fail_after(2):
            answer = await endpoint.prepare(headers={"last-event-id": "end"})
        assert answer.status == 204
        with anyio.fail_after(2):
            assert await ctx.current_attempt("job", newer_than=1, wait=30.0) == 1
