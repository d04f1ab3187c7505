"""`compat="vercel"` against the real npm package `resumable-stream`, in Node, on a real Redis.

Every version the reference published a wire change in is driven (pinned in
tests/node_interop, installed by the session with `npm ci`): 2.2.13 with node-redis, with
ioredis and with the package's default clients; 2.2.12 (no done watchdog; SET before SUBSCRIBE);
2.2.0 (no `hasExistingStream`); 2.1.0 with ioredis (the first adapter; subscribe and request
sent together); 2.0.0 (the idempotent API only). Both directions: Node readers of our streams,
our readers (the Python API and the SSE response) of Node's, at ASCII and astral-plane UTF-16
offsets, one inside a surrogate pair included; and what each side learns when something goes
wrong. Without Node.js these tests are skipped, and under `RESUMABLE_STREAM_REQUIRE_ALL=1` (CI)
they fail instead.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import resumable_stream as rs
from resumable_stream import _vercel_wire as wire
from resumable_stream.http import EventStream, prepare_stop
from resumable_stream.redis import RedisBackend
from resumable_stream.sse import SSEDecoder

from .conftest import RedisServer
from .helpers import DroppingDone, read_until_error, slice16, units16
from .machine import server_binary
from .node_driver import NodeContext, Reference, node_context

pytestmark = pytest.mark.anyio

STEP = 20.0  # seconds: the bound of one scenario
LIVENESS = 0.6  # the Python contexts' liveness_timeout

REFERENCES = [
    Reference("resumable-stream", "node-redis"),
    Reference("resumable-stream", "ioredis"),
    Reference("resumable-stream", "default"),
    Reference("rs-2.2.12", "node-redis"),
    Reference("rs-2.2.0", "node-redis"),
    Reference("rs-2.1.0", "ioredis"),
    Reference("rs-2.0.0", "node-redis"),
]

# ASCII, BMP non-ASCII, U+1F600, U+1F389 twice in one chunk, U+1D11E: 34 UTF-16 units, 30
# code points.
PARTS = ["Hé", "llo 😀", " wörld ", "🎉🎉", " — ", "𝄞 clef", " done"]
FULL = "".join(PARTS)
HEAD = 4  # chunks written before the readers resume
INSIDE_PAIR = 7  # between the halves of 😀


OFFSETS = [0, 1, 2, 6, INSIDE_PAIR, units16("".join(PARTS[:HEAD]))]
assert units16(FULL) == 34
assert len(FULL) == 30
assert slice16(FULL, INSIDE_PAIR).startswith("\ufffd")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # the Redis backend's


@pytest.fixture(scope="module", params=REFERENCES, ids=str)
def reference(request: pytest.FixtureRequest) -> Reference:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def prefix(reference: Reference) -> str:
    return f"compat-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
async def node(
    node_interop: Path, redis_server: RedisServer, reference: Reference, prefix: str
) -> AsyncIterator[NodeContext]:
    """A Node context of `reference`, for the module's tests of that version (each uses
    fresh stream ids)."""
    async with node_context(node_interop, reference, redis_server.url, prefix) as context:
        yield context


@asynccontextmanager
async def python_context(url: str, prefix: str, **options: Any) -> AsyncIterator[Any]:
    options.setdefault("liveness_timeout", LIVENESS)
    options.setdefault("drain_timeout", 2.0)
    async with rs.ResumableStreamContext(
        backend=RedisBackend(url), key_prefix=prefix, compat="vercel", **options
    ) as context:
        yield context


@pytest.fixture
async def py(redis_server: RedisServer, prefix: str) -> AsyncIterator[rs.ResumableStreamContext]:
    async with python_context(redis_server.url, prefix) as context:
        yield context


class Feed:
    """A Python producer's source, written by the test chunk by chunk."""

    def __init__(self) -> None:
        self.send: MemoryObjectSendStream[str]
        self._receive: MemoryObjectReceiveStream[str]
        self.send, self._receive = anyio.create_memory_object_stream[str](1000)
        self.fail = False

    async def source(self) -> AsyncIterator[str]:
        async with self._receive:
            async for chunk in self._receive:
                yield chunk
        if self.fail:
            raise RuntimeError("the model failed")

    async def write(self, *chunks: str) -> None:
        for chunk in chunks:
            await self.send.send(chunk)

    async def close(self, fail: bool = False) -> None:
        self.fail = fail
        await self.send.aclose()


async def never() -> AsyncIterator[str]:
    """A source for a call that must only resume."""
    raise AssertionError("make_stream was called for a resume")
    yield ""


def new_id() -> str:
    return f"s-{uuid.uuid4().hex}"


async def read_all(stream: rs.ResumableStream | None) -> str:
    assert stream is not None
    return "".join([chunk async for chunk in stream])


async def read_sse(
    context: rs.ResumableStreamContext, stream_id: str, cursor: int
) -> list[tuple[str, str]]:
    """The events (data, id) an SSE response sends a reader with `Last-Event-ID: cursor`."""
    answer = await EventStream(context, stream_id).prepare(headers={"last-event-id": str(cursor)})
    assert answer.status == 200
    assert answer.body is not None
    decoder = SSEDecoder()
    events: list[tuple[str, str]] = []
    async for piece in answer.body:
        events += [(event.data, event.id) for event in decoder.feed(piece)]
    return events


