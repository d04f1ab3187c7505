"""Defects the seeded fault simulator found (issue 22), each acted out exactly, on every backend.

The simulator (`chaos/sim`, `tests/test_simulation.py`) found them by chance in random runs;
here each one's fault is put exactly where it bites, with a backend wrapper (`Faulty`), so that
the test fails without its fix whatever the timing. The seeds that found them are replayed by
`tests/test_simulation.py::test_the_seeds_that_found_defects_run_clean`.
"""

from __future__ import annotations

import contextlib
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
    read_until_error,
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
                text, error = await read_until_error(reader)
                assert text == "first second"
                assert isinstance(error, rs.StreamFailedError), error  # not ProducerLostError


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


# An attempt whose end was retried after a newer attempt of its stream started elsewhere
# leaves the newer one be (seed 144529: the old attempt's first write of its end landed with
# its reply lost; a retried job started attempt 2 on that; the old attempt's retry then wrote
# its end over attempt 2's running state, and its count of restarts back to 0).


async def test_an_end_retried_after_a_newer_attempt_started_leaves_that_attempt(
    workers: Workers,
) -> None:
    sentinel = workers.keys.sentinel("job")
    restarts = workers.keys.restarts("job")
    started = anyio.Event()  # attempt 2 started: from here on the old attempt's writes land
    ends: list[str] = []  # the old attempt's writes of its end
    asked: list[str] = []  # ... and its reads of the count of attempts after attempt 2 began

    async def land(command: Any, *args: Any) -> Any:
        if not ends:
            await command(*args)  # the first lands, and its reply is lost
        elif started.is_set():
            result = await command(*args)
            ends.append("landed")
            return result
        ends.append("refused")
        raise rs.BackendError("no reply in time")

    async def set_(command: Any, key: str, *args: Any) -> Any:
        if key == sentinel:
            return await land(command, key, *args)
        return await command(key, *args)

    async def append(command: Any, *args: Any) -> Any:
        if args[-1] is not None:  # the end's write, a durable stream's
            return await land(command, *args)
        return await command(*args)

    async def get(command: Any, key: str) -> Any:
        if key == restarts and started.is_set():
            asked.append(key)
        return await command(key)

    faulty = Faulty(workers.backends[0], set=set_, finish=set_, append=append, get=get)
    options: dict[str, Any] = dict(ttl=60, liveness_timeout=30.0)
    async with workers.context(backend=faulty, **options) as W:

        async def first_attempt() -> None:
            async with W.writer("job") as first:
                await first.write("one")
                raise RuntimeError("the job failed")

        with pytest.raises(RuntimeError):
            await first_attempt()
        assert len(ends) == 1
        async with workers.context(1, **options) as C:
            async with C.writer("job", restart=True) as second:
                assert second.attempt == 2
                await second.write("two ")
                started.set()

                async def retried() -> bool:
                    return len(ends) > 1 or bool(asked)

                # The old attempt tries again (0.1 s, 0.2 s, ... after its first try).
                await poll_until(retried, True, timeout=10)
                assert await C.has_existing_stream("job") is True  # attempt 2 still runs
                assert await C.current_attempt("job") == 2
                reader = await C.resume_existing_stream("job")
                await second.write("done")
            assert await read(reader) == "two done"
            assert await C.has_existing_stream("job") == "DONE"


# A follower never records LOST over a sentinel that counts fewer elections than it found
# (seed 120465: its producer's end was lost on the way, the sentinel evicted, and a reader's
# INCR made it again, "1", for a new run whose INCR reply was slow; the follower, hearing
# nobody, wrote LOST over that new run and said its own producer, which ended well, died).


