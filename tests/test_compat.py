"""`compat="vercel"` between Python contexts, on every backend but a cluster (which the mode
refuses): what the reference's protocol cannot carry keeps working here where it can (failed,
cancelled and lost ends, dead producers, late readers), offsets count UTF-16 code units, and
what goes on the wire is what a Node peer can read. The real npm package is driven in
`test_compat_vercel.py`.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import resumable_stream as rs
from resumable_stream import _vercel_wire as wire
from resumable_stream.http import EventStream
from resumable_stream.sse import SSEDecoder

from .conftest import RedisServer, Workers
from .helpers import (
    DroppingDone,
    TestingSource,
    never_called,
    poll_until,
    read,
    read_entries,
    slice16,
    units16,
)

pytestmark = pytest.mark.anyio

COMPAT: dict[str, Any] = {"compat": "vercel", "liveness_timeout": 0.6}
PARTS = ["Hé", "llo 😀", " wörld ", "🎉🎉", " — ", "𝄞 clef", " done"]
FULL = "".join(PARTS)
INSIDE_PAIR = 7


@pytest.fixture(params=["memory", "memory-trio", "fakeredis", "redis"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def ends(chunks: list[str], start: int = 0) -> list[int]:
    out, position = [], start
    for chunk in chunks:
        position += units16(chunk)
        out.append(position)
    return out


compat = pytest.mark.parametrize("workers", [COMPAT], indirect=True)


# Offsets


@compat
async def test_every_reader_counts_utf16_units_and_a_cut_inside_a_pair_gives_ufffd(
    workers: Workers,
) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    for part in PARTS[:4]:
        source.write(part)
    head = "".join(PARTS[:4])
    readers = {}
    for offset in range(units16(FULL) + 1):
        ctx = workers.P if offset % 2 else workers.C  # local readers, and followers
        readers[offset] = await ctx.resume_existing_stream("s", offset)
    for part in PARTS[4:]:
        source.write(part)
    source.close()
    entries = await read_entries(own)
    assert [item for item, _ in entries] == PARTS
    assert [end for _, end in entries] == ends(PARTS)
    for offset, reader in readers.items():
        got = await read_entries(reader)
        assert "".join(str(item) for item, _ in got) == slice16(FULL, offset), offset
        if got:
            assert got[-1][1] == units16(FULL)
            assert [end for _, end in got] == ends([str(i) for i, _ in got], offset)
    assert units16(head) < units16(FULL)


@compat
async def test_sse_ids_are_utf16_offsets_and_last_event_id_resumes_there(
    workers: Workers,
) -> None:
    source = TestingSource()
    for part in PARTS:
        source.write(part)
    source.close()
    answer = await EventStream(workers.P, "s", source.make).prepare()
    assert answer.body is not None
    decoder = SSEDecoder()
    events = []
    with anyio.fail_after(5):
        async for piece in answer.body:
            events += [(e.data, e.id) for e in decoder.feed(piece)]
    assert [data for data, _ in events] == PARTS
    assert [int(i) for _, i in events] == ends(PARTS)
    resumed = await EventStream(workers.C, "s").prepare(headers={"last-event-id": str(INSIDE_PAIR)})
    # Finished: a Python producer lingers with its text for readers with a cursor.
    assert resumed.status == 200
    assert resumed.body is not None
    decoder = SSEDecoder()
    events = []
    with anyio.fail_after(5):
        async for piece in resumed.body:
            events += [(e.data, e.id) for e in decoder.feed(piece)]
    assert "".join(data for data, _ in events) == slice16(FULL, INSIDE_PAIR)
    assert events[-1][1] == str(units16(FULL))
    at_end = await EventStream(workers.C, "s").prepare(headers={"last-event-id": "34"})
    assert at_end.status == 204


@compat
async def test_lone_surrogates_become_ufffd_for_every_reader(workers: Workers) -> None:
    """What Node's UTF-8 encoder sends for them: one unit for one unit, so offsets hold, and
    the producer's own reader reads what every other reader reads."""
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    follower_at_start = None
    source.write("x\ud83dy")
    follower = await workers.C.resume_existing_stream("s", 1)
    follower_at_start = await workers.C.resume_existing_stream("s")
    source.write("\ude00z")
    source.close()
    assert await read(own) == "x\ufffdy\ufffdz"
    assert await read(follower) == "\ufffdy\ufffdz"
    assert await read(follower_at_start) == "x\ufffdy\ufffdz"


