"""Defects the seeded fault simulator found (issue 22), each acted out exactly, on every backend.

The simulator (`chaos/sim`, `tests/test_simulation.py`) found them by chance in random runs;
here each one's fault is put exactly where it bites, with a backend wrapper (`Faulty`), so that
the test fails without its fix whatever the timing. The seeds that found them are replayed by
`tests/test_simulation.py::test_the_seeds_that_found_defects_run_clean`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import resumable_stream as rs
from resumable_stream import _protocol as p
from resumable_stream._hub import Hub
from resumable_stream._options import Settings
from resumable_stream._protocol import Keys

from .conftest import Workers
from .helpers import (
    Faulty,
    Filtered,
    TestingSource,
    never_called,
    poll_until,
    read,
    read_entries,
)

pytestmark = pytest.mark.anyio


async def chunks(count: int, size: int) -> AsyncIterator[str]:
    for i in range(count):
        yield str(i % 10) * size


# A chunk cut across live messages keeps its event name for a reader that starts inside it
# (seed 2367: the name travels with the chunk's first part, which such a reader skips).


@pytest.mark.parametrize("workers", [{"max_message_size": 4}], indirect=True)
async def test_a_reader_inside_a_long_named_chunk_gets_its_name(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("ab")
    assert await read(own, 1) == "ab"
    # Offset 7 is inside the chunk to come (2 to 10), past its first four characters.
    follower = await workers.C.resume_existing_stream("s", resume_at=7)
    assert follower is not None
    source.write(rs.Event("cdefghij", event="token", retry=5))
    source.close()
    with anyio.fail_after(5):
        assert await read_entries(follower) == [(rs.Event("hij", "token", 5), 10)]
    assert await read(own) == "cdefghij"


# A durable write whose reply was lost is retried with the same entries (seed 29: the retry
# carried more chunks under the same entry id, which the log skipped as written already).


async def test_a_durable_write_whose_reply_was_lost_stores_every_chunk(workers: Workers) -> None:
    lost: list[object] = []

    async def append(command: Any, key: str, entries: Any, *args: Any) -> Any:
        result = await command(key, entries, *args)
        if not lost:
            lost.append(entries)
            raise rs.BackendError("the reply was lost: the write took effect")
        return result

    async def replies_lost() -> int:
        return len(lost)

    source = TestingSource()
    faulty = Faulty(workers.backends[0], append=append)
    options: dict[str, Any] = dict(durable=True, flush_interval=0, linger=0)
    async with workers.context(backend=faulty, **options) as P:
        own = await P.resumable_stream("s", source.make)
        source.write("first ")
        await poll_until(replies_lost, 1)
        source.write("second")  # before the retry: it would join the first entry
        source.close()
        assert await read(own) == "first second"
    # The producer is gone: the log alone has the text.
    async with workers.context(durable=True) as reader_context:
        reader = await reader_context.resume_existing_stream("s", resume_at=0)
        with anyio.fail_after(5):
            assert await read(reader) == "first second"


# A dead producer is never recorded over an end written meanwhile (seed 7089: a follower
# read "running", the producer's DONE landed, then the follower's LOST overwrote it).


async def test_a_dead_producer_is_never_recorded_over_an_end(workers: Workers) -> None:
    key = workers.keys.sentinel("s")
    await workers.write(key, "3")  # running, and nobody listens for its requests

    async def end_lands_first(command: Any, *args: Any) -> Any:
        if args[0] == key:
            await workers.write(key, "DONE")  # between the follower's read and its write
        return await command(*args)

    faulty = Faulty(workers.backends[1], set=end_lands_first, replace=end_lands_first)
    options: dict[str, Any] = dict(resume_timeout=0.2, liveness_timeout=0.2)
    async with workers.context(backend=faulty, **options) as C:
        with anyio.fail_after(10):
            try:
                stream = await C.resume_existing_stream("s")
            except rs.ProducerLostError:
                stream = None  # it was dead when this reader looked: fair, if not written
    assert stream is None
    async with workers.backends[0].connect(lambda channel, data: None) as connection:
        assert await connection.get(key) == "DONE"


# A context whose block is cancelled while a stream's end cannot be written closes at once
# (seed 942: a helper task started under the cancelled scope never learned it, and spun
# forever; and the Redis connection's own tasks were cancelled with the block, so every
# cleanup command of the context waited for its deadline: 20 s, writing nothing).


async def test_a_cancelled_context_closes_while_an_end_cannot_be_written(
    workers: Workers,
) -> None:
    async def refuse(command: Any, key: str, *args: Any) -> Any:
        if key.endswith(":sentinel") or key.endswith(":text"):
            raise rs.BackendError("refused")
        return await command(key, *args)

    faulty = Faulty(workers.backends[0], set=refuse, append=refuse)
    source = TestingSource()
    with anyio.fail_after(5):
        with anyio.CancelScope() as scope:
            async with workers.context(backend=faulty, durable=True, drain_timeout=5.0) as P:
                own = await P.resumable_stream("s", source.make)
                source.write("still running")
                assert await read(own, 1) == "still running"
                scope.cancel()  # what runs the context is cancelled: the stream is stopped
                await anyio.sleep_forever()
        assert scope.cancelled_caught


# A durable reader with small messages reads to the end (seeds 765, 997, 1723: its page of the
# log shrank to one entry, the one holding its position, read again and again).


@pytest.mark.parametrize("workers", [{"max_message_size": 3}], indirect=True)
async def test_a_durable_reader_of_small_messages_reads_to_the_end(workers: Workers) -> None:
    async with (
        workers.context(0, durable=True, max_message_size=3) as P,
        workers.context(1, durable=True, max_message_size=3) as C,
    ):
        own = await P.resumable_stream("s", lambda: chunks(6, 30))
        text = await read(own)
        with anyio.fail_after(5):
            reader = await C.resume_existing_stream("s", resume_at=0)
            assert await read(reader) == text


# A durable stream stopped before it stored anything is cancelled for its readers (seeds 968,
# 1209: an empty log of a stream that ended badly was taken for lost text).


async def test_a_durable_stream_stopped_before_it_started_is_cancelled(workers: Workers) -> None:
    async with workers.context(0, durable=True) as A, workers.context(1, durable=True) as B:
        await A.cancel_stream("s")  # nobody started it: whoever tries next finds it stopped
        with anyio.fail_after(10), pytest.raises(rs.StreamCancelledError):
            await B.resume_existing_stream("s", resume_at=0)


# A subscription that failed is not left behind (seeds 22, 35, 39: the backend keeps a
# channel whose subscription failed wanted, and subscribes it again for the context's life).


async def test_a_failed_subscription_is_not_left_behind(workers: Workers) -> None:
    async def fails_after_sending(command: Any, *channels: str) -> Any:
        await command(*channels)  # sent (and wanted): the confirmation is what fails
        raise rs.BackendError("the subscriber connection dropped")

    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    faulty = Faulty(workers.backends[1], begin_subscribe=fails_after_sending)
    async with workers.context(backend=faulty) as C:
        with pytest.raises(rs.BackendError):
            await C.resume_existing_stream("s")

        async def live_channels() -> list[str]:
            return [c for c in await workers.channels() if c.endswith(":live")]

        await poll_until(live_channels, [])
    source.close()
    assert await read(own) == ""


# A helper task started after the scope around the context was cancelled ends at once (seed
# 28093: a writer's block was cancelled, its producer's end could not be written, and the
# retry it started checked for a cancellation anyio on asyncio never delivered to a task
# started after it: it spun, holding the loop, until the context was left).


async def test_a_helper_started_under_a_cancelled_scope_is_cancelled() -> None:
    hub = Hub(Settings(), Keys("helpers"))
    progress: list[str] = []
    over = anyio.Event()

    async def helper() -> None:
        progress.append("started")
        try:
            await anyio.lowlevel.checkpoint()
            progress.append("ran past a checkpoint")
        finally:
            progress.append("cleaned up")
            over.set()

    with anyio.fail_after(5), anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            await hub.open(_Unused(), tg, inbox=False)  # type: ignore[arg-type]
            outer.cancel()
            with anyio.CancelScope(shield=True):  # as a producer's cleanup is
                for _ in range(3):  # anyio's delivery of the cancellation is over by then
                    await anyio.lowlevel.checkpoint()
                assert hub.spawn("s", helper)
                await over.wait()  # before the task group's exit cancels it
    assert progress == ["started", "cleaned up"]


class _Unused:
    sharded = False


# A reader with a cursor follows a stream whose LOST its producer took back (seed 50188: a
# follower recorded a producer cut off from Redis for a while as dead; the producer, back,
# turned the LOST into running again; a reader that had read LOST, asking the lingering
# producer for its tail, read "running" and answered None: "nothing to resume").


async def test_a_reader_follows_a_stream_whose_producer_took_its_lost_back(
    workers: Workers,
) -> None:
    request = workers.keys.request("s")
    sentinel = workers.keys.sentinel("s")
    unanswered: list[str] = []
    lost_read: list[str] = []

    async def publish(command: Any, channel: str, message: bytes) -> Any:
        if channel == request and len(unanswered) < 2:
            unanswered.append(channel)  # the producer is subscribing again: nobody hears it
            return 0
        return await command(channel, message)

    async def get(command: Any, key: str) -> Any:
        if key == sentinel and not lost_read:
            lost_read.append(key)
            return "LOST"  # before the producer, back, took it back
        return await command(key)

    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("hello ")
    assert await read(own, 1) == "hello "
    faulty = Faulty(workers.backends[1], publish=publish, get=get)
    async with workers.context(backend=faulty) as C:
        with anyio.fail_after(10):
            tail = await C.resumable_stream("s", source.make, resume_at=2)
            assert tail is not None  # it runs: not "nothing to resume"
            source.write("world")
            source.close()
            assert await read(tail) == "llo world"
    assert lost_read
    assert len(unanswered) == 2


# A follower that finds its stream ended while it was about to record its producer dead takes
# the end that came meanwhile (seed 32126: the producer's subscriber was down, so the
# follower's requests reached nobody; its end arrived while the follower compared-and-set
# LOST, which failed on DONE; it answered "the end never arrived" with the end in hand).


async def test_a_follower_takes_an_end_that_came_while_it_recorded_its_producer_dead(
    workers: Workers,
) -> None:
    request = workers.keys.request("s")
    live = workers.keys.live("s")
    sentinel = workers.keys.sentinel("s")
    source = TestingSource()
    silent = [False]  # what the producer publishes does not reach the follower
    asked: list[str] = []
    end_came = anyio.Event()

    def drop(channel: str, message: p.Message) -> bool:
        if channel == live and silent[0]:
            return True
        if channel == live and isinstance(message, p.End):
            end_came.set()
        return False

    async def publish(command: Any, channel: str, message: bytes) -> Any:
        if channel == request:
            asked.append(channel)
            if len(asked) > 1:
                return 0  # the producer's subscriber is down: only the first request gets there
        return await command(channel, message)

    async def replace(command: Any, key: str, *args: Any) -> Any:
        if key == sentinel and silent[0]:
            # The producer, alive, ends the stream while the follower records it dead: its
            # end comes while the follower's compare-and-set is on its way (and fails).
            silent[0] = False
            source.write("world")
            source.close()
            await end_came.wait()
        return await command(key, *args)

    own = await workers.P.resumable_stream("s", source.make)
    source.write("hello ")
    options: dict[str, Any] = dict(resume_timeout=0.2, liveness_timeout=0.2)
    faulty = Faulty(Filtered(workers.backends[1], drop), publish=publish, replace=replace)
    async with workers.context(backend=faulty, **options) as C:
        with anyio.fail_after(10):
            follower = await C.resume_existing_stream("s", resume_at=0)
            assert await read(follower, 1) == "hello "
            silent[0] = True  # no heartbeat comes: the follower asks, and nobody hears it
            assert await read(follower) == "world"
            assert await read(own) == "hello world"
    assert not silent[0]  # it did try to record the producer dead


# A durable producer writes its end even when it ends past its keys' first TTL (seed 72531: a
# stalled Redis did not answer its end's write; the retries gave up at start + TTL, though its
# later writes had given the keys their TTL again, and a late write made them again, running:
# a stream that failed was taken, by its readers, for one whose producer died).


async def test_a_durable_end_that_failed_once_is_written_after_the_first_ttl(
    workers: Workers,
) -> None:
    refused: list[str] = []

    async def append(command: Any, *args: Any) -> Any:
        state = args[-1]
        if state is not None and not refused:
            refused.append(state)  # the end's write: no reply in time (Redis stalled)
            raise rs.BackendError("append: no reply in time")
        return await command(*args)

    source = TestingSource()
    options: dict[str, Any] = dict(
        durable=True, ttl=1, linger=0, flush_interval=0, liveness_timeout=0.3, resume_timeout=0.3
    )
    faulty = Faulty(workers.backends[0], append=append)
    async with workers.context(backend=faulty, **options) as P:
        own = await P.resumable_stream("s", source.make)
        source.write("first ")
        assert await read(own, 1) == "first "
        await anyio.sleep(1.2)  # the workload: a stream that runs longer than its keys' TTL
        source.write("second")
        assert await read(own, 1) == "second"  # stored: the keys live for a TTL from now
        source.fail(RuntimeError("the model failed"))
        with pytest.raises(rs.StreamFailedError):
            await read(own)
        assert len(refused) == 1  # its first write of the end got no answer
        async with workers.context(1, **options) as C:
            with anyio.fail_after(10):
                reader = await C.resume_existing_stream("s", resume_at=0)
                assert reader is not None
                text, error = await read_to_error(reader)
                assert text == "first second"
                assert isinstance(error, rs.StreamFailedError), error  # not ProducerLostError


async def read_to_error(stream: rs.ResumableStream) -> tuple[str, BaseException | None]:
    text = ""
    try:
        async for chunk in stream:
            text += chunk
    except rs.ResumableStreamError as exc:
        return text, exc
    return text, None


# A retried job's writer that won its election and failed before it started records its
# stream dead at once (seed 103807: its count of attempts could not be read; the stream was
# left running with nobody writing it, and its readers learned only a liveness timeout later).


async def test_a_writer_that_failed_after_its_election_records_its_stream_lost(
    workers: Workers,
) -> None:
    restarts = workers.keys.restarts("job")
    await workers.write(restarts, "0")  # the job ran before: its retry counts as attempt 2

    async def get(command: Any, key: str) -> Any:
        if key == restarts:
            raise rs.BackendError("get: no reply in time")
        return await command(key)

    options: dict[str, Any] = dict(liveness_timeout=30.0, resume_timeout=30.0)
    async with workers.context(backend=Faulty(workers.backends[0], get=get), **options) as W:
        with pytest.raises(rs.BackendError):
            async with W.writer("job", restart=True):
                pytest.fail("the writer started")
    async with workers.context(1, **options) as C:
        with anyio.fail_after(5):  # not after a liveness timeout (30 s)
            with pytest.raises(rs.ProducerLostError):
                await C.resume_existing_stream("job")
            # The job's next retry starts at once, as the next attempt.
            async with C.writer("job", restart=True) as w:
                assert w.attempt == 2
                await w.write("done")


# A reader whose election found its stream ended, and then found it running, follows it (seed
# 105076: its INCR met a LOST that the producer, back from an outage, took back right after;
# it answered None, "nothing to resume", for a running stream).


async def test_a_reader_that_found_its_stream_ended_then_running_follows_it(
    workers: Workers,
) -> None:
    sentinel = workers.keys.sentinel("s")
    met_lost: list[str] = []

    async def incr(command: Any, key: str, ttl: int) -> Any:
        if key == sentinel and not met_lost:
            met_lost.append(key)
            return None  # what INCR answers on LOST (not a number): an ended stream
        return await command(key, ttl)

    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("hello ")
    async with workers.context(backend=Faulty(workers.backends[1], incr=incr)) as C:
        with anyio.fail_after(10):
            follower = await C.resumable_stream("s", never_called)
            assert follower is not None
            assert await read(follower, 1) == "hello "
            source.write("world")
            source.close()
            assert await read(follower) == "world"
    assert await read(own) == "hello world"
    assert met_lost


# A follower that gets a later piece of an answer without the first asks again (seed 163941:
# Redis dropped its subscriber while the producer sent the first piece; the second, from past
# its position, ended it with "malformed message", an untyped error).


@pytest.mark.not_durable  # a durable follower reads what it misses from the log
@pytest.mark.parametrize("workers", [{"max_message_size": 4}], indirect=True)
async def test_a_follower_missing_the_first_piece_of_an_answer_asks_again(
    workers: Workers,
) -> None:
    lost: list[p.Message] = []
    drop_next = [False]

    def drop(channel: str, message: p.Message) -> bool:
        if drop_next[0] and isinstance(message, p.Live):
            drop_next[0] = False  # a gap: the follower asks for what it missed
            lost.append(message)
            return True
        if isinstance(message, p.Replay) and len(lost) == 1:
            lost.append(message)  # the first piece of the answer: lost too
            return True
        return False

    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("0123")
    async with workers.context(backend=Filtered(workers.backends[1], drop)) as C:
        follower = await C.resume_existing_stream("s")
        with anyio.fail_after(10):
            assert await read(follower, 1) == "0123"
            drop_next[0] = True
            source.write("4567")
            assert await read(own, 2) == "01234567"
            source.write("89ab")
            source.close()
            assert await read(follower) == "456789ab"
    assert [type(message) for message in lost] == [p.Live, p.Replay]
    assert await read(own) == "89ab"