def check_events(events: list[tuple[str, str]], start: int) -> None:
    """The events carry `slice16(FULL, start)`, each id its UTF-16 end offset."""
    assert "".join(data for data, _ in events) == slice16(FULL, start)
    position = start
    for data, event_id in events:
        position += units16(data)
        assert event_id == str(position)
    assert position == units16(FULL)


# Node producers, our readers


async def test_our_readers_resume_a_node_stream_at_utf16_offsets(
    node: NodeContext, reference: Reference, py: rs.ResumableStreamContext
) -> None:
    stream_id = new_id()
    with anyio.fail_after(STEP):
        assert await py.has_existing_stream(stream_id) is None
        if reference.has:
            assert await node.has(stream_id) is None
        produced = await node.produce(stream_id)
        assert produced["kind"] == "stream"
        await node.write(produced["source"], *PARTS[:HEAD])
        head = "".join(PARTS[:HEAD])
        assert (await node.read(produced["handle"], length=len(head))).text == head
        assert await py.has_existing_stream(stream_id) is True
        if reference.has:
            assert await node.has(stream_id) is True
        readers = []
        # Every kind of offset, and one past the text so far: the reference would then send
        # the live text whole (ours asks for it all and drops what the reader has).
        offsets = [*OFFSETS, units16(head) + 3]
        for index, offset in enumerate(offsets):
            if index % 2:
                readers.append(await py.resume_existing_stream(stream_id, offset))
            else:
                readers.append(await py.resumable_stream(stream_id, never, offset))
        sse: list[list[tuple[str, str]]] = []
        async with anyio.create_task_group() as tg:

            async def sse_reader(cursor: int) -> None:
                sse.append(await read_sse(py, stream_id, cursor))

            tg.start_soon(sse_reader, INSIDE_PAIR)
            raw: list[str] = []

            async def raw_reader() -> None:
                # The README's route: plain text from `?resumeAt=` (UTF-16 units).
                answer = await EventStream(py, stream_id, raw=True).prepare(query="resumeAt=6")
                assert answer.body is not None
                raw.append(b"".join([piece async for piece in answer.body]).decode())

            tg.start_soon(raw_reader)
            texts = [""] * len(readers)

            async def read(index: int) -> None:
                texts[index] = await read_all(readers[index])

            for index in range(len(readers)):
                tg.start_soon(read, index)
            await node.write(produced["source"], *PARTS[HEAD:])
            await node.close(produced["source"])
        for offset, text in zip(offsets, texts, strict=True):
            assert text == slice16(FULL, offset), offset
        check_events(sse[0], INSIDE_PAIR)
        assert raw == [slice16(FULL, 6)]
        assert (await node.read(produced["handle"])).text == FULL
        assert await py.has_existing_stream(stream_id) == "DONE"
        if reference.has:
            assert await node.has(stream_id) == "DONE"
        assert await py.resume_existing_stream(stream_id) is None
        assert await py.resumable_stream(stream_id, never) is None


# Python producers, Node readers


async def test_node_readers_resume_our_stream_at_utf16_offsets(
    node: NodeContext, reference: Reference, py: rs.ResumableStreamContext
) -> None:
    stream_id = new_id()
    feed = Feed()
    with anyio.fail_after(STEP):
        own = await py.resumable_stream(stream_id, feed.source)
        assert own is not None
        await feed.write(*PARTS[:HEAD])
        head = "".join(PARTS[:HEAD])
        got = ""
        while got != head:
            got += "".join(str(item) for item, _ in await own.next_batch())
        if reference.has:
            assert await node.has(stream_id) is True
        # Every offset, one past the text so far too (this side then drops the units the
        # reader has from the live text, where the reference would send them twice).
        offsets = [*OFFSETS, units16(head) + 3]
        handles = []
        for index, offset in enumerate(offsets):
            mode = "explicit" if reference.explicit and index % 2 else "idempotent"
            resumed = await node.resume(stream_id, offset or None, mode=mode)
            assert resumed["kind"] == "stream", resumed
            handles.append(resumed["handle"])
        await feed.write(*PARTS[HEAD:])
        await feed.close()
        assert got + await read_all(own) == FULL
        for offset, handle in zip(offsets, handles, strict=True):
            read = await node.read(handle)
            assert read.done, offset
            assert read.error is None, offset
            assert read.text == slice16(FULL, offset), offset
        assert await py.has_existing_stream(stream_id) == "DONE"
        if reference.has:
            assert await node.has(stream_id) == "DONE"
        assert (await node.resume(stream_id, mode="idempotent"))["kind"] == "null"
        if reference.explicit:
            assert (await node.resume(stream_id, 3))["kind"] == "null"


