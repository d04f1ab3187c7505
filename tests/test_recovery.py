"""Lost messages, a second producer, a lost answer: readers get exact text or a typed error.

The contract tests act out the losses with a filtering backend wrapper on every backend; the
tests below them make Redis itself lose or evict (a subscriber dropped for falling behind, keys
evicted under memory pressure, a write refused by a full Redis).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio

import resumable_stream as rs
from resumable_stream import _protocol as p
from resumable_stream.redis import RedisBackend

from .conftest import RedisServer, Workers, start_redis_server
from .helpers import Filtered, TestingSource, never_called, poll_until, read, read_chunks
from .helpers import read_until_error as read_to_its_error
from .tcp_proxy import TcpProxy

pytestmark = pytest.mark.anyio

DURABLE = True  # conftest: every `workers` test here runs in both modes


class DropFirst:
    """Drops the first `count` messages of a kind (that `also` accepts)."""

    def __init__(self, kind: type, count: int = 1, also: Any = None) -> None:
        self.kind, self.left, self.also = kind, count, also
        self.dropped: list[p.Message] = []

    def __call__(self, channel: str, message: p.Message) -> bool:
        if self.left and type(message) is self.kind and (self.also is None or self.also(message)):
            self.left -= 1
            self.dropped.append(message)
            return True
        return False


# Gaps in the live offsets


async def test_a_lost_live_batch_is_asked_for_again(workers: Workers) -> None:
    drop = DropFirst(p.Live)
    source = TestingSource()
    async with workers.context(backend=Filtered(workers.backends[1], drop)) as C:
        own = await workers.P.resumable_stream("s", source.make)
        follower = await C.resume_existing_stream("s")
        source.write("one ")
        assert await read(own, 1) == "one "
        with anyio.fail_after(5):
            while not drop.dropped:  # the batch carrying "one " never reaches C
                await anyio.lowlevel.checkpoint()
        source.write("two ")
        source.write("three")
        source.close()
        # The next batch starts past what arrived: the follower asks for the rest.
        assert await read(follower) == "one two three"


@pytest.mark.parametrize("workers", [{"liveness_timeout": 2.4}], indirect=True)
async def test_a_heartbeat_reveals_a_batch_lost_before_the_producer_fell_idle(
    workers: Workers,
) -> None:
    drop = DropFirst(p.Live)
    source = TestingSource()
    lossy = Filtered(workers.backends[1], drop)
    async with workers.context(backend=lossy, liveness_timeout=2.4) as C:
        await workers.P.resumable_stream("s", source.make)
        follower = await C.resume_existing_stream("s")
        source.write("only words")
        # Nothing follows the lost batch but heartbeats (every 0.8 s), which say how long the
        # text is: the follower asks after the first, long before it would find silence. (A
        # durable stream's follower asked nothing, so its producer sends no heartbeats: it asks
        # after two silent periods, and gets the text from the log.)
        with anyio.fail_after(3.2 if workers.durable else 1.6):
            assert await read(follower, 1) == "only words"
        source.close()
        assert await read(follower) == ""


async def test_an_end_past_what_arrived_asks_for_the_rest(workers: Workers) -> None:
    drop = DropFirst(p.Live)
    source = TestingSource()
    async with workers.context(backend=Filtered(workers.backends[1], drop)) as C:
        own = await workers.P.resumable_stream("s", source.make)
        follower = await C.resume_existing_stream("s")
        source.write("the last words")
        source.close()
        assert await read(own) == "the last words"
        # The end says 14 characters; the producer lingers and sends them.
        assert await read(follower) == "the last words"


@pytest.mark.parametrize("workers", [{"liveness_timeout": 0.5}], indirect=True)
async def test_text_lost_after_the_producer_left_is_a_typed_error(workers: Workers) -> None:
    # Both the last batch and the end are lost, and the producer does not linger.
    lossy = Filtered(workers.backends[1], lambda channel, message: type(message) in (p.Live, p.End))
    source = TestingSource()
    # `linger` is the deployment's, the same on every context (a reader tells by it whether a
    # producer that does not answer should still be there).
    async with workers.context(backend=lossy, liveness_timeout=0.5, linger=0) as C:
        async with workers.context(0, linger=0) as P:
            own = await P.resumable_stream("s", source.make)
            follower = await C.resume_existing_stream("s")
            source.write("lost")
            source.close()
            assert await read(own) == "lost"
        if workers.durable:
            # The log kept the text, and the end: nothing is lost.
            with anyio.fail_after(5):
                assert await read(follower) == "lost"
            return
        # Never a shorter text passed off as the whole: a typed error.
        with anyio.fail_after(5), pytest.raises(rs.StreamIncompleteError):
            await read(follower)


# A second producer under one id (the backend forgot the running stream)


async def test_a_follower_never_merges_two_producers(workers: Workers) -> None:
    first, second = TestingSource(), TestingSource()
    async with workers.context() as D:
        await workers.P.resumable_stream("s", first.make)
        follower = await workers.C.resume_existing_stream("s")
        first.write("ab ")
        assert await read(follower, 1) == "ab "
        # The sentinel is evicted: the next INCR says 1, and a second producer starts.
        await workers.write(workers.keys.sentinel("s"), "0")
        await workers.C.resumable_stream("s", second.make)
        second.write("0123456789")
        late = await D.resumable_stream("s", never_called)  # asks both producers
        assert late is not None
        first.write("cd ")
        second.write("0123456789")
        for reader, before in ((follower, "ab "), (late, "")):
            text, error = await read_until_error(reader)
            text = before + text
            assert isinstance(error, rs.ProducerConflictError)
            # Never a mix: what arrived before the error came from one producer.
            assert "ab cd ".startswith(text) or "01234567890123456789".startswith(text), text
        first.close()
        second.close()


async def read_until_error(
    reader: rs.ResumableStream | None,
) -> tuple[str, BaseException | None]:
    with anyio.fail_after(5):
        return await read_to_its_error(reader)


# A lost answer


@pytest.mark.not_durable
@pytest.mark.parametrize("workers", [{"resume_timeout": 0.3}], indirect=True)
async def test_a_lost_replay_of_a_finished_stream_is_unavailable_not_none(
    workers: Workers,
) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("0123456789" * 10)
    source.close()
    assert len(await read(own)) == 100  # finished; the producer lingers with the text
    lossy = Filtered(workers.backends[1], lambda channel, message: type(message) is p.Replay)
    async with workers.context(backend=lossy, resume_timeout=0.3) as C:
        with anyio.fail_after(5), pytest.raises(rs.ProducerUnavailableError):
            await C.resume_existing_stream("s", resume_at=10)
    # Asked again without losses, the reader gets its 90 characters.
    assert len(await read(await workers.C.resume_existing_stream("s", resume_at=10))) == 90


@pytest.mark.not_durable
@pytest.mark.parametrize("workers", [{"resume_timeout": 0.3}], indirect=True)
async def test_a_lost_replay_of_a_stream_that_finishes_meanwhile_is_unavailable(
    workers: Workers,
) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("0123456789")
    assert await read(own, 1) == "0123456789"

    def drop(channel: str, message: p.Message) -> bool:
        if type(message) is p.Replay:
            source.close()  # the stream ends while the follower waits for its lost answer
            return True
        return False

    async with workers.context(
        backend=Filtered(workers.backends[1], drop), resume_timeout=0.3
    ) as C:
        with anyio.fail_after(5), pytest.raises(rs.ProducerUnavailableError):
            await C.resume_existing_stream("s", resume_at=4)


# The producer's own reader shares the event loop


async def test_reading_a_large_buffer_lets_other_tasks_run(workers: Workers) -> None:
    n = 50_000

    async def ready_chunks() -> AsyncIterator[str]:
        for i in range(n):
            yield "x"
            if i == n - 1:
                await anyio.sleep_forever()  # keep the stream running: reads stay local

    own = await workers.P.resumable_stream("s", ready_chunks)
    # Once this reader has the last chunk, the producer's buffer holds every one.
    assert await read(await workers.P.resume_existing_stream("s", n - 1), 1) == "x"
    reader = await workers.P.resume_existing_stream("s")
    assert reader is not None
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(count_turns)
        await anyio.lowlevel.checkpoint()
        before = turns
        for _ in range(n):  # every chunk is in memory: nothing to wait for
            await reader.__anext__()
        during = turns - before
        tg.cancel_scope.cancel()
    # One turn of the other task at least every 1,024 chunks, not none until the end.
    assert during >= n // 1024 - 1
    await workers.P.cancel_stream("s")
    with pytest.raises(rs.StreamCancelledError):
        await read(own)


# On a real redis-server


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


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_followers_dropped_by_redis_for_falling_behind_recover_exactly(
    server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    # Redis drops a subscriber whose unread output passes 1 MiB; the subscriber of C is
    # stalled behind a proxy while a 16 MiB burst is published, so both of its followers lose
    # text, while a follower in D keeps the producer publishing. Messages of 4 KiB: Valkey
    # counts a large message in a subscriber's output by reference, not by size.
    await admin.config_set("client-output-buffer-limit", "pubsub 1048576 524288 60")
    assert server.port is not None
    chunk = "0123456789abcdef" * 64  # 1 KiB
    count = 16 * 1024
    # A long liveness timeout: the followers must recover from the gap itself, not from a
    # silence probe.
    options: dict[str, Any] = {
        "key_prefix": "burst",
        "max_message_size": 4 << 10,
        "liveness_timeout": 10.0,
    }
    with TcpProxy(server.port) as proxy:
        behind = redis.asyncio.Redis(port=proxy.port, socket_timeout=None, client_name="behind")
        try:
            async with (
                rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as P,
                rs.ResumableStreamContext(backend=RedisBackend(behind), **options) as C,
                rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as D,
            ):
                source = TestingSource()
                own = await P.resumable_stream("s", source.make)
                followers = [await C.resume_existing_stream("s") for _ in range(2)]
                followers.append(await D.resume_existing_stream("s"))
                source.write("start;")
                for follower in followers:
                    assert await read(follower, 1) == "start;"
                [subscriber] = [
                    c["id"]
                    for c in await admin.client_list(_type="pubsub")
                    if c.get("name") == "behind"
                ]
                proxy.stall()
                for _ in range(count):
                    source.write(chunk)
                assert len(await read_chunks(own, count + 1)) == count + 1
                # Redis drops the subscriber (its connection is gone from CLIENT LIST).
                await poll_until(lambda: _connected(admin, subscriber), False, timeout=20)
                proxy.resume()
                source.write(";end")
                source.close()
                for follower in followers:
                    with anyio.fail_after(30):
                        text = await read(follower)
                    assert text == chunk * count + ";end"
        finally:
            proxy.resume()
            await behind.aclose()


async def _connected(admin: redis.asyncio.Redis, client_id: str) -> bool:
    return any(c["id"] == client_id for c in await admin.client_list())


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_sentinel_evicted_by_redis_never_mixes_two_texts(
    server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    await admin.config_set("maxmemory", 4 << 20)
    await admin.config_set("maxmemory-policy", "allkeys-lru")
    options: dict[str, Any] = {"key_prefix": "evict"}
    url = server.url
    async with (
        rs.ResumableStreamContext(backend=RedisBackend(url), **options) as P,
        rs.ResumableStreamContext(backend=RedisBackend(url), **options) as C,
        rs.ResumableStreamContext(backend=RedisBackend(url), **options) as D,
    ):
        first, second = TestingSource(), TestingSource()
        await P.resumable_stream("s", first.make)
        follower = await C.resume_existing_stream("s")
        first.write("ab ")
        assert await read(follower, 1) == "ab "
        sentinel = p.Keys("evict").sentinel("s")
        with anyio.fail_after(20):
            i = 0
            while await admin.exists(sentinel):  # memory pressure until LRU evicts it
                await admin.set(f"filler:{i}", "x" * 65536)
                i += 1
        await C.resumable_stream("s", second.make)  # elected again: a second producer
        second.write("0123456789")
        late = await D.resumable_stream("s", never_called)
        assert late is not None
        first.write("cd ")
        second.write("0123456789")
        for reader in (follower, late):
            with anyio.fail_after(5), pytest.raises(rs.ProducerConflictError):
                await read(reader)
        first.close()
        second.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("stored", [False, True], ids=["memory-only", "durable"])
async def test_an_end_that_cannot_be_written_is_announced_and_written_later(
    server: RedisServer, admin: redis.asyncio.Redis, stored: bool
) -> None:
    await admin.config_set("maxmemory-policy", "noeviction")
    # No lingering: the end must reach the follower by its announcement (heartbeats, which
    # would also tell, come only every 10 s here), and the producer stays until its state is
    # written. Durable: the text after "all " cannot be stored either, so the follower gets it
    # from the producer.
    options: dict[str, Any] = {
        "key_prefix": f"full-{stored}",
        "linger": 0,
        "liveness_timeout": 30,
        "durable": stored,
    }
    async with (
        rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as P,
        rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as C,
    ):
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        follower = await C.resume_existing_stream("s")
        source.write("all ")
        assert await read(follower, 1) == "all "
        await admin.config_set("maxmemory", 1)  # from now on every write is refused
        source.write("done")
        source.close()
        assert await read(own) == "all done"
        with anyio.fail_after(2):
            assert await read(follower) == "done"  # a clean end, not ProducerLostError
        assert await C.has_existing_stream("s") is True  # the write was refused...
        await admin.config_set("maxmemory", 0)
        await poll_until(lambda: C.has_existing_stream("s"), "DONE")  # ...and retried
        assert await C.resume_existing_stream("s") is None
        assert await C.resumable_stream("s", never_called) is None