@pytest.mark.not_durable  # a durable follower reads the end from the log
async def test_a_follower_never_records_lost_over_a_sentinel_made_again(
    workers: Workers,
) -> None:
    request = workers.keys.request("s")
    live = workers.keys.live("s")
    sentinel = workers.keys.sentinel("s")
    source = TestingSource()
    silent = [False]  # what the producer publishes does not reach the follower
    replaced: list[str] = []

    def drop(channel: str, message: p.Message) -> bool:
        return channel == live and silent[0]

    async def publish(command: Any, channel: str, message: bytes) -> Any:
        if channel == request and silent[0]:
            return 0  # nobody subscribed: the new run's producer has not started yet
        return await command(channel, message)

    async def replace(command: Any, key: str, *args: Any) -> Any:
        if key == sentinel:
            replaced.append(key)
        return await command(key, *args)

    own = await workers.P.resumable_stream("s", source.make)
    source.write("hello ")
    options: dict[str, Any] = dict(resume_timeout=0.2, liveness_timeout=0.2)
    faulty = Faulty(Filtered(workers.backends[1], drop), publish=publish, replace=replace)
    async with workers.context(backend=faulty, **options) as C:
        with anyio.fail_after(10):
            follower = await C.resumable_stream("s", never_called)  # its INCR: 2
            assert follower is not None
            assert await read(follower, 1) == "hello "
            silent[0] = True
            # The producer ends; its end does not reach the follower. Its sentinel is evicted
            # and a reader's INCR makes it again for a new run (not started yet).
            source.write("world")
            source.close()
            assert await read(own) == "hello world"
            await workers.write(sentinel, "1")  # as INCR makes it, evicted
            with pytest.raises(rs.ProducerUnavailableError) as raised:
                await read(follower)
            assert not isinstance(raised.value, rs.ProducerLostError)
    assert not replaced  # no LOST written over the new run
    async with workers.backends[0].connect(lambda channel, data: None) as connection:
        assert await connection.get(sentinel) == "1"


# An attempt's end that lands after the next attempt started leaves that one be (seed 171560:
# the first attempt's end was held on a slow link while a follower, hearing nobody, recorded it
# LOST and the job's retry started attempt 2 from there; the late write set DONE over attempt 2
# running, and a reader was told there was nothing to resume).


@pytest.mark.not_durable  # a durable end is written with the log (its fence: issue notes)
async def test_an_end_that_lands_after_the_next_attempt_started_leaves_it(
    workers: Workers,
) -> None:
    sentinel = workers.keys.sentinel("job")
    started = anyio.Event()  # attempt 2 started: the held write lands now
    held: list[str] = []
    landed: list[str] = []

    async def hold(command: Any, key: str, *args: Any) -> Any:
        if key != sentinel or started.is_set():
            return await command(key, *args)
        held.append(key)
        await started.wait()
        result = await command(key, *args)
        landed.append(key)
        return result

    faulty = Faulty(workers.backends[0], set=hold, finish=hold)
    options: dict[str, Any] = dict(liveness_timeout=30.0)
    async with (
        workers.context(backend=faulty, **options) as W,
        workers.context(1, **options) as C,
        anyio.create_task_group() as tg,
    ):

        async def first_attempt() -> None:
            with contextlib.suppress(RuntimeError):
                async with W.writer("job") as first:
                    await first.write("one")
                    raise RuntimeError("the job failed")

        tg.start_soon(first_attempt)
        await poll_until(lambda: _true(held), True, timeout=10)  # its end is on its way
        await workers.write(sentinel, "LOST")  # a follower that heard nobody
        async with C.writer("job", restart=True) as second:
            assert second.attempt == 2
            await second.write("two ")
            started.set()
            await poll_until(lambda: _true(landed), True, timeout=10)  # the old end landed
            assert await C.has_existing_stream("job") is True
            reader = await C.resume_existing_stream("job")
            await second.write("done")
        assert await read(reader) == "two done"
        assert await C.has_existing_stream("job") == "DONE"


async def _true(items: list[str]) -> bool:
    return bool(items)


# A heartbeat that could not be published does not silence a live producer (seed 234885: one
# publish failed, the producer published nothing more while idle, and its follower, whose
# requests then reached nobody for a while, took it for dead).