async def test_a_stream_that_ends_while_it_is_resumed_gives_its_text_or_none_never_an_error(
    node: NodeContext, reference: Reference, redis_server: RedisServer, prefix: str
) -> None:
    """Both ways round: a Node stream ending while Python resumes it, and ours while Node
    resumes it (the reference answers such a resume with the text, or `null`)."""
    text = "".join(PARTS)
    seen_py: set[str] = set()
    seen_node: set[str] = set()
    async with python_context(redis_server.url, prefix, resume_timeout=1.5) as py:
        for _ in range(6):
            with anyio.fail_after(STEP):
                stream_id = new_id()
                produced = await node.produce(stream_id)
                await node.write(produced["source"], *PARTS)
                assert (await node.read(produced["handle"], length=len(text))).text == text
                async with anyio.create_task_group() as tg:
                    tg.start_soon(node.close, produced["source"])
                    stream = await py.resume_existing_stream(stream_id)
                    seen_py.add("null" if stream is None else await read_all(stream))

                stream_id = new_id()
                feed = Feed()
                own = await py.resumable_stream(stream_id, feed.source)
                await feed.write(*PARTS)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(feed.close)
                    mode = "explicit" if reference.explicit else "idempotent"
                    resumed = await node.resume(stream_id, mode=mode)
                    if resumed["kind"] == "stream":
                        read = await node.read(resumed["handle"])
                        assert read.done
                        assert read.error is None
                        seen_node.add(read.text)
                    else:
                        seen_node.add(resumed["kind"])
                assert await read_all(own) == text
    assert seen_py <= {text, "null"}, seen_py
    assert seen_node <= {text, "null"}, seen_node


async def test_large_chunks_cross_both_ways_exactly(
    node: NodeContext, reference: Reference, py: rs.ResumableStreamContext
) -> None:
    """A 3 MiB Node chunk read by a Python follower from an offset, and a 5 MiB replay of ours
    (sent in `max_message_size` pieces) read by a Node follower; astral characters throughout,
    so that a cut by units would split pairs. Text equal to the reference's DONE message ends a
    Node producer's readers, ours as Node's (the reference's own semantics); ours sends it as
    two messages, so that nobody takes it for the end."""
    big3 = ("a😀" * 12 + "b" * 1000) * 3000  # ~3 MiB of UTF-16, astral every ~1 KiB
    big5 = ("é🎉" * 10 + "x" * 1000) * 5200
    with anyio.fail_after(STEP):
        stream_id = new_id()
        produced = await node.produce(stream_id)
        await node.write(produced["source"], "head", big3)
        head = "head" + big3
        assert (await node.read(produced["handle"], length=units16(head))).done is False
        follower = await py.resume_existing_stream(stream_id, 10)
        async with anyio.create_task_group() as tg:
            got: list[str] = []

            async def read_follower() -> None:
                got.append(await read_all(follower))

            tg.start_soon(read_follower)
            await node.write(produced["source"], "tail", wire.DONE_MESSAGE, "after")
            await node.close(produced["source"])
        assert got == [slice16(head + "tail", 10)]

        stream_id = new_id()
        feed = Feed()
        own = await py.resumable_stream(stream_id, feed.source)
        assert own is not None
        await feed.write("start ", big5)
        expected = "start " + big5
        taken = ""
        while units16(taken) < units16(expected):
            taken += "".join(str(item) for item, _ in await own.next_batch())
        mode = "explicit" if reference.explicit else "idempotent"
        resumed = await node.resume(stream_id, 3, mode=mode)
        assert resumed["kind"] == "stream"
        await feed.write(" end", wire.DONE_MESSAGE, "after")
        await feed.close()
        expected += " end" + wire.DONE_MESSAGE + "after"
        read = await node.read(resumed["handle"])
        assert read.done
        assert read.text == slice16(expected, 3)
        assert read.chunks >= 6  # the replay came in pieces of at most 1 MiB
        assert taken + await read_all(own) == expected


async def test_a_killed_node_producer_ends_our_reader_with_producer_lost(
    node_interop: Path, reference: Reference, redis_server: RedisServer, prefix: str
) -> None:
    """Its process dies (SIGKILL) mid-stream: nobody is subscribed to its requests any more,
    which our reader learns within `liveness_timeout`; the shared sentinel is not touched."""
    stream_id = new_id()
    async with python_context(redis_server.url, prefix) as py:
        async with node_context(node_interop, reference, redis_server.url, prefix) as producer:
            produced = await producer.produce(stream_id)
            await producer.write(produced["source"], *PARTS[:HEAD])
            head = "".join(PARTS[:HEAD])
            await producer.read(produced["handle"], length=len(head))
            follower = await py.resume_existing_stream(stream_id, 2)
            assert follower is not None
            assert (await follower.next_batch())[0][0] == slice16(head, 2)
            producer.process.kill()
        with anyio.fail_after(LIVENESS + 1.0):
            with pytest.raises(rs.ProducerLostError):
                await read_all(follower)
        sentinel = f"{prefix}:rs:sentinel:{stream_id}"
        async with rs.ResumableStreamContext(
            backend=RedisBackend(redis_server.url), key_prefix=prefix
        ) as native:
            value = await native._hub.connection.get(sentinel)
        assert value not in (None, "DONE")  # still the reference's "running"
        # A later reader learns it at once.
        with anyio.fail_after(1.0), pytest.raises(rs.ProducerLostError):
            await py.resume_existing_stream(stream_id)


