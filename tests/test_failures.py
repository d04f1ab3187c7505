"""Failure semantics: stop, producer liveness, and the terminal states readers learn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import resumable_stream as rs
from resumable_stream import _protocol as p
from resumable_stream._follower import Follower
from resumable_stream._reader import ProducerReader

from .conftest import Workers
from .helpers import Filtered, TestingSource, never_called, poll_until, read

pytestmark = pytest.mark.anyio

DURABLE = True  # conftest: every `workers` test here runs in both modes


# Stop


async def test_cancel_interrupts_an_await_and_ends_every_reader(workers: Workers) -> None:
    started = anyio.Event()
    interrupted = anyio.Event()

    async def slow_llm() -> AsyncIterator[str]:
        yield "thinking"
        started.set()
        try:
            await anyio.sleep_forever()  # a model call that takes forever
        finally:
            interrupted.set()
        yield "never"

    own = await workers.P.resumable_stream("s", slow_llm)
    follower = await workers.C.resume_existing_stream("s")
    assert await read(own, 1) == "thinking"
    assert await read(follower, 1) == "thinking"
    with anyio.fail_after(5):
        await started.wait()
        await workers.C.cancel_stream("s")  # from the other worker
        await interrupted.wait()
    for reader in (own, follower):
        with pytest.raises(rs.StreamCancelledError):
            await read(reader)
    await poll_until(lambda: workers.C.has_existing_stream("s"), "DONE")
    with pytest.raises(rs.StreamCancelledError):
        await workers.C.resumable_stream("s", never_called)
    with anyio.fail_after(5):
        await workers.C.cancel_stream("s")  # idempotent
        await workers.P.cancel_stream("s")


async def test_cancel_before_start_prevents_the_stream(workers: Workers) -> None:
    with anyio.fail_after(5):
        await workers.P.cancel_stream("later")
        await workers.P.cancel_stream("later")
    with pytest.raises(rs.StreamCancelledError):
        await workers.C.resumable_stream("later", never_called)


async def test_cancel_reaches_a_producer_that_is_about_to_listen(workers: Workers) -> None:
    # The id was taken (INCR) but its producer is not subscribed yet: the stop waits for it.
    await workers.write(workers.keys.sentinel("soon"), "1")
    source = TestingSource()
    async with anyio.create_task_group() as tg:
        tg.start_soon(workers.C.cancel_stream, "soon")
        own = ProducerReader(workers.P._start_producer("soon", source.make), 0)
        with pytest.raises(rs.StreamCancelledError):
            await read(own)
    assert source.calls <= 1


@pytest.mark.parametrize("workers", [{"resume_timeout": 0.2}], indirect=True)
async def test_cancel_of_a_stream_whose_producer_is_gone_records_cancelled(
    workers: Workers,
) -> None:
    await workers.write(workers.keys.sentinel("orphan"), "1")
    with anyio.fail_after(5):
        await workers.C.cancel_stream("orphan")
    with pytest.raises(rs.StreamCancelledError):
        await workers.P.resume_existing_stream("orphan")


async def test_cancel_leaves_other_streams_alone(workers: Workers) -> None:
    a, b = TestingSource(), TestingSource()
    stream_a = await workers.P.resumable_stream("a", a.make)
    stream_b = await workers.P.resumable_stream("b", b.make)
    await workers.C.cancel_stream("a")
    with pytest.raises(rs.StreamCancelledError):
        await read(stream_a)
    b.write("ok")
    b.close()
    assert await read(stream_b) == "ok"


# Liveness


@pytest.mark.parametrize("workers", [{"liveness_timeout": 0.3}], indirect=True)
async def test_an_idle_producer_keeps_its_followers_with_heartbeats(workers: Workers) -> None:
    source = TestingSource()
    await workers.P.resumable_stream("s", source.make)
    follower = await workers.C.resume_existing_stream("s")
    source.write("before")
    assert await read(follower, 1) == "before"
    # The stimulus, not a synchronisation: stay idle for several liveness timeouts.
    await anyio.sleep(1.2)
    source.write("after")
    source.close()
    assert await read(follower) == "after"


def test_liveness_options_are_checked() -> None:
    with pytest.raises(ValueError, match="liveness_timeout"):
        rs.ResumableStreamContext(backend=rs.MemoryBackend(), liveness_timeout=0)
    with pytest.raises(ValueError, match="lost_ttl"):
        rs.ResumableStreamContext(backend=rs.MemoryBackend(), lost_ttl=0)


# Slow followers


@pytest.mark.parametrize("workers", [{"max_backlog": 1000}], indirect=True)
async def test_a_reader_that_never_reads_is_ended_and_holds_nothing(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    stuck = await workers.C.resume_existing_stream("s")
    reading = await workers.C.resume_existing_stream("s")
    assert stuck is not None
    assert reading is not None
    chunk = "x" * 100
    received = ""
    for _ in range(200):  # 20 times the backlog allowed
        source.write(chunk)
        received += await read(reading, 1)
    source.close()
    assert received == chunk * 200
    assert await read(reading) == ""
    assert await read(own) == chunk * 200
    held = stuck.take_ready()  # what it still holds, through the readers' own interface
    assert sum(len(str(chunk)) for chunk, _ in held) <= 1000
    with pytest.raises(rs.SlowReaderError, match=r"fell \d+ characters behind"):
        await read(stuck)
    # The text is still there for whoever resumes.
    late = await workers.C.resume_existing_stream("s", resume_at=19_950)
    assert await read(late) == "x" * 50


# Graceful shutdown


async def test_leaving_the_context_drains_then_cancels_releasing_other_workers(
    workers: Workers,
) -> None:
    async def endless() -> AsyncIterator[str]:
        yield "forever"
        await anyio.sleep_forever()
        yield "never"

    async def finishing() -> AsyncIterator[str]:
        yield "done "
        await anyio.sleep(0.2)  # still running when the context starts to close
        yield "in time"

    with anyio.fail_after(15):
        async with workers.context(0, drain_timeout=1.5, linger=60) as worker:
            stuck = await worker.resumable_stream("endless", endless)
            drained = await worker.resumable_stream("finishing", finishing)
            follower = await workers.C.resume_existing_stream("endless")
            assert await read(stuck, 1) == "forever"
            assert await read(follower, 1) == "forever"
        # Left the context after drain_timeout, not after the 60 s linger.
    assert await read(drained) == "done in time"
    with pytest.raises(rs.StreamCancelledError):
        await read(follower)  # released at once on the other worker
    with pytest.raises(rs.StreamCancelledError):
        await workers.C.resumable_stream("endless", never_called)
    assert await workers.C.resumable_stream("finishing", never_called) is None


# A lost end message


def loses_live_ends(inner: rs.Backend) -> Filtered:
    """A backend whose connection never receives the end message on live channels."""
    return Filtered(inner, lambda channel, message: type(message) is p.End and not message.listener)


@pytest.mark.parametrize("linger", [30, 0])
async def test_a_lost_end_message_never_leaves_a_follower_hanging(
    workers: Workers, linger: float
) -> None:
    backend = loses_live_ends(workers.backends[1])
    options: dict[str, Any] = {"liveness_timeout": 0.5, "drain_timeout": 2.0, "linger": linger}
    async with rs.ResumableStreamContext(
        backend=backend, key_prefix=workers.prefix, **options
    ) as C:
        source = TestingSource()
        async with workers.context(0, **options) as P:
            own = await P.resumable_stream("s", source.make)
            follower = await C.resume_existing_stream("s")
            assert isinstance(follower, Follower)  # another context's reader
            source.write("all ")
            assert await read(follower, 1) == "all "

            async def settled() -> bool:
                # No request of the follower's is out or unanswered. A follower whose live
                # subscription was confirmed after the producer's answer asks once more (see
                # `Follower._join_requested`); how fast the confirmation comes depends on the
                # loop's scheduling (on Python 3.10 with fakeredis it came late every time).
                # Answered after the end, that request would bring the end by the reply
                # channel, which this test does not drop: it is about an end that only the
                # live channel would have carried.
                return not (follower._recovering or follower._awaiting)

            await poll_until(settled, True)
            source.write("of it")
            source.close()
            assert await read(own) == "all of it"
            with anyio.fail_after(5):
                if linger:
                    # The producer lingers: asked again, it sends the end once more.
                    assert await read(follower) == "of it"
                else:
                    # Nobody can say whether text is missing: a clear error, not a hang.
                    assert await read(follower, 1) == "of it"
                    with pytest.raises(rs.StreamIncompleteError, match="end never arrived"):
                        await read(follower)
