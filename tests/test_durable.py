"""Durable streams on a real redis-server, the way they fail in production: a producer process
killed, readers long after the end on other processes, Redis restarted with and without
persistence, and its stored text evicted under memory pressure.

The contract suite runs in durable mode too (the modules with `DURABLE = True`); these tests
are about what only a real server and real processes show.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import anyio
import pytest
import redis.asyncio

import resumable_stream as rs
from resumable_stream._protocol import Keys
from resumable_stream.redis import RedisBackend

from .conftest import RedisServer, start_redis_server
from .helpers import TestingSource, never_called, poll_until, read

pytestmark = pytest.mark.anyio

FLUSH = 0.05  # the flush window of these tests' producers


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# The producer of the kill test: a chunk every 2 ms, each reported on stdout once yielded.
PRODUCER = textwrap.dedent(
    """
    import sys, anyio, resumable_stream as rs
    from resumable_stream.redis import RedisBackend

    async def chunks():
        for i in range(100_000):
            yield f"c{i};"
            print(i, flush=True)
            await anyio.sleep(0.002)

    async def main():
        async with rs.ResumableStreamContext(
            backend=RedisBackend(sys.argv[1]), key_prefix=sys.argv[2], durable=True,
            flush_interval=float(sys.argv[3]),
        ) as ctx:
            stream = await ctx.resumable_stream("victim", chunks)
            async for _ in stream:
                pass

    anyio.run(main)
    """
)

# Readers in a process of their own: `count` followers of the stream (or one reader from each
# offset given), each printed as JSON: its text and how it ended.
READERS = textwrap.dedent(
    """
    import json, sys, anyio, resumable_stream as rs
    from resumable_stream.redis import RedisBackend

    async def read(ctx, offset):
        text, error = [], None
        try:
            stream = await ctx.resume_existing_stream(sys.argv[3], offset)
            if stream is None:
                return {"offset": offset, "text": None, "error": None}
            print("following", flush=True)
            async for chunk in stream:
                text.append(chunk)
        except rs.ResumableStreamError as exc:
            error = type(exc).__name__
        return {"offset": offset, "text": "".join(text), "error": error}

    async def main():
        offsets = [int(o) for o in sys.argv[4].split(",")]
        async with rs.ResumableStreamContext(
            backend=RedisBackend(sys.argv[1]), key_prefix=sys.argv[2], durable=True,
            liveness_timeout=1.0,
        ) as ctx:
            results = []
            async with anyio.create_task_group() as tg:
                async def one(offset):
                    results.append(await read(ctx, offset))
                for offset in offsets:
                    tg.start_soon(one, offset)
            print("result " + json.dumps(results), flush=True)

    anyio.run(main)
    """
)


async def readers_process(
    url: str, prefix: str, stream_id: str, offsets: list[int]
) -> tuple[Any, list[dict[str, Any]]]:
    """Start a process of readers; returns it once every reader follows, and a list that gets
    their results when the process ends."""
    command = [sys.executable, "-c", READERS, url, prefix, stream_id, ",".join(map(str, offsets))]
    process = await anyio.open_process(command, stderr=None)
    return process, []


async def lines(process: Any) -> AsyncIterator[str]:
    assert process.stdout is not None
    pending = b""
    async for data in process.stdout:
        pending += data
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode()


async def result_of(process: Any) -> list[dict[str, Any]]:
    async for line in lines(process):
        if line.startswith("result "):
            await process.wait()
            return list(json.loads(line.removeprefix("result ")))
    raise AssertionError("the readers' process ended without a result")


async def wait_following(process: Any, count: int) -> None:
    seen = 0
    async for line in lines(process):
        seen += line == "following"
        if seen == count:
            return


def expected_text(count: int) -> str:
    return "".join(f"c{i};" for i in range(count))


async def test_a_killed_producer_loses_at_most_its_flush_window(redis_server: RedisServer) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    url = redis_server.url
    command = [sys.executable, "-c", PRODUCER, url, prefix, str(FLUSH)]
    async with await anyio.open_process(command, stderr=None) as producer:
        produced: list[float] = []  # when each chunk was reported (it was produced before)
        reports = lines(producer)
        with anyio.fail_after(20):
            async for _line in reports:
                produced.append(anyio.current_time())
                if len(produced) == 50:
                    break
        # 5 followers in 2 other processes, attached while the stream runs.
        first = await anyio.open_process(
            [sys.executable, "-c", READERS, url, prefix, "victim", "0,0,7"], stderr=None
        )
        second = await anyio.open_process(
            [sys.executable, "-c", READERS, url, prefix, "victim", "0,13"], stderr=None
        )
        with anyio.fail_after(20):
            await wait_following(first, 3)
            await wait_following(second, 2)
            async for _line in reports:  # a little more text, while they follow
                produced.append(anyio.current_time())
                if len(produced) == 200:
                    break
        producer.send_signal(signal.SIGKILL)
        killed_at = anyio.current_time()
        await producer.wait()
    # Every chunk produced a flush window (and some scheduling slack) before the kill was
    # stored, so every reader must have it.
    stored_surely = sum(1 for t in produced if t < killed_at - FLUSH - 0.05)
    with anyio.fail_after(30):
        followers = await result_of(first) + await result_of(second)
    assert len(followers) == 5
    full = expected_text(100_000)
    texts = set()
    for follower in followers:
        offset, text = follower["offset"], follower["text"]
        assert follower["error"] == "ProducerLostError", follower
        assert full[offset:].startswith(text)  # an exact prefix: nothing twice, nothing out
        texts.add(full[:offset] + text)
    assert len(texts) == 1  # every reader got the same text
    [got] = texts
    assert got.startswith(expected_text(stored_surely))
    # A reader arriving later, in a third process: the same text and the same error.
    late = await anyio.open_process(
        [sys.executable, "-c", READERS, url, prefix, "victim", "0"], stderr=None
    )
    with anyio.fail_after(20):
        [reader] = await result_of(late)
    assert (reader["text"], reader["error"]) == (got, "ProducerLostError")


async def test_a_finished_stream_is_read_long_after_its_end_on_another_process(
    redis_server: RedisServer,
) -> None:
    prefix = f"late-{uuid.uuid4().hex[:8]}"
    linger = 0.2
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        async with rs.ResumableStreamContext(
            backend=RedisBackend(redis_server.url),
            key_prefix=prefix,
            durable=True,
            linger=linger,
        ) as P:
            source = TestingSource()
            own = await P.resumable_stream("done", source.make)
            chunks: list[str | rs.Event] = ["first chunk; ", rs.Event("named", "tag"), " last"]
            for chunk in chunks:
                source.write(chunk)
            source.close()
            assert await read(own) == "first chunk; named last"
            # Nobody lingers any more: nobody holds the text but Redis.
            request = Keys(prefix).request("done")
            await poll_until(lambda: _subscribers(admin, request), 0)
            process = await anyio.open_process(
                [sys.executable, "-c", READERS, redis_server.url, prefix, "done", "0,6,23"],
                stderr=None,
            )
            with anyio.fail_after(20):
                results = {r["offset"]: r for r in await result_of(process)}
        assert results[0] == {"offset": 0, "text": "first chunk; named last", "error": None}
        assert results[6] == {"offset": 6, "text": "chunk; named last", "error": None}
        # At the end: nothing to read (the SSE layer's 204).
        assert results[23] == {"offset": 23, "text": None, "error": None}
    finally:
        await admin.aclose()


async def _subscribers(admin: redis.asyncio.Redis, channel: str) -> int:
    [(_, count)] = await admin.pubsub_numsub(channel)
    return int(count)


# Restarts


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    server = start_redis_server(None, "--appendonly", "yes", "--appendfsync", "always")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def volatile_server() -> Iterator[RedisServer]:
    server = start_redis_server()
    try:
        yield server
    finally:
        server.stop()


def _restart(server: RedisServer, *args: str) -> RedisServer:
    """Stop the server and start it again on its port, in its directory (with its AOF)."""
    assert server.port is not None
    assert server.process is not None
    command = [str(arg) for arg in server.process.args]  # type: ignore[union-attr]
    workdir = command[command.index("--dir") + 1]
    server.stop()
    return start_redis_server(server.port, "--dir", workdir, *args)


async def stored_length(admin: redis.asyncio.Redis, key: str) -> int:
    """How much text a durable stream's log holds (its batches' characters)."""
    total = 0
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await admin.xrange(key))
    for entry_id, fields in entries:
        if entry_id.endswith(b"-1"):
            [value] = fields.values()
            total += sum(len(c if isinstance(c, str) else c[0]) for c in json.loads(value))
    return total


@pytest.mark.parametrize("persistence", ["aof", "none"])
async def test_a_restart_mid_stream_never_serves_wrong_text(
    request: pytest.FixtureRequest, persistence: str
) -> None:
    server: RedisServer = request.getfixturevalue(
        "aof_server" if persistence == "aof" else "volatile_server"
    )
    args = ("--appendonly", "yes", "--appendfsync", "always") if persistence == "aof" else ()
    options: dict[str, Any] = {
        "key_prefix": f"restart-{uuid.uuid4().hex[:8]}",
        "durable": True,
        "flush_interval": 0.01,
        "liveness_timeout": 1.0,
    }
    async with (
        rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as P,
        rs.ResumableStreamContext(backend=RedisBackend(server.url), **options) as C,
    ):
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        followers = [await C.resume_existing_stream("s") for _ in range(2)]
        source.write("before; ")
        for reader in [own, *followers]:
            assert await read(reader, 1) == "before; "
        stored = Keys(options["key_prefix"]).text("s")
        admin = redis.asyncio.Redis.from_url(server.url)
        try:
            await poll_until(lambda: stored_length(admin, stored), len("before; "))
        finally:
            await admin.aclose()
        restarted = _restart(server, *args)
        try:
            source.write("during; ")
            source.write("after")
            # Without persistence the stored text is gone: the producer writes it again once
            # its context is back. A reader never gets a shorter or shifted text meanwhile.
            admin = redis.asyncio.Redis.from_url(restarted.url)
            try:
                whole = len("before; during; after")
                await poll_until(lambda: stored_length(admin, stored), whole, timeout=10)
            finally:
                await admin.aclose()
            late = await C.resume_existing_stream("s")
            source.close()
            assert await read(own) == "during; after"
            with anyio.fail_after(15):
                for follower in followers:
                    assert await read(follower) == "during; after"
                assert await read(late) == "before; during; after"
        finally:
            restarted.stop()


# Eviction


async def test_evicted_stored_text_is_an_error_never_a_shorter_text(
    volatile_server: RedisServer,
) -> None:
    admin = redis.asyncio.Redis.from_url(volatile_server.url)
    prefix = f"evict-{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    options: dict[str, Any] = {"key_prefix": prefix, "durable": True, "linger": 0}
    try:
        async with (
            rs.ResumableStreamContext(backend=RedisBackend(volatile_server.url), **options) as P,
            rs.ResumableStreamContext(backend=RedisBackend(volatile_server.url), **options) as C,
        ):
            # A running stream whose stored text Redis evicts: its producer's reader is
            # unharmed, and a reader from offset 0 gets the text from the producer.
            running = TestingSource()
            own = await P.resumable_stream("running", running.make)
            running.write("kept in memory; ")
            assert await read(own, 1) == "kept in memory; "
            # A finished stream, whose producer is gone: only Redis has its text.
            done = TestingSource()
            finished = await P.resumable_stream("finished", done.make)
            done.write("only in redis")
            done.close()
            assert await read(finished) == "only in redis"
            texts = [keys.text("running"), keys.text("finished")]
            await poll_until(lambda: admin.exists(*texts), 2)
            # Under volatile-lru only keys with a TTL go; the states lose theirs, so that only
            # the texts and the fillers can. Redis's LRU clock counts seconds: once the texts
            # have been idle for two, they are the coldest keys, and go first.
            for name in ("running", "finished"):
                await admin.persist(keys.sentinel(name))
            for text in texts:
                await poll_until(functools.partial(admin.object, "idletime", text), 2, timeout=10)
            await admin.config_set("maxmemory-samples", 10)
            await admin.config_set("maxmemory", 4 << 20)
            await admin.config_set("maxmemory-policy", "volatile-lru")
            with anyio.fail_after(30):
                i = 0
                while await admin.exists(*texts):
                    await admin.set(f"filler:{i}", "x" * 65536, ex=3600)
                    i += 1
            await admin.config_set("maxmemory", 0)
            assert await C.has_existing_stream("finished") == "DONE"
            with anyio.fail_after(10), pytest.raises(rs.StreamIncompleteError):
                await C.resume_existing_stream("finished", 3)
            reader = await C.resumable_stream("running", never_called, 0)
            running.write("and after")
            running.close()
            assert await read(own) == "and after"
            with anyio.fail_after(10):
                assert await read(reader) == "kept in memory; and after"
    finally:
        await admin.aclose()


async def test_a_burst_is_stored_in_bounded_entries_by_one_command(
    redis_server: RedisServer,
) -> None:
    """What a flush window gathered goes in one command, as entries of at most ENTRY_CHARS
    characters (so a reader resuming mid-entry fetches one small entry), and a reader resuming
    from any of them, mid-entry or at a boundary, gets the exact text."""
    prefix = f"burst-{uuid.uuid4().hex[:8]}"
    chunks = [f"{i:05d}" + "x" * 995 for i in range(100)]  # 100,000 characters
    text = "".join(chunks)
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    key = Keys(prefix).text("burst")
    try:
        async with (
            rs.ResumableStreamContext(
                backend=RedisBackend(redis_server.url), key_prefix=prefix, durable=True
            ) as P,
            rs.ResumableStreamContext(
                backend=RedisBackend(redis_server.url), key_prefix=prefix, durable=True
            ) as C,
        ):
            source = TestingSource()
            for chunk in chunks:
                source.write(chunk)
            evals = await _calls(admin, "eval")
            own = await P.resumable_stream("burst", source.make)
            assert await read(own, len(chunks)) == text
            await poll_until(lambda: admin.xlen(key), 4)
            assert await _calls(admin, "eval") == evals + 1
            entries = await admin.xrange(key) or []
            batches = [json.loads(v) for _, fields in entries for v in (fields or {}).values()]
            sizes = [sum(len(chunk) for chunk in batch) for batch in batches]
            assert sizes == [30_000, 30_000, 30_000, 10_000]
            followers = {
                offset: await C.resume_existing_stream("burst", offset)
                for offset in (0, 29_999, 30_000, 45_678, 99_999)
            }
            source.close()
            for offset, follower in followers.items():
                assert await read(follower) == text[offset:]
            assert await read(own) == ""
    finally:
        await admin.aclose()


async def _calls(admin: redis.asyncio.Redis, command: str) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