async def test_a_failed_or_cancelled_stream_ends_node_readers_and_raises_for_ours(
    node: NodeContext, reference: Reference, redis_server: RedisServer, prefix: str
) -> None:
    """The reference knows no failed or cancelled end: its readers get the text so far and the
    stream's end ("DONE"), ours the typed error (the Python-only outcome key says how)."""
    mode = "explicit" if reference.explicit else "idempotent"
    head = "".join(PARTS[:HEAD])
    async with (
        python_context(redis_server.url, prefix) as producer_side,
        python_context(redis_server.url, prefix) as other,
    ):
        for how, error in (("fail", rs.StreamFailedError), ("cancel", rs.StreamCancelledError)):
            with anyio.fail_after(STEP):
                stream_id = new_id()
                feed = Feed()
                own = await producer_side.resumable_stream(stream_id, feed.source)
                await feed.write(*PARTS[:HEAD])
                follower = await other.resume_existing_stream(stream_id, 1)
                assert follower is not None
                resumed = await node.resume(stream_id, 2, mode=mode)
                assert resumed["kind"] == "stream"
                assert (await node.read(resumed["handle"], length=units16(head) - 2)).text == (
                    slice16(head, 2)
                )
                if how == "fail":
                    await feed.close(fail=True)
                else:
                    await other.cancel_stream(stream_id)
                read = await node.read(resumed["handle"])
                assert read.done
                assert read.error is None
                assert read.text == slice16(head, 2)
                got, raised = await read_until_error(follower)
                assert got == slice16(head, 1)
                assert isinstance(raised, error)
                with pytest.raises(error):
                    await read_all(own)
                with pytest.raises(error):
                    await other.resume_existing_stream(stream_id)
                assert await other.has_existing_stream(stream_id) == "DONE"
                if reference.has:
                    assert await node.has(stream_id) == "DONE"
                assert (await node.resume(stream_id, mode=mode))["kind"] == "null"
                if how == "cancel":
                    await feed.close()


async def test_cancelling_a_node_stream_says_it_cannot_and_leaves_it_running(
    node: NodeContext, redis_server: RedisServer, prefix: str
) -> None:
    """The reference has no cancellation; nothing is published on its request channel (a
    non-request there kills a Node producer)."""
    stream_id = new_id()
    async with python_context(redis_server.url, prefix, resume_timeout=0.3) as py:
        with anyio.fail_after(STEP):
            produced = await node.produce(stream_id)
            await node.write(produced["source"], *PARTS[:HEAD])
            with pytest.raises(rs.StreamNotCancellableError):
                await py.cancel_stream(stream_id)
            assert (await prepare_stop(py, stream_id)).status == 409
            await node.write(produced["source"], *PARTS[HEAD:])
            await node.close(produced["source"])
            read = await node.read(produced["handle"])
            assert read.done
            assert read.error is None
            assert read.text == FULL
            await py.cancel_stream(stream_id)  # finished: nothing to do
            # Not started yet: prevented (the reference then finds it finished).
            later = new_id()
            await py.cancel_stream(later)
            assert (await node.resume(later, mode="idempotent"))["kind"] == "null"
            with pytest.raises(rs.StreamCancelledError):
                await py.resume_existing_stream(later)


# What needs Node processes of its own

NODE_REDIS = [r for r in REFERENCES if r.client == "node-redis"]
EXPLICIT = [r for r in REFERENCES if r.explicit]


@pytest.mark.parametrize("bare", [True, False], ids=["bare", "with-handler"])
async def test_a_node_source_that_errors(
    node_interop: Path, redis_server: RedisServer, bare: bool
) -> None:
    """In a bare Node process a source error is an unhandled rejection: the process exits
    (code 1) and our reader gets `ProducerLostError`. With an `unhandledRejection` handler (as
    frameworks install) the producer stays subscribed and says nothing, ever: indistinguishable
    from a slow model, so our reader keeps waiting (a documented limitation, not a false
    `ProducerLostError`)."""
    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    stream_id = new_id()
    reference = REFERENCES[0]
    async with (
        python_context(redis_server.url, prefix) as py,
        node_context(node_interop, reference, redis_server.url, prefix, bare=bare) as producer,
    ):
        produced = await producer.produce(stream_id)
        await producer.write(produced["source"], "abc")
        await producer.read(produced["handle"], length=3)
        follower = await py.resume_existing_stream(stream_id)
        assert follower is not None
        assert await follower.next_batch() == [("abc", 3)]
        await producer.call("fail", source=produced["source"])
        if bare:
            with anyio.fail_after(5):
                assert await producer.process.wait() == 1
            with anyio.fail_after(LIVENESS + 1.0), pytest.raises(rs.ProducerLostError):
                await follower.next_batch()
        else:
            with anyio.move_on_after(LIVENESS * 3) as waited:
                await follower.next_batch()
            assert waited.cancelled_caught  # still waiting: no error, no end
            await follower.aclose()