@pytest.mark.parametrize("durable", [False, True], ids=["memory-only", "durable"])
async def test_a_failed_heartbeat_does_not_silence_a_live_producer(workers: Workers) -> None:
    live = workers.keys.live("s")
    request = workers.keys.request("s")
    failed: list[bytes] = []
    beats: list[bytes] = []  # heartbeats published since the one that failed
    deaf = [False]  # the follower's requests reach nobody (the producer's subscriber is down)

    async def publish(command: Any, channel: str, message: bytes) -> Any:
        if channel == live and isinstance(p.parse(message), p.Heartbeat):
            if not failed:
                failed.append(message)
                raise rs.BackendError("publish: no reply in time")
            beats.append(message)
        return await command(channel, message)

    async def ask(command: Any, channel: str, message: bytes) -> Any:
        if channel == request and deaf[0]:
            return 0
        return await command(channel, message)

    async def heard(count: int) -> bool:
        return len(beats) >= count

    options: dict[str, Any] = dict(liveness_timeout=0.3, resume_timeout=0.3)
    source = TestingSource()
    async with (
        workers.context(backend=Faulty(workers.backends[0], publish=publish), **options) as P,
        workers.context(backend=Faulty(workers.backends[1], publish=ask), **options) as C,
    ):
        own = await P.resumable_stream("s", source.make)
        source.write("hello ")
        with anyio.fail_after(10):
            follower = await C.resume_existing_stream("s", resume_at=0)
            assert follower is not None
            assert await read(follower, 1) == "hello "
            deaf[0] = True
            # Idle for twice the liveness timeout after the failed heartbeat: the next ones
            # come all the same (a heartbeat is due every third of it).
            await poll_until(lambda: heard(6), True, timeout=5)
            deaf[0] = False
            source.write("world")
            source.close()
            assert await read(follower) == "world"
            assert await read(own) == "hello world"


# A first attempt writes its end though an earlier stream of its id left a count of restarts
# (seed 264320, against a fence of the end by the count alone: the sentinel evicted, the count
# kept, a reader's INCR elected a new stream, and its end, taken for an older attempt's, was
# never written: its readers took it for dead).


async def test_a_first_attempt_ends_though_an_earlier_count_of_restarts_is_left(
    workers: Workers,
) -> None:
    for stream_id in ("s", "job"):
        await workers.write(workers.keys.restarts(stream_id), "1")  # its sentinel was evicted
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("hello")
    source.close()
    assert await read(own) == "hello"
    async with workers.P.writer("job") as w:
        await w.write("done")
    async with workers.context() as C:
        with anyio.fail_after(5):
            await poll_until(lambda: C.has_existing_stream("s"), "DONE")
            await poll_until(lambda: C.has_existing_stream("job"), "DONE")
            assert await C.current_attempt("job") == 1  # a first attempt: its count is reset


async def test_a_first_attempts_end_retried_is_written_though_an_earlier_count_is_left(
    workers: Workers,
) -> None:
    """The same count left by an earlier stream, and the first write of the end refused: its
    retry writes it (a retry that asked the count whether a newer attempt started would take
    that count for one, and leave the stream running with nobody writing it)."""
    sentinel = workers.keys.sentinel("s")
    await workers.write(workers.keys.restarts("s"), "1")  # its sentinel was evicted
    refused: list[str] = []

    async def set_(command: Any, key: str, *args: Any) -> Any:
        if key == sentinel and not refused:
            refused.append(key)
            raise rs.BackendError("set: no reply in time")
        return await command(key, *args)

    source = TestingSource()
    async with workers.context(backend=Faulty(workers.backends[0], set=set_)) as P:
        own = await P.resumable_stream("s", source.make)
        source.write("hello")
        source.close()
        assert await read(own) == "hello"
        with anyio.fail_after(5):
            await poll_until(lambda: P.has_existing_stream("s"), "DONE")
    assert refused
