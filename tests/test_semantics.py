"""The numbered semantics of the core issue, on every backend."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import resumable_stream as rs
from resumable_stream import _protocol as p

from .conftest import Workers
from .helpers import Filtered, TestingSource, never_called, poll_until, read, read_chunks

pytestmark = pytest.mark.anyio

DURABLE = True  # conftest: every `workers` test here runs in both modes


# 1. Election and producer lifetime


async def test_exactly_one_producer_among_many_concurrent_callers(workers: Workers) -> None:
    source = TestingSource()
    results: list[str] = []
    joined = 0
    all_joined = anyio.Event()

    async def call(ctx: rs.ResumableStreamContext) -> None:
        nonlocal joined
        stream = await ctx.resumable_stream("race", source.make)
        joined += 1
        if joined == 20:
            all_joined.set()
        results.append(await read(stream))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(call, workers.P if i % 2 else workers.C)
            await all_joined.wait()
            source.write("a")
            source.write("b")
            source.close()
    assert source.calls == 1
    assert results == ["ab"] * 20


async def test_producer_outlives_its_reader(workers: Workers) -> None:
    source = TestingSource()
    stream = await workers.P.resumable_stream("s", source.make)
    assert stream is not None
    source.write("1")
    assert await read(stream, 1) == "1"
    await stream.aclose()
    source.write("2")
    source.close()
    with anyio.fail_after(5):
        await source.finished.wait()
        await poll_until(lambda: workers.C.has_existing_stream("s"), "DONE")
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_producer_runs_in_the_context_not_the_caller(workers: Workers) -> None:
    source = TestingSource()
    with anyio.CancelScope() as scope:
        stream = await workers.P.resumable_stream("s", source.make)
        scope.cancel()
    assert stream is not None
    source.write("still")
    follower = await workers.C.resume_existing_stream("s")
    source.write(" running")
    source.close()
    assert await read(stream) == "still running"
    assert await read(follower) == "still running"


# 2. Every reader gets exactly full_text[resume_at:]


@pytest.mark.parametrize("resume_at", [0, 1, 3, 4, 5, 9, 10, 11, 100])
async def test_resume_at_anywhere(workers: Workers, resume_at: int) -> None:
    """Offsets mid-chunk, beyond what is buffered, and beyond the end; for both kinds of reader."""
    full = "abcd" + "efg" + "hij"
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make, resume_at)
    source.write("abcd")
    follower = await workers.C.resumable_stream("s", never_called, resume_at)
    source.write("efg")
    source.write("hij")
    source.close()
    assert await read(own) == full[resume_at:]
    assert await read(follower) == full[resume_at:]


async def test_offsets_count_python_characters(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("😀é")
    source.write("𝄞x")
    assert await read(own, 2) == "😀é𝄞x"
    follower = await workers.C.resumable_stream("s", never_called, 3)
    source.write("ü")
    source.close()
    assert await read(follower) == "xü"


async def test_a_reader_waits_for_an_offset_not_yet_produced(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("ab")
    assert await read(own, 1) == "ab"
    follower = await workers.C.resumable_stream("s", never_called, 5)
    assert follower is not None
    got: list[str] = []

    async def consume() -> None:
        got.extend(await read_chunks(follower))

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        source.write("cd")
        source.write("efgh")
        source.close()
    assert got == ["fgh"]


# 3. Chunk boundaries survive live delivery and replay


async def test_chunk_boundaries_are_preserved(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    for chunk in ("alpha ", "beta ", "gamma "):
        source.write(chunk)
    assert await read_chunks(own, 3) == ["alpha ", "beta ", "gamma "]
    follower = await workers.C.resumable_stream("s", never_called, 8)
    source.write("delta ")
    source.write("eps")
    source.close()
    assert await read_chunks(follower) == ["ta ", "gamma ", "delta ", "eps"]
    assert await read_chunks(own) == ["delta ", "eps"]


@pytest.mark.parametrize("workers", [{"max_message_size": 7}], indirect=True)
async def test_chunks_larger_than_a_message_are_split_and_rejoined(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    big = "0123456789" * 3
    source.write(big)
    source.write("xy")
    assert await read_chunks(own, 2) == [big, "xy"]
    follower = await workers.C.resumable_stream("s", never_called, 4)
    source.write("z" * 20)
    source.write("!")
    source.close()
    assert await read_chunks(follower) == [big[4:], "xy", "z" * 20, "!"]


# 4. Requests are answered whatever the timing, and never hang


async def test_request_before_the_producer_subscribed(workers: Workers) -> None:
    for i in range(10):
        source = TestingSource()
        own = await workers.P.create_new_resumable_stream(f"s{i}", source.make)
        follower = await workers.C.resume_existing_stream(f"s{i}")
        source.write("x")
        source.close()
        assert await read(own) == "x"
        assert await read(follower) == "x"


async def test_a_source_that_never_awaits_does_not_starve_followers(workers: Workers) -> None:
    stop = False
    produced: list[str] = []

    async def busy() -> AsyncIterator[str]:
        i = 0
        while not stop:  # never awaits: only the producer's own checkpoints let others run
            chunk = f"{i},"
            produced.append(chunk)
            yield chunk
            i += 1

    own = await workers.P.resumable_stream("s", busy)
    assert own is not None
    with anyio.fail_after(10):
        follower = await workers.C.resume_existing_stream("s", 5)
    stop = True
    full = "".join(await read_chunks(own))
    assert full == "".join(produced)
    assert await read(follower) == full[5:]


@pytest.mark.parametrize(
    "workers", [{"resume_timeout": 0.2, "liveness_timeout": 1.0}], indirect=True
)
async def test_no_producer_answering_raises_instead_of_hanging(workers: Workers) -> None:
    # A sentinel whose producer is gone: nobody listens on the request channel.
    await workers.write(workers.keys.sentinel("orphan"), "1")
    if workers.durable:
        # A durable stream's reader needs no answer to start: it reads the (empty) log, then
        # learns that the producer is gone: after a silence of liveness_timeout, and as long
        # again of requests that reach nobody (the producer never heard of this reader).
        reader = await workers.C.resume_existing_stream("orphan")
        with anyio.fail_after(8), pytest.raises(rs.ProducerUnavailableError):
            await read(reader)
    else:
        with anyio.fail_after(5), pytest.raises(rs.ProducerUnavailableError):
            await workers.C.resume_existing_stream("orphan")
    with anyio.fail_after(5), pytest.raises(rs.ProducerUnavailableError):
        await workers.C.resumable_stream("orphan", never_called)


@pytest.mark.not_durable
@pytest.mark.parametrize("workers", [{"resume_timeout": 0.2}], indirect=True)
async def test_a_producer_that_never_answers_is_unavailable(workers: Workers) -> None:
    # A producer that is subscribed but never answers (its process hung).
    mute = Filtered(workers.backends[0], lambda channel, message: type(message) is p.Request)
    source = TestingSource()
    async with workers.context(0, backend=mute, resume_timeout=0.2) as P:
        own = await P.create_new_resumable_stream("mute", source.make)
        source.write("x")
        assert await read(own, 1) == "x"  # it runs, so it subscribed
        with anyio.fail_after(5), pytest.raises(rs.ProducerUnavailableError):
            await workers.C.resume_existing_stream("mute")
        source.close()
        assert await read(own) == ""


class LateLive:
    """A backend wrapper for two roles. A follower's connection subscribes its live channel
    only once `open` is set, so that the subscription lands after the producer published to
    nobody (what a follower risks on a real network, since it sends its request before its
    subscription is confirmed). A producer's connection sets `replied` once it answered a
    request, and `unheard` once it published a live batch that nobody received."""

    def __init__(self, inner: rs.Backend) -> None:
        self.inner = inner
        self.open = anyio.Event()
        self.replied = anyio.Event()
        self.unheard = anyio.Event()

    @asynccontextmanager
    async def connect(self, on_message: Any, on_reconnect: Any = None) -> AsyncIterator[Any]:
        async with self.inner.connect(on_message, on_reconnect) as connection:
            yield _LateLiveConnection(connection, self)


class _LateLiveConnection:
    def __init__(self, inner: rs.Connection, backend: LateLive) -> None:
        self._inner = inner
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def begin_subscribe(self, *channels: str) -> Awaitable[None]:
        async def later() -> None:
            await self._backend.open.wait()
            await self._inner.subscribe(*channels)

        return later()

    async def publish(self, channel: str, message: bytes) -> int:
        receivers = await self._inner.publish(channel, message)
        kind = type(p.parse(message))
        if kind is p.Replay:
            self._backend.replied.set()
        elif kind is p.Live and receivers == 0:
            self._backend.unheard.set()
        return receivers


@pytest.mark.not_durable  # a durable follower waits for its subscription before it reads
@pytest.mark.not_cluster  # there the subscription is confirmed before the request is sent
async def test_a_live_subscription_that_lands_late_loses_nothing(workers: Workers) -> None:
    producing, following = LateLive(workers.backends[0]), LateLive(workers.backends[1])
    source = TestingSource()
    async with (
        workers.context(0, backend=producing) as P,
        workers.context(1, backend=following, liveness_timeout=0.3) as C,
    ):
        own = await P.resumable_stream("s", source.make)
        source.write("a")
        assert await read(own, 1) == "a"
        followers: list[rs.ResumableStream | None] = []

        async def resume() -> None:
            followers.append(await C.resumable_stream("s", never_called))

        async with anyio.create_task_group() as tg:
            tg.start_soon(resume)
            # The producer answers the request (on the inbox, subscribed already), then
            # publishes the next chunk to nobody: the follower's subscription is not there yet.
            with anyio.fail_after(5):
                await producing.replied.wait()
            source.write("b")
            with anyio.fail_after(5):
                await producing.unheard.wait()
            following.open.set()
        [follower] = followers
        source.write("c")
        source.close()
        assert await read(own) == "bc"
        # It hears nothing more (the producer stopped publishing): it asks again, after two
        # heartbeats' silence, and gets the rest.
        with anyio.fail_after(10):
            assert await read(follower) == "abc"


async def test_resuming_a_stream_that_finished_meanwhile_gives_none(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("x")
    source.close()
    assert await read(own) == "x"
    assert await workers.C.resume_existing_stream("s") is None
    assert await workers.C.resumable_stream("s", never_called) is None
    assert await workers.C.has_existing_stream("s") == "DONE"


# 5. A failing generator ends every reader with an error and disturbs nothing else


async def test_generator_failure_reaches_every_reader(workers: Workers) -> None:
    failing, healthy = TestingSource(), TestingSource()
    own = await workers.P.resumable_stream("bad", failing.make)
    other = await workers.P.resumable_stream("good", healthy.make)
    failing.write("partial ")
    assert await read(own, 1) == "partial "
    follower = await workers.C.resumable_stream("bad", never_called)
    failing.fail(KeyError("boom"))
    with pytest.raises(rs.StreamFailedError) as own_error:
        await read(own)
    assert isinstance(own_error.value.__cause__, KeyError)
    assert await read(follower, 1) == "partial "
    with pytest.raises(rs.StreamFailedError, match="KeyError"):
        await read(follower)
    assert await workers.C.has_existing_stream("bad") == "DONE"
    # A late reader learns how it ended, not a bare "finished".
    with pytest.raises(rs.StreamFailedError):
        await workers.C.resumable_stream("bad", never_called)
    with pytest.raises(rs.StreamFailedError):
        await workers.C.resume_existing_stream("bad")
    healthy.write("fine")
    healthy.close()
    assert await read(other) == "fine"


async def test_make_stream_raising_or_returning_garbage_fails_the_stream(workers: Workers) -> None:
    def raises() -> AsyncIterator[str]:
        raise RuntimeError("cannot start")

    def not_iterable() -> AsyncIterator[str]:
        return 42  # type: ignore[return-value]

    async def yields_bytes() -> AsyncIterator[str]:
        yield b"bytes"  # type: ignore[misc]

    for i, make in enumerate((raises, not_iterable, yields_bytes)):
        stream = await workers.P.resumable_stream(f"s{i}", make)
        with pytest.raises(rs.StreamFailedError):
            await read(stream)
        assert await workers.C.has_existing_stream(f"s{i}") == "DONE"


# 6. A follower closing detaches only itself


async def test_follower_close_detaches_only_itself(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("1")
    quitter = await workers.C.resumable_stream("s", never_called)
    stayer = await workers.C.resumable_stream("s", never_called)
    elsewhere = await workers.P.resume_existing_stream("s")
    assert await read(quitter, 1) == "1"
    assert quitter is not None
    await quitter.aclose()
    source.write("2")
    source.write("3")
    source.close()
    assert await read(stayer) == "123"
    assert await read(elsewhere) == "123"
    assert await read(own) == "123"
    assert await read(quitter) == ""


async def channels_of(workers: Workers) -> list[str]:
    return await workers.channels()


@pytest.mark.parametrize("workers", [{"linger": 0}], indirect=True)
async def test_no_subscription_left_once_followers_are_gone(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("1")
    follower = await workers.C.resumable_stream("s", never_called)
    assert follower is not None
    assert await read(follower, 1) == "1"
    await follower.aclose()
    source.close()
    assert await read(own) == "1"
    assert await channels_of(workers) == []


async def test_a_lingering_producer_holds_one_subscription_until_its_context_closes(
    workers: Workers,
) -> None:
    async with workers.context(0, linger=60) as ctx:
        source = TestingSource()
        own = await ctx.resumable_stream("linger", source.make)
        source.write("x")
        source.close()
        assert await read(own) == "x"
        assert await channels_of(workers) == [workers.keys.request("linger")]
    assert await channels_of(workers) == []


# Lingering: the tail of a finished stream, for a reader cut off near its end


async def test_a_reader_cut_off_near_the_end_gets_the_tail_after_the_end(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    for chunk in ("a", "b", "c"):
        source.write(chunk)
    source.close()
    assert await read(own) == "abc"
    await poll_until(lambda: workers.C.has_existing_stream("s"), "DONE")
    for ctx in (workers.C, workers.P):
        assert await read_chunks(await ctx.resumable_stream("s", never_called, 1)) == ["b", "c"]
        assert await read(await ctx.resume_existing_stream("s", resume_at=0)) == "abc"
        assert await read(await ctx.resume_existing_stream("s", resume_at=2)) == "c"
        # Nothing left, or no cursor at all: finished, as without lingering.
        assert await ctx.resumable_stream("s", never_called, 3) is None
        assert await ctx.resume_existing_stream("s", resume_at=7) is None
        assert await ctx.resumable_stream("s", never_called) is None
        assert await ctx.resume_existing_stream("s") is None


async def test_a_late_reader_of_a_failed_stream_learns_it_failed(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("ab")
    source.fail(RuntimeError("boom"))
    with pytest.raises(rs.StreamFailedError):
        await read(own)
    await poll_until(lambda: workers.C.has_existing_stream("s"), "DONE")
    late = await workers.C.resumable_stream("s", never_called, 1)
    assert await read(late, 1) == "b"
    with pytest.raises(rs.StreamFailedError, match="RuntimeError"):
        await read(late)
    with pytest.raises(rs.StreamFailedError):
        await read(await workers.C.resume_existing_stream("s", resume_at=2))


@pytest.mark.parametrize("workers", [{"linger": 0}], indirect=True)
async def test_without_lingering_the_tail_is_gone(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("abc")
    source.close()
    assert await read(own) == "abc"
    await poll_until(lambda: workers.C.has_existing_stream("s"), "DONE")
    if workers.durable:
        # Not gone: a durable stream's text stays in the backend for its TTL.
        assert await read(await workers.C.resumable_stream("s", never_called, 1)) == "bc"
        assert await read(await workers.C.resume_existing_stream("s", resume_at=0)) == "abc"
        return
    assert await workers.C.resumable_stream("s", never_called, 1) is None
    assert await workers.C.resume_existing_stream("s", resume_at=0) is None


# 7. Stream ids and arguments


@pytest.mark.parametrize(
    "stream_id", ["", "x" * 257, None, 42, b"bytes", "lone \ud800 surrogate"], ids=repr
)
async def test_invalid_stream_ids_raise_value_error(workers: Workers, stream_id: object) -> None:
    source = TestingSource()
    with pytest.raises(ValueError, match="stream_id"):
        await workers.P.resumable_stream(stream_id, source.make)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream_id"):
        await workers.P.resume_existing_stream(stream_id)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream_id"):
        await workers.P.has_existing_stream(stream_id)  # type: ignore[arg-type]
    assert source.calls == 0


@pytest.mark.parametrize("resume_at", [-1, 1.5, "3", True, math.inf], ids=repr)
async def test_invalid_offsets_raise_value_error(workers: Workers, resume_at: object) -> None:
    with pytest.raises(ValueError, match="resume_at"):
        await workers.P.resumable_stream("s", never_called, resume_at)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resume_at"):
        await workers.P.resume_existing_stream("s", resume_at)  # type: ignore[arg-type]
    assert await workers.P.has_existing_stream("s") is None


@pytest.mark.parametrize("stream_id", ["a*", "b?", "[c]", "{d}", "e:f", "x" * 256, "ü 😀"])
async def test_ids_with_pattern_characters_are_safe(workers: Workers, stream_id: str) -> None:
    source, decoy = TestingSource(), TestingSource()
    own = await workers.P.resumable_stream(stream_id, source.make)
    other = await workers.P.resumable_stream(stream_id[:-1] + "z", decoy.make)
    follower = await workers.C.resumable_stream(stream_id, never_called)
    source.write("mine")
    source.close()
    decoy.write("not mine")
    decoy.close()
    assert await read(own) == "mine"
    assert await read(follower) == "mine"
    assert await read(other) == "not mine"


async def test_contexts_with_different_prefixes_never_interfere(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    async with rs.ResumableStreamContext(
        backend=workers.backends[1], key_prefix=workers.prefix + "-other"
    ) as other:
        assert await other.has_existing_stream("s") is None
        assert await other.resume_existing_stream("s") is None
    source.close()
    assert await read(own) == ""


async def test_every_key_has_a_ttl(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    key = workers.keys.sentinel("s")
    ttl = await workers.ttl(key)
    assert ttl is not None
    assert 0 < ttl <= 24 * 3600
    await workers.C.resumable_stream("s", never_called)
    source.close()
    assert await read(own) == ""
    ttl = await workers.ttl(key)
    assert ttl is not None
    assert 0 < ttl <= 24 * 3600
    created = await workers.P.create_new_resumable_stream("t", TestingSource().make)
    ttl = await workers.ttl(workers.keys.sentinel("t"))
    assert ttl is not None
    assert 0 < ttl <= 24 * 3600
    await created.aclose()


async def test_a_context_must_be_open(workers: Workers) -> None:
    closed = workers.context()
    with pytest.raises(RuntimeError, match="async with"):
        await closed.resumable_stream("s", never_called)