@pytest.mark.parametrize("reference", NODE_REDIS, ids=str)
async def test_a_lost_done_message_ends_our_reader_from_the_sentinel(
    node_interop: Path, redis_server: RedisServer, reference: Reference
) -> None:
    """The DONE message is pub/sub, at most once: here it never arrives (the publisher drops
    it, as the reference's own tests do); the sentinel says "DONE", which our reader checks
    while idle (twice in a row, the 2.2.13 watchdog's rule)."""
    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    stream_id = new_id()
    async with (
        python_context(redis_server.url, prefix) as py,
        node_context(node_interop, reference, redis_server.url, prefix, drop_done=True) as producer,
    ):
        produced = await producer.produce(stream_id)
        await producer.write(produced["source"], *PARTS[:HEAD])
        await producer.read(produced["handle"], length=units16("".join(PARTS[:HEAD])))
        follower = await py.resume_existing_stream(stream_id, INSIDE_PAIR)
        await producer.write(produced["source"], *PARTS[HEAD:])
        await producer.close(produced["source"])
        with anyio.fail_after(LIVENESS + 1.0):
            assert await read_all(follower) == slice16(FULL, INSIDE_PAIR)


@pytest.mark.parametrize("reference", EXPLICIT, ids=str)
async def test_two_producers_under_one_id_end_our_reader_with_a_conflict(
    node_interop: Path, redis_server: RedisServer, reference: Reference
) -> None:
    """`createNewResumableStream` checks nothing: called twice (two processes), or by us and
    then by Node, one id has two producers. Our reader learns it from the number of
    subscribers its request reached, rather than mix their texts. (We refuse the other order:
    `create_new_resumable_stream` of a running stream raises.)"""
    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    url = redis_server.url
    async with (
        python_context(url, prefix) as py,
        node_context(node_interop, reference, url, prefix) as first,
        node_context(node_interop, reference, url, prefix) as second,
    ):
        with anyio.fail_after(STEP):
            stream_id = new_id()
            for node in (first, second):
                produced = await node.produce(stream_id, mode="explicit")
                await node.write(produced["source"], "text")
            with pytest.raises(rs.ProducerConflictError):
                await py.resume_existing_stream(stream_id)
            with pytest.raises(rs.ResumableStreamError, match="already running"):
                await py.create_new_resumable_stream(stream_id, never)

            stream_id = new_id()
            feed = Feed()
            own = await py.create_new_resumable_stream(stream_id, feed.source)
            await feed.write("ours")
            await first.produce(stream_id, mode="explicit")
            async with python_context(url, prefix) as other:
                with pytest.raises(rs.ProducerConflictError):
                    await other.resume_existing_stream(stream_id)
            await feed.close()
            assert await read_all(own) == "ours"


@pytest.mark.parametrize("reference", [REFERENCES[0], REFERENCES[1]], ids=str)
async def test_node_readers_close_from_the_sentinel_when_our_done_message_is_lost(
    node_interop: Path, redis_server: RedisServer, reference: Reference
) -> None:
    """Our producer writes "DONE" to the sentinel before, and independently of, its DONE
    messages: with those lost, 2.2.13's watchdog still closes its readers."""
    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    stream_id = new_id()
    backend = DroppingDone(RedisBackend(redis_server.url))
    async with (
        rs.ResumableStreamContext(backend=backend, key_prefix=prefix, compat="vercel") as py,
        node_context(
            node_interop,
            reference,
            redis_server.url,
            prefix,
            extra={"doneWatchdogIntervalMs": 100},
        ) as node,
    ):
        feed = Feed()
        own = await py.resumable_stream(stream_id, feed.source)
        await feed.write("abc")
        resumed = await node.resume(stream_id, 1)
        await feed.write("def")
        await feed.close()
        assert await read_all(own) == "abcdef"
        with anyio.fail_after(2.0):
            read = await node.read(resumed["handle"], ms=1500)
        assert read.done
        assert read.text == "bcdef"


async def test_our_reader_asks_again_after_its_subscriber_reconnects(
    node_interop: Path, redis_server: RedisServer
) -> None:
    """Redis drops every subscriber connection mid-stream (`CLIENT KILL TYPE pubsub`), ours and
    the Node producer's: both reconnect, and the reader asks again from its UTF-16 position
    (inside a pair), on a new channel: exact text, nothing twice."""
    import redis.asyncio

    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    stream_id = new_id()
    watched = Lossy(RedisBackend(redis_server.url))
    async with (
        rs.ResumableStreamContext(backend=watched, key_prefix=prefix, compat="vercel") as py,
        node_context(node_interop, REFERENCES[0], redis_server.url, prefix) as node,
    ):
        with anyio.fail_after(STEP):
            produced, follower, got = await follow_node_stream(node, py, stream_id)
            client = redis.asyncio.Redis.from_url(redis_server.url)
            try:
                await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            finally:
                await client.aclose()
            await node.write(produced["source"], PARTS[HEAD])
            await watched.reconnected.wait()
            await node.write(produced["source"], *PARTS[HEAD + 1 :])
            await node.close(produced["source"])
            got += await read_all(follower)
            assert got == slice16(FULL, INSIDE_PAIR)