@compat
async def test_an_offset_past_the_text_waits_for_it(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("ab😀")
    ahead = await workers.C.resume_existing_stream("s", 6)
    source.write("cd")
    source.write("ef😀g")
    source.close()
    assert await read(own) == "ab😀cdef😀g"
    assert await read(ahead) == "ef😀g"


# How streams end, between Python contexts


@compat
async def test_failed_and_cancelled_ends_reach_every_python_reader(workers: Workers) -> None:
    for name, error in (("failed", rs.StreamFailedError), ("cancelled", rs.StreamCancelledError)):
        source = TestingSource()
        own = await workers.P.resumable_stream(name, source.make)
        source.write("abc")
        follower = await workers.C.resume_existing_stream(name, 1)
        if name == "failed":
            source.fail(ValueError("the model failed"))
        else:
            await workers.C.cancel_stream(name)
        with anyio.fail_after(5):
            with pytest.raises(error):
                await read(own)
            with pytest.raises(error):
                await read(follower)
            with pytest.raises(error):
                await workers.C.resume_existing_stream(name)
            with pytest.raises(error):
                await workers.C.resumable_stream(name, never_called)
        assert await workers.C.has_existing_stream(name) == "DONE"


@compat
async def test_a_stream_cancelled_before_it_starts_never_starts(workers: Workers) -> None:
    await workers.C.cancel_stream("s")
    with pytest.raises(rs.StreamCancelledError):
        await workers.P.resumable_stream("s", never_called)
    assert await workers.P.has_existing_stream("s") == "DONE"


@compat
async def test_a_late_reader_with_a_cursor_gets_the_tail_from_the_lingering_producer(
    workers: Workers,
) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    for part in PARTS:
        source.write(part)
    source.close()
    assert await read(own) == FULL
    assert await workers.C.resume_existing_stream("s") is None  # no cursor: finished
    tail = await workers.C.resume_existing_stream("s", INSIDE_PAIR)
    assert await read(tail) == slice16(FULL, INSIDE_PAIR)
    assert await workers.C.resume_existing_stream("s", units16(FULL)) is None


@pytest.mark.parametrize("workers", [{**COMPAT, "linger": 0}], indirect=True)
async def test_without_linger_a_late_reader_gets_none(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("abc")
    source.close()
    assert await read(own) == "abc"
    assert await workers.C.resume_existing_stream("s", 1) is None


@compat
async def test_a_lost_done_message_ends_the_reader_from_the_sentinel_and_outcome(
    workers: Workers,
) -> None:
    """Pub/sub loses the DONE message: the follower learns the end from the sentinel while
    idle, and how it ended from the outcome key."""
    backend = DroppingDone(workers.backends[0])
    async with workers.context(backend=backend, **COMPAT) as producer_side:
        source = TestingSource()
        own = await producer_side.resumable_stream("s", source.make)
        source.write("abc")
        follower = await workers.C.resume_existing_stream("s", 2)
        assert follower is not None
        source.write("def")
        source.fail(RuntimeError("boom"))
        with anyio.fail_after(3):
            with pytest.raises(rs.StreamFailedError):
                await read(own)
            got = ""
            try:
                async for chunk in follower:
                    got += chunk
            except rs.StreamFailedError:
                pass
            else:
                pytest.fail("the follower ended well")
        assert got == "cdef"


@compat
async def test_malformed_requests_are_ignored_and_skip_characters_read_as_javascript(
    workers: Workers,
) -> None:
    """A request is read as the reference reads it (`JSON.parse`, `skipCharacters || 0`,
    `slice`); anything else is dropped, where a Node producer would crash."""
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("01234")
    source.write("56789")
    await read(own, 2)
    names = wire.VercelNames(workers.prefix)
    got: dict[str, list[bytes]] = {}
    all_answered = anyio.Event()

    def receive(channel: str, data: bytes) -> None:
        got.setdefault(channel, []).append(data)
        if len(got) == len(cases):
            all_answered.set()

    cases: list[tuple[Any, str]] = [
        (None, "0123456789"),
        (False, "0123456789"),
        ("", "0123456789"),
        ("abc", "0123456789"),
        (-3, "789"),
        ("2", "23456789"),
        (2.7, "23456789"),
        (True, "123456789"),
        ([4], "456789"),
        (1e9, ""),
    ]
    async with workers.backends[1].connect(receive) as connection:
        for junk in (b"C[]", b"null", b"[1]", b'{"skipCharacters": 1}', b"{"):
            await connection.publish(names.request("s"), junk)
        for index, (skip, _) in enumerate(cases):
            channel = names.chunk(f"l{index}")
            await connection.subscribe(channel)
            request = json.dumps({"listenerId": f"l{index}", "skipCharacters": skip})
            assert await connection.publish(names.request("s"), request.encode()) == 1
        with anyio.fail_after(5):
            await all_answered.wait()
    for index, (_, expected) in enumerate(cases):
        assert got[names.chunk(f"l{index}")][0].decode() == expected
    source.close()
    assert await read(own) == ""


# Dead producers (a process that exits), between Python contexts


@pytest.mark.parametrize("flavor", ["redis"])
async def test_a_python_producer_whose_process_dies_ends_its_followers_with_producer_lost(
    redis_server: RedisServer,
) -> None:
    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    script = (
        "import anyio, sys\n"
        "import resumable_stream as rs\n"
        "from resumable_stream.redis import RedisBackend\n"
        "async def source():\n"
        "    yield 'abc'\n"
        "    print('ready', flush=True)\n"
        "    await anyio.sleep(60)\n"
        "async def main():\n"
        "    backend = RedisBackend(sys.argv[1])\n"
        "    async with rs.ResumableStreamContext(\n"
        "        backend=backend, key_prefix=sys.argv[2], compat='vercel'\n"
        "    ) as ctx:\n"
        "        stream = await ctx.resumable_stream('s', source)\n"
        "        async for _ in stream:\n"
        "            pass\n"
        "anyio.run(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-c", script, redis_server.url, prefix]
    from resumable_stream.redis import RedisBackend

    async with (
        await anyio.open_process(command, env=env, stderr=sys.stderr.fileno()) as process,
        rs.ResumableStreamContext(
            backend=RedisBackend(redis_server.url), key_prefix=prefix, **COMPAT
        ) as ctx,
    ):
        assert process.stdout is not None
        with anyio.fail_after(20):
            assert (await process.stdout.receive()).startswith(b"ready")
        follower = await ctx.resume_existing_stream("s")
        assert follower is not None
        assert await follower.next_batch() == [("abc", 3)]
        process.kill()
        with anyio.fail_after(0.6 + 1.0), pytest.raises(rs.ProducerLostError):
            await follower.next_batch()
        with anyio.fail_after(1.0), pytest.raises(rs.ProducerLostError):
            await ctx.resume_existing_stream("s")
        assert await ctx.has_existing_stream("s") is True  # as Node says: it never ended


# Options and isolation


def test_compat_is_checked_when_the_context_is_made() -> None:
    backend = rs.MemoryBackend()
    with pytest.raises(ValueError, match="compat"):
        rs.ResumableStreamContext(backend=backend, compat="node")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="durable"):
        rs.ResumableStreamContext(backend=backend, compat="vercel", durable=True)
    # The reference allows braces in its prefix (one cluster slot for every key).
    rs.ResumableStreamContext(backend=backend, compat="vercel", key_prefix="{app}")
    ctx = rs.create_resumable_stream_context(backend=backend, compat="vercel")
    assert ctx._compat is not None


def test_endpoints_that_need_event_names_or_chunk_boundaries_refuse_a_compat_context() -> None:
    """The reference's protocol carries text only: the AI SDK adapter (a JSON object per chunk)
    and the task endpoints (named events) need this library's own."""
    from resumable_stream.ai_sdk import ChatStreams
    from resumable_stream.tasks import TaskApp, TaskEndpoint

    async def task(task_input: Any, request: Any) -> None:
        return None

    ctx = rs.ResumableStreamContext(backend=rs.MemoryBackend(), compat="vercel")
    assert ctx.compat == "vercel"
    assert rs.ResumableStreamContext(backend=rs.MemoryBackend()).compat is None
    for make in (
        lambda: ChatStreams(ctx),
        lambda: TaskEndpoint(ctx, task),
        lambda: TaskApp(ctx, task),
    ):
        with pytest.raises(ValueError, match="compat='vercel'"):
            make()


@pytest.mark.parametrize("flavor", ["memory", "memory-trio"])
async def test_a_cluster_is_refused_when_the_context_opens() -> None:
    class Sharded(rs.MemoryBackend):
        @asynccontextmanager
        async def _connect(self, on_message: Any) -> AsyncIterator[Any]:
            async with super()._connect(on_message) as connection:
                connection.sharded = True
                yield connection

    ctx = rs.ResumableStreamContext(backend=Sharded(), compat="vercel")
    with pytest.raises(rs.ResumableStreamError, match="Cluster"):
        async with ctx:
            pass


@compat
async def test_stream_ids_have_no_length_limit_in_compat_mode(workers: Workers) -> None:
    stream_id = "x" * 1000
    source = TestingSource()
    own = await workers.P.resumable_stream(stream_id, source.make)
    source.write("abc")
    follower = await workers.C.resume_existing_stream(stream_id, 1)
    source.close()
    assert await read(own) == "abc"
    assert await read(follower) == "bc"
    with pytest.raises(ValueError, match="empty"):
        await workers.P.resumable_stream("", never_called)


@pytest.mark.parametrize("flavor", ["memory", "memory-trio"])
async def test_compat_and_native_contexts_on_one_prefix_do_not_see_each_other() -> None:
    backend = rs.MemoryBackend()
    async with (
        rs.ResumableStreamContext(backend=backend, key_prefix="app", compat="vercel") as vercel,
        rs.ResumableStreamContext(backend=backend, key_prefix="app") as native,
    ):
        for producer, other in ((vercel, native), (native, vercel)):
            source = TestingSource()
            stream_id = f"s-{uuid.uuid4().hex}"
            own = await producer.resumable_stream(stream_id, source.make)
            source.write("abc")
            assert await other.has_existing_stream(stream_id) is None
            assert await other.resume_existing_stream(stream_id) is None
            if producer is vercel:
                # Nothing of this library's own protocol: the native context's inbox only.
                assert [c for c in backend.channels() if ":v3:" in c] == [
                    native._hub.reply_channel(stream_id)
                ]
            source.close()
            assert await read(own) == "abc"


@compat
async def test_aliases_stats_and_cancel_in_compat_mode(workers: Workers) -> None:
    await workers.P.set_alias("chat", "s")
    assert await workers.C.resolve_alias("chat") == "s"
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("abc")
    follower = await workers.C.resume_existing_stream("s")
    assert workers.C.stats().followers == 1
    await workers.P.cancel_stream("s")  # the producer's own context
    with pytest.raises(rs.StreamCancelledError):
        await read(own)
    with pytest.raises(rs.StreamCancelledError):
        await read(follower)
    assert workers.C.stats().followers == 0


@compat
async def test_events_cross_as_their_text(workers: Workers) -> None:
    """The reference carries text only: an `Event`'s name and retry do not cross, and every
    reader (the producer's own too) reads its data as a chunk."""
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write(rs.Event("abc", event="named", retry=5))
    follower = await workers.C.resume_existing_stream("s")
    source.close()
    assert await read_entries(own) == [("abc", 3)]
    assert await read_entries(follower) == [("abc", 3)]


@pytest.mark.parametrize("flavor", ["memory", "memory-trio"])
async def test_a_producer_without_listeners_sends_nothing_per_chunk() -> None:
    backend = rs.MemoryBackend()
    async with rs.ResumableStreamContext(backend=backend, compat="vercel", linger=0) as ctx:
        source = TestingSource()
        own = await ctx.resumable_stream("s", source.make)
        for index in range(1000):
            source.write(f"{index},")
        source.close()
        await read(own)
    assert backend.commands == {
        "incr": 1,
        "expire": 1,
        "subscribe": 1,
        "set": 2,  # the outcome, then "DONE"
        "unsubscribe": 1,
    }


# The pure parts


def test_utf16_helpers() -> None:
    text = "a😀b😀c"
    assert wire.utf16_len(text) == 7
    assert wire.utf16_len("héllo") == 5
    assert [wire.cut16(text, n) for n in range(9)] == [slice16(text, n) for n in range(9)]
    assert wire.cut16(text, 2) == "\ufffdb😀c"
    assert wire.skip16("a😀b", 2) == ("\ufffdb", 0)
    assert wire.skip16("a😀b", 4) == ("", 0)
    assert wire.skip16("a😀b", 6) == ("", 2)
    assert wire.skip16("ab", 0) == ("ab", 0)
    assert wire.drop_unit("😀x") == "\ufffdx"
    assert wire.drop_unit("éx") == "x"
    assert wire.well_formed("x\ud83dy\udc00") == "x\ufffdy\ufffd"
    assert wire.well_formed("\ud83d\ude00") == "😀"


def test_messages_never_equal_the_done_message() -> None:
    done = wire.DONE_MESSAGE
    assert list(wire.messages(done, 100)) == [done[:1], done[1:]]
    assert list(wire.messages("", 10)) == [""]
    assert list(wire.messages("abcdefg", 3)) == ["abc", "def", "g"]
    assert list(wire.messages("x" + done, 1)) == ["x", *done]


def test_requests_are_what_the_reference_sends_and_reads() -> None:
    assert wire.encode_request("u", None) == b'{"listenerId":"u"}'
    assert wire.encode_request("u", 5) == b'{"listenerId":"u","skipCharacters":5}'
    request = wire.parse_request(b'{"listenerId":"u","skipCharacters":2,"x":1}')
    assert request == wire.Request("u", 2)
    for junk in (b"C[]", b"null", b"[]", b'{"listenerId": 1}', b"{", b'"x"'):
        assert wire.parse_request(junk) is None
    # JavaScript's `x || 0` and `slice`, on a text of 10 units.
    cases: list[tuple[Any, int]] = [
        (None, 0),
        (0, 0),
        (-0.0, 0),
        ("", 0),
        ("abc", 0),
        ("  7 ", 7),
        ("0x3", 3),
        ("1e1", 10),
        ("-Infinity", 0),
        ("Infinity", sys.maxsize),
        (-3, 7),
        (-30, 0),
        (2.7, 2),
        (-2.7, 8),
        (True, 1),
        ([4], 4),
        ([[4]], 4),
        ([1, 2], 0),
        ([], 0),
        ({}, 0),
        (12, 12),
    ]
    for skip, start in cases:
        assert wire.slice_start(skip, 10) == start, skip


def test_the_outcome_key_round_trips_and_malformed_ones_are_ignored() -> None:
    outcome = wire.Outcome("failed", 12, "ValueError", "t")
    assert wire.Outcome.parse(outcome.pack()) == outcome
    for junk in (None, "", "{", "[]", '{"state": "odd", "length": 1}', '{"state": "done"}'):
        assert wire.Outcome.parse(junk) is None


@compat
async def test_a_lost_answer_is_asked_for_again_under_a_new_listener(workers: Workers) -> None:
    """The answer (or the request) is lost on the way: halfway through `resume_timeout` the
    follower asks again, under a new listener id (a reference producer would answer one id
    twice, and send it every chunk twice)."""
    backend = DroppingFirstAnswer(workers.backends[1])
    async with workers.context(backend=backend, **COMPAT, resume_timeout=0.4) as reader_side:
        source = TestingSource()
        own = await workers.P.resumable_stream("s", source.make)
        source.write("abc")
        with anyio.fail_after(5):
            follower = await reader_side.resume_existing_stream("s", 1)
        assert len(backend.dropped) == 1  # the answer to the first request
        source.write("def")
        source.close()
        assert await read(own) == "abcdef"
        assert await read(follower) == "bcdef"


class DroppingFirstAnswer:
    """A backend whose connections lose the first message on a chunk channel."""

    def __init__(self, backend: rs.Backend) -> None:
        self._backend = backend
        self.dropped: list[bytes] = []

    def connect(self, on_message: Any, on_reconnect: Any = None) -> Any:
        def receive(channel: str, data: bytes) -> None:
            if ":rs:chunk:" in channel and not self.dropped:
                self.dropped.append(data)
                return
            on_message(channel, data)

        return self._backend.connect(receive, on_reconnect)


@pytest.mark.parametrize("workers", [{**COMPAT, "linger": 0.3}], indirect=True)
async def test_a_stream_started_again_while_its_predecessor_lingers_keeps_its_channels(
    workers: Workers,
) -> None:
    """The finished producer's linger ends after its id was started again in the same context:
    it lets go of nothing the new producer needs (the channels are the same)."""
    first = TestingSource()
    own = await workers.P.create_new_resumable_stream("s", first.make)
    first.write("a")
    first.close()
    assert await read(own) == "a"
    second = TestingSource()
    again = await workers.P.create_new_resumable_stream("s", second.make)
    second.write("b")

    async def lingering() -> int:
        return workers.P.stats().lingering

    await poll_until(lingering, 0)  # the first one's linger is over
    follower = await workers.C.resume_existing_stream("s")
    second.write("c")
    second.close()
    assert await read(again) == "bc"
    assert await read(follower) == "bc"


@pytest.mark.parametrize("flavor", ["memory", "memory-trio"])
async def test_a_stream_started_while_the_backend_fails_runs_for_its_caller_only() -> None:
    """`on_backend_error="degrade"`, as in native mode: not resumable, and nothing written."""

    class FailingIncr(rs.MemoryBackend):
        @asynccontextmanager
        async def _connect(self, on_message: Any) -> AsyncIterator[Any]:
            async with super()._connect(on_message) as connection:

                async def incr(key: str, ttl: int) -> int | None:
                    raise rs.BackendError("Redis is down")

                connection.incr = incr  # type: ignore[method-assign]
                yield connection

    backend = FailingIncr()
    async with rs.ResumableStreamContext(backend=backend, compat="vercel") as ctx:
        source = TestingSource()
        own = await ctx.resumable_stream("s", source.make)
        source.write("a😀")
        source.close()
        assert await read_entries(own) == [("a😀", 3)]
        assert await ctx.has_existing_stream("s") is None
    async with rs.ResumableStreamContext(
        backend=backend, compat="vercel", on_backend_error="raise"
    ) as ctx:
        with pytest.raises(rs.BackendError):
            await ctx.resumable_stream("s", never_called)


@pytest.mark.parametrize("flavor", ["memory", "memory-trio"])
async def test_wait_attempts_and_writers_in_compat_mode() -> None:
    """`wait=` waits for a stream that starts later (the sentinel is polled: the reference
    announces no start); a compat stream has one attempt; `ctx.writer` is native only."""
    backend = rs.MemoryBackend()
    async with (
        rs.ResumableStreamContext(backend=backend, compat="vercel") as producer_side,
        rs.ResumableStreamContext(backend=backend, compat="vercel") as reader_side,
    ):
        assert await reader_side.resume_existing_stream("none", wait=0.05) is None
        source = TestingSource()
        found: list[rs.ResumableStream | None] = []

        async def wait_for_it() -> None:
            found.append(await reader_side.resume_existing_stream("s", 2, wait=5))

        async def gets() -> int:
            return backend.commands["get"]

        async with anyio.create_task_group() as tg:
            before = backend.commands["get"]
            tg.start_soon(wait_for_it)
            await poll_until(gets, before + 2)  # it read the sentinel twice: it waits
            own = await producer_side.resumable_stream("s", source.make)
            source.write("abc😀")
        source.close()
        assert await read(own) == "abc😀"
        assert found[0] is not None
        assert found[0].attempt == 1
        assert await read(found[0]) == "c😀"
        tail = await reader_side.resume_existing_stream("s", 1, attempt=1)
        assert await read(tail) == "bc😀"
        with pytest.raises(rs.StreamRestartedError) as restarted:
            await reader_side.resume_existing_stream("s", 1, attempt=2)
        assert restarted.value.attempt == 1
        with pytest.raises(ValueError, match="attempt"):
            await reader_side.resumable_stream("s", never_called, 1, attempt=0)
        with pytest.raises(ValueError, match="compat"):
            reader_side.writer("w")