async def test_text_lost_in_an_outage_is_asked_for_again(
    node_interop: Path, redis_server: RedisServer
) -> None:
    """Messages published while our subscriber was down are gone (pub/sub is at most once, and
    the reference's messages carry no offsets): on the reconnect the reader asks the Node
    producer again from its position. The outage is acted out by a backend that drops what
    it receives until it reports the reconnect."""
    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    stream_id = new_id()
    lossy = Lossy(RedisBackend(redis_server.url))
    async with (
        rs.ResumableStreamContext(backend=lossy, key_prefix=prefix, compat="vercel") as py,
        node_context(node_interop, REFERENCES[0], redis_server.url, prefix) as node,
    ):
        with anyio.fail_after(STEP):
            produced, follower, got = await follow_node_stream(node, py, stream_id)
            lossy.dropping = True
            await node.write(produced["source"], PARTS[HEAD])
            while not lossy.dropped:
                await lossy.changed.wait()
            lossy.reconnect()
            await node.write(produced["source"], *PARTS[HEAD + 1 :])
            await node.close(produced["source"])
            got += await read_all(follower)
            assert got == slice16(FULL, INSIDE_PAIR)


async def follow_node_stream(
    node: NodeContext, py: rs.ResumableStreamContext, stream_id: str
) -> tuple[dict[str, Any], rs.ResumableStream, str]:
    """A Node producer of `stream_id` that wrote the first chunks, and our reader of it from
    inside a pair, with what it read of them."""
    produced = await node.produce(stream_id)
    await node.write(produced["source"], *PARTS[:HEAD])
    head = "".join(PARTS[:HEAD])
    await node.read(produced["handle"], length=units16(head))
    follower = await py.resume_existing_stream(stream_id, INSIDE_PAIR)
    assert follower is not None
    got = "".join(str(item) for item, _ in await follower.next_batch())
    assert got == slice16(head, INSIDE_PAIR)
    return produced, follower, got


class Lossy:
    """A backend whose connection drops the messages it receives while `dropping`, until the
    test calls `reconnect()` (what the backend reports after an outage)."""

    def __init__(self, backend: rs.Backend) -> None:
        self._backend = backend
        self.dropping = False
        self.dropped = 0
        self.changed = anyio.Event()
        self.reconnected = anyio.Event()  # the real backend reported a reconnect
        self._on_reconnect: Any = None

    @asynccontextmanager
    async def connect(self, on_message: Any, on_reconnect: Any = None) -> AsyncIterator[Any]:
        def receive(channel: str, data: bytes) -> None:
            if not self.dropping:
                on_message(channel, data)
                return
            self.dropped += 1
            self.changed.set()
            self.changed = anyio.Event()

        def reconnected() -> None:
            self.reconnected.set()
            on_reconnect()

        self._on_reconnect = on_reconnect
        async with self._backend.connect(receive, reconnected) as connection:
            yield connection

    def reconnect(self) -> None:
        self.dropping = False
        self._on_reconnect()


async def test_what_goes_on_the_wire_is_what_a_node_peer_can_read(
    node_interop: Path, redis_server: RedisServer
) -> None:
    """Everything published under the prefix, tapped (PSUBSCRIBE) while our producer serves
    Python and Node followers, is cancelled from another context, and our follower reads a
    Node stream: requests are the reference's JSON and nothing else, a cancel goes on its own
    channel, no message but a listener's last equals the DONE message, none is longer than
    `max_message_size`; the only keys are the shared sentinel and our outcome key, with TTLs."""
    import redis.asyncio

    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    tapped: list[tuple[str, bytes]] = []
    client = redis.asyncio.Redis.from_url(redis_server.url)
    tap = client.pubsub()
    await tap.psubscribe(f"{prefix}:*")

    async def listen() -> None:
        async for message in tap.listen():
            if message["type"] == "pmessage":
                tapped.append((message["channel"].decode(), message["data"]))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            async with (
                python_context(redis_server.url, prefix, max_message_size=8) as py,
                python_context(redis_server.url, prefix) as other,
                node_context(node_interop, REFERENCES[0], redis_server.url, prefix) as node,
            ):
                with anyio.fail_after(STEP):
                    stream_id = new_id()
                    feed = Feed()
                    own = await py.resumable_stream(stream_id, feed.source)
                    await feed.write(*PARTS[:HEAD], wire_done)
                    follower = await other.resume_existing_stream(stream_id, 3)
                    resumed = await node.resume(stream_id, 5)
                    await feed.write(*PARTS[HEAD:])
                    await other.cancel_stream(stream_id)
                    expected = "".join(PARTS[:HEAD]) + wire_done + "".join(PARTS[HEAD:])
                    with pytest.raises(rs.StreamCancelledError):
                        await read_all(own)
                    await feed.close()
                    got, error = await read_until_error(follower)
                    assert isinstance(error, rs.StreamCancelledError)
                    read = await node.read(resumed["handle"])
                    assert read.done
                    # Cut by the cancel wherever it came: what each got is exact so far.
                    assert slice16(expected, 3).startswith(got)
                    assert slice16(expected, 5).startswith(read.text)

                    node_stream = new_id()
                    produced = await node.produce(node_stream)
                    await node.write(produced["source"], "abc")
                    await node.read(produced["handle"], length=3)
                    node_follower = await py.resume_existing_stream(node_stream, 1)
                    await node.close(produced["source"])
                    assert await read_all(node_follower) == "bc"
                    keys = sorted([k.decode() async for k in client.scan_iter(f"{prefix}:*")])
                    assert keys == sorted(
                        [
                            f"{prefix}:rs:sentinel:{stream_id}",
                            f"{prefix}:rs:outcome:{stream_id}",
                            f"{prefix}:rs:sentinel:{node_stream}",
                        ]
                    )
                    for key in keys:
                        assert await client.ttl(key) > 0
            tg.cancel_scope.cancel()
    finally:
        await tap.aclose()
        await client.aclose()
    base = f"{prefix}:rs:"
    kinds = {channel[len(base) :].split(":", 1)[0] for channel, _ in tapped}
    assert kinds == {"request", "chunk", "cancel"}
    by_channel: dict[str, list[bytes]] = {}
    for channel, data in tapped:
        assert channel.startswith(base)
        by_channel.setdefault(channel, []).append(data)
        if ":request:" in channel:
            request = json.loads(data)
            assert isinstance(request, dict)
            assert set(request) <= {"listenerId", "skipCharacters"}
            assert isinstance(request["listenerId"], str)
            skip = request.get("skipCharacters")
            assert skip is None or (type(skip) is int and skip >= 0)
    for channel, messages in by_channel.items():
        if ":chunk:" in channel:
            assert wire.DONE_BYTES not in messages[:-1]
    python_chunks = [
        data
        for channel, data in tapped
        if ":chunk:" in channel and data != wire.DONE_BYTES and len(data.decode()) > 8
    ]
    # Only the Node producer's "abc" replay could be longer, and it is not.
    assert python_chunks == []


wire_done = wire.DONE_MESSAGE  # user text equal to the reference's DONE message


# A browser, two Python workers and a Node reader on one stream

PAGE = b"""<!doctype html><meta charset="utf-8"><script>
window.events = [];
window.start = (url) => {
  const source = new EventSource(url);
  source.onmessage = (e) => window.events.push({ data: e.data, id: e.lastEventId });
  source.onerror = () => { window.state = source.readyState; };
  window.source = source;
};
</script>"""


class TwoWorkers:
    """An ASGI app standing for two workers behind a load balancer: a stream's first request
    goes to worker A (which produces it), every reconnect (it carries `Last-Event-ID`) to
    worker B. `cut()` drops A's open responses mid-body, as a dropped network would."""

    def __init__(self, a: Any, b: Any) -> None:
        self.apps = {"a": a, "b": b}
        self.requests: list[tuple[str, str | None, int | None]] = []  # worker, cursor, status
        self.changed = anyio.Event()
        self._open: dict[str, set[anyio.CancelScope]] = {"a": set(), "b": set()}

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, predicate: Any) -> None:
        while not predicate():
            await self.changed.wait()

    def cut(self) -> None:
        for scope in self._open["a"]:
            scope.cancel()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/":
            headers = [(b"content-type", b"text/html; charset=utf-8")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": PAGE})
            return
        if not scope["path"].startswith("/stream/"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        cursor = dict(scope["headers"]).get(b"last-event-id")
        worker = "a" if cursor is None else "b"
        index = len(self.requests)
        self.requests.append((worker, None if cursor is None else cursor.decode(), None))
        self._notify()

        async def tracking_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                request = self.requests[index]
                self.requests[index] = (request[0], request[1], message["status"])
                self._notify()
            await send(message)

        with anyio.CancelScope() as cut:
            self._open[worker].add(cut)
            try:
                await self.apps[worker](scope, receive, tracking_send)
            finally:
                self._open[worker].discard(cut)
        # Cut: returning with the body unfinished makes the server drop the connection.


async def test_an_event_source_cut_mid_stream_resumes_exactly_on_a_second_worker(
    node_interop: Path, redis_server: RedisServer
) -> None:
    """Chromium's own `EventSource` reads a stream that worker A produces; its connection is
    dropped mid-stream and it reconnects (`Last-Event-ID`: a UTF-16 offset, 19 where Python
    counts 16 characters) to worker B, which follows A's producer over the reference protocol:
    exact text, event ids in UTF-16 units. A Node reader resuming from the offset the browser
    last saw gets exactly the rest."""
    import socket

    import uvicorn

    from resumable_stream.asgi import EventStreamApp

    from .browser import chromium

    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    stream_id = new_id()
    gate = anyio.Event()

    async def produce(stream: str, scope: Any) -> AsyncIterator[str]:
        for part in PARTS[:HEAD]:
            yield part
        await gate.wait()
        for part in PARTS[HEAD:]:
            yield part

    head = units16("".join(PARTS[:HEAD]))
    assert head == 19
    assert len("".join(PARTS[:HEAD])) == 16
    url = redis_server.url
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with (
            python_context(url, prefix) as worker_a,
            python_context(url, prefix) as worker_b,
            node_context(node_interop, REFERENCES[0], url, prefix) as node,
            chromium() as browser,
            anyio.create_task_group() as tg,
        ):
            app = TwoWorkers(
                EventStreamApp(worker_a, produce, retry=50), EventStreamApp(worker_b, retry=50)
            )
            config = uvicorn.Config(
                app, lifespan="off", ws="none", log_config=None, access_log=False
            )
            config.timeout_graceful_shutdown = 2
            server = uvicorn.Server(config)
            tg.start_soon(server.serve, [sock])
            page_context = await browser.new_context()
            try:
                with anyio.fail_after(STEP):
                    page = await page_context.new_page()
                    await page.goto(base + "/")
                    await page.evaluate("(url) => start(url)", f"/stream/{stream_id}")
                    await page.wait_for_function(f"window.events.length === {HEAD}")
                    app.cut()
                    await app.until(lambda: len(app.requests) == 2 and app.requests[1][2])
                    assert app.requests[:2] == [("a", None, 200), ("b", str(head), 200)]
                    resumed = await node.resume(stream_id, head)
                    assert resumed["kind"] == "stream"
                    gate.set()
                    await page.wait_for_function("window.state === EventSource.CLOSED")
                    events = await page.evaluate("window.events")
                    read = await node.read(resumed["handle"])
            finally:
                await page_context.close()
                server.should_exit = True
    # Worker B's follower may get the chunks that came in a burst as one message (the
    # reference's messages carry no boundaries): the text and its offsets are exact.
    assert [event["data"] for event in events[:HEAD]] == PARTS[:HEAD]
    assert "".join(event["data"] for event in events) == FULL
    position = 0
    for event in events:
        position += units16(event["data"])
        assert event["id"] == str(position)
    # The reconnect after the end: nothing more (204), which stops the browser.
    assert app.requests[2:] == [("b", str(units16(FULL)), 204)]
    assert read.done
    assert read.text == slice16(FULL, head)


async def test_a_node_replay_too_large_for_redis_pubsub_buffer_is_an_error_not_a_hang(
    node_interop: Path, redis_server: RedisServer
) -> None:
    """The reference answers with one message: 40 MiB of it is over Redis' default
    `client-output-buffer-limit pubsub` (32 MiB), so Redis drops our subscriber each time it
    is sent. Our reader asks once more (under a new listener), then gives up with a typed
    error within `resume_timeout`; never a hang. (Valkey, which counts a published message
    by reference rather than by copy, sometimes delivers it: then the reader gets the text
    whole.) Ours sends the same replay in pieces of `max_message_size`, which a Node reader
    gets whole."""
    prefix = f"compat-{uuid.uuid4().hex[:12]}"
    stream_id = new_id()
    async with (
        python_context(redis_server.url, prefix, resume_timeout=1.0) as py,
        node_context(node_interop, REFERENCES[0], redis_server.url, prefix) as node,
    ):
        produced = await node.produce(stream_id)
        await node.write(produced["source"], "x" * 1024, repeat=40 << 10)
        await node.read(produced["handle"], length=40 << 20, quiet=True)
        resumed: rs.ResumableStream | None = None
        error: rs.ProducerUnavailableError | None = None
        with anyio.fail_after(1.0 + 3.0):
            try:
                resumed = await py.resume_existing_stream(stream_id)
            except rs.ProducerUnavailableError as exc:
                error = exc
        assert not isinstance(error, rs.ProducerLostError)  # it is alive
        if server_binary().name == "redis":
            assert resumed is None, "Redis delivered a message over its pub/sub buffer limit"
        elif resumed is not None:
            received = 0  # the offset reached
            with anyio.fail_after(10):
                while received < 40 << 20:
                    received = (await resumed.next_batch())[-1][1]
            assert received == 40 << 20
        await node.close(produced["source"])

        # Our replay goes out in 1 MiB pieces as fast as Redis takes them; a Node reader on a
        # busy machine can fall 32 MiB behind and be dropped as well (its client resubscribes
        # and the reference reader waits forever: it has no way to ask again). What this part
        # shows is the pieces (the reader counts its messages), with no limit to lag against.
        import redis.asyncio

        admin = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
        limits = (await admin.config_get("client-output-buffer-limit"))[
            "client-output-buffer-limit"
        ]
        await admin.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        try:
            ours = new_id()
            feed = Feed()
            own = await py.resumable_stream(ours, feed.source)
            assert own is not None
            await feed.write("x" * (40 << 20))
            assert (await own.next_batch())[-1][1] == 40 << 20
            handle = (await node.resume(ours))["handle"]
            await feed.write("end")
            await feed.close()
            read = await node.read(handle, quiet=True)
        finally:
            await admin.config_set("client-output-buffer-limit", str(limits))
            await admin.aclose()
        assert read.done
        assert read.error is None
        assert read.chunks >= 40  # in pieces
        assert (await node.call("read", handle=handle, quiet=True))["length"] == ((40 << 20) + 3)
