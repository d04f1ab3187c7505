"""The ASGI responses, driven message by message on every backend."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import resumable_stream as rs
from resumable_stream.asgi import EventStreamApp, EventStreamResponse
from resumable_stream.sse import ServerSentEvent

from .asgi_driver import Client, client
from .conftest import HTTP_FLAVORS, Workers
from .helpers import TestingSource, read

pytestmark = pytest.mark.anyio

DURABLE = True  # conftest: every `workers` test here runs in both modes


@pytest.fixture(params=HTTP_FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # HTTP-level: the backends under uvloop too


E = rs.Event


def sse(data: str, id: int, event: str = "message", retry: int | None = None) -> ServerSentEvent:
    return ServerSentEvent(data=data, event=event, id=str(id), retry=retry)


class Sources:
    """One TestingSource per stream id, made on first use."""

    def __init__(self) -> None:
        self.by_id: dict[str, TestingSource] = {}

    def __getitem__(self, stream_id: str) -> TestingSource:
        return self.by_id.setdefault(stream_id, TestingSource())

    def make(self, stream_id: str, scope: object) -> AsyncIterator[str | rs.Event]:
        return self[stream_id].make()


@pytest.fixture
async def two(workers: Workers) -> AsyncIterator[tuple[Client, Client, Sources]]:
    sources = Sources()
    async with (
        client(EventStreamApp(workers.P, sources.make, keepalive=None)) as a,
        client(EventStreamApp(workers.C, sources.make, keepalive=None)) as b,
    ):
        yield a, b, sources


async def test_each_chunk_is_an_event_whose_id_is_its_end_offset(two) -> None:
    a, _, sources = two
    async with a.request("/streams/s1") as response:
        assert response.status == 200
        assert response.header("content-type") == "text/event-stream; charset=utf-8"
        assert response.header("cache-control") == "no-cache, no-transform"
        assert response.header("x-accel-buffering") == "no"
        assert response.header("connection") is None
        source = sources["s1"]
        for chunk in ["Hel", "lo\nworld", E("{}", "meta"), "😀!"]:
            source.write(chunk)
        source.close()
        events = await response.events()
        assert response.finished
    assert events == [
        sse("Hel", 3),
        sse("lo\nworld", 11),
        sse("{}", 13, "meta"),
        sse("😀!", 15),
    ]


@pytest.mark.parametrize("how", ["header", "query", "both"])
async def test_reconnect_on_another_worker_resumes_exactly(two, how: str) -> None:
    a, b, sources = two
    source = sources["s"]
    async with a.request("/s") as first:
        source.write("one ")
        source.write(E("two ", "named"))
        seen = await first.events(2)
        first.disconnect()
    assert [e.data for e in seen] == ["one ", "two "]
    cursor = seen[-1].id
    headers = {"Last-Event-ID": cursor} if how != "query" else {}
    # With both, the browser's header wins over the page's original ?resumeAt=.
    query = "resumeAt=0" if how == "both" else f"resumeAt={cursor}" if how == "query" else ""
    source.write("three ")
    async with b.request("/s", headers=headers, query=query) as second:
        source.write(E("four", "named"))
        source.close()
        rest = await second.events()
    assert rest == [sse("three ", 14), sse("four", 18, "named")]
    assert "".join(e.data for e in seen + rest) == "one two three four"


async def test_cursor_mid_chunk_sends_the_rest_of_that_chunk(two) -> None:
    a, b, sources = two
    source = sources["s"]
    source.write(E("abcdef", "x"))
    async with a.request("/s") as first:
        assert await first.events(1) == [sse("abcdef", 6, "x")]
        async with b.request("/s", query="resumeAt=4") as second:
            source.close()
            assert await second.events() == [sse("ef", 6, "x")]


async def test_finished_stream_answers_204(two) -> None:
    a, b, sources = two
    async with a.request("/done") as first:
        sources["done"].write("x")
        sources["done"].close()
        await first.read()
    for c in (a, b):
        async with c.request("/done", headers={"Last-Event-ID": "1"}) as again:
            assert again.status == 204
            assert await again.read() == b""


@pytest.mark.parametrize(
    ("headers", "query", "message"),
    [
        ({"Last-Event-ID": "abc"}, "", b"Last-Event-ID must be a character offset"),
        ({"Last-Event-ID": "-1"}, "", b"Last-Event-ID must be a character offset"),
        ({"Last-Event-ID": "1" * 40}, "", b"Last-Event-ID must be a character offset"),
        ({"Last-Event-ID": "\u0661"}, "", b"Last-Event-ID must be a character offset"),
        ({}, "resumeAt=1.5", b"resumeAt must be a character offset"),
        ({}, "resumeAt=", b"resumeAt must be a character offset"),
        ({}, "resumeAt=%FF%FE", b"resumeAt must be a character offset"),
        ({}, "resumeAt=1&resumeAt=2", b"resumeAt at most once"),
    ],
)
async def test_malformed_cursor_answers_400_and_starts_nothing(two, headers, query, message):
    a, _, sources = two
    async with a.request("/s", headers=headers, query=query) as response:
        assert response.status == 400
        assert message in await response.read()
    assert sources.by_id == {}


async def test_bad_stream_id_answers_400(workers: Workers) -> None:
    app = EventStreamApp(workers.P, lambda sid, scope: TestingSource().make())
    async with client(app) as c, c.request("/s/" + "x" * 300) as response:
        assert response.status == 400
        assert b"stream_id must be 1 to 256 characters" in await response.read()


async def test_raw_mode_sends_exactly_the_text_from_the_cursor(workers: Workers) -> None:
    sources = Sources()
    async with (
        client(EventStreamApp(workers.P, sources.make, raw=True)) as a,
        client(EventStreamApp(workers.C, sources.make, raw=True)) as b,
        a.request("/r") as first,
    ):
        assert first.header("content-type") == "text/plain; charset=utf-8"
        sources["r"].write("héllo ")
        sources["r"].write(E("wörld", "ignored in raw mode"))
        assert (await first.chunk() or b"").startswith("héllo ".encode())
        async with b.request("/r", query="resumeAt=3") as second:
            sources["r"].write("!")
            sources["r"].close()
            assert (await second.read()).decode() == "lo wörld!"
        assert (await first.read()).decode() == "héllo wörld!"


async def test_keepalive_comment_while_idle_and_retry_first(workers: Workers) -> None:
    source = TestingSource()
    app = EventStreamApp(workers.P, lambda sid, scope: source.make(), keepalive=0.05, retry=750)
    async with client(app) as c, c.request("/k") as response:
        # The reconnection time, and a first cursor for a reader that has none yet.
        assert await response.chunk() == b"retry: 750\nid: 0\n\n"
        assert await response.chunk() == b": keep-alive\n\n"
        source.write(E("x", retry=100))
        source.close()
        events = await response.events()
    assert events == [sse("x", 1, retry=100)]
    assert b"event" not in response.body


async def test_keepalive_outlives_a_send_slower_than_its_interval(workers: Workers) -> None:
    # A client that reads slowly holds a send past the keep-alive deadline. The keep-alive
    # task then computed a negative delay, which anyio.sleep rejects: the response died.
    interval = 0.05
    source = TestingSource()
    app = EventStreamApp(workers.P, lambda sid, scope: source.make(), keepalive=interval)
    bodies: list[bytes] = []
    kept_alive = anyio.Event()
    never = anyio.Event()

    async def receive() -> Any:
        await never.wait()

    async def send(message: Any) -> None:
        piece = message.get("body", b"")
        if piece.startswith(b"id: "):
            # The slow reader, not synchronisation: this send lasts several intervals.
            await anyio.sleep(4 * interval)
        bodies.append(piece)
        if piece == b": keep-alive\n\n" and b"id: 4\ndata: slow\n\n" in bodies:
            kept_alive.set()  # the keep-alive goes on once the slow send is done

    scope: Any = {"type": "http", "method": "GET", "path": "/s", "headers": [], "query_string": b""}
    source.write("slow")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            await kept_alive.wait()
            source.close()
    assert bodies[-1] == b""  # the body was finished, not broken off


async def test_disconnect_ends_the_response_and_leaves_the_producer_running(two) -> None:
    a, b, sources = two
    source = sources["s"]
    async with a.request("/s") as first:
        source.write("a")
        assert await first.events(1) == [sse("a", 1)]
        first.disconnect()
        # The driver waits for the app to return within its step timeout.
    source.write("b")
    async with b.request("/s") as follower:
        source.write("c")
        source.close()
        assert await follower.events() == [sse("a", 1), sse("b", 2), sse("c", 3)]
    assert source.calls == 1


async def test_failed_stream_ends_with_a_safe_error_event(two) -> None:
    a, b, sources = two
    source = sources["f"]
    async with a.request("/f") as first, b.request("/f") as second:
        source.write("partial")
        assert await first.events(1) == [sse("partial", 7)]
        assert await second.events(1) == [sse("partial", 7)]
        source.fail(RuntimeError("secret database password"))
        for response in (first, second):
            [error] = await response.events()
            assert response.finished
            assert error.event == "error"
            assert json.loads(error.data) == {"code": "failed", "message": "the stream failed"}
            assert b"secret" not in response.body
            assert b"RuntimeError" not in response.body


@pytest.mark.parametrize("how", ["failed", "cancelled"])
async def test_a_reader_cut_just_before_a_failure_learns_it(two, workers: Workers, how) -> None:
    a, b, sources = two
    source = sources["f"]
    async with a.request("/f") as first:
        source.write("all the text")
        assert await first.events(1) == [sse("all the text", 12)]
        first.disconnect()  # cut with every chunk, before the end
    if how == "failed":
        source.fail(RuntimeError("boom"))
    else:
        await workers.C.cancel_stream("f")
    with anyio.fail_after(5):
        await source.finished.wait()
    for c in (a, b):
        # The reconnect (Last-Event-ID = the end of the text) learns how it ended, not "done".
        async with c.request("/f", headers={"Last-Event-ID": "12"}) as again:
            assert again.status == 200
            [error] = await again.events()
            assert error.event == "error"
            assert json.loads(error.data)["code"] == how
            assert error.id == "end"
        # The end frame's id makes the next reconnect stop the client.
        async with c.request("/f", headers={"Last-Event-ID": error.id}) as stop:
            assert stop.status == 204
    async with a.request("/f", headers={"Last-Event-ID": "3"}) as tail:
        events = await tail.events()
        assert [e.data for e in events[:-1]] == [" the text"]
        assert events[-1].event == "error"


async def test_a_raw_reader_of_a_failed_stream_gets_410(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("f", source.make)
    source.write("text")
    source.fail(RuntimeError("boom"))
    with pytest.raises(rs.StreamFailedError):
        await read(own)

    async def app(scope, receive, send):
        await EventStreamResponse(workers.C, "f", raw=True)(scope, receive, send)

    # A fetch-based reader with all the text learns the failure too.
    async with client(app) as c, c.request("/f", query="resumeAt=4") as response:
        assert response.status == 410


async def test_a_new_readers_first_frame_is_a_cursor(two) -> None:
    a, b, sources = two
    source = sources["n"]
    async with a.request("/n") as first:
        assert await first.chunk() == b"id: 0\n\n"  # sets the cursor, dispatches nothing
        source.write("x")
        assert await first.events(1) == [sse("x", 1)]
        async with b.request("/n", headers={"Last-Event-ID": "0"}) as resumed:
            first_piece = await resumed.chunk()
            assert not (first_piece or b"").startswith(b"id: 0\n\n")  # it has a cursor
        source.close()


async def test_resume_only_response_of_an_unknown_stream_answers_204(workers: Workers) -> None:
    async def app(scope, receive, send):
        await EventStreamResponse(workers.C, "nobody")(scope, receive, send)

    async with client(app) as c, c.request("/x") as response:
        assert response.status == 204


async def test_response_options_are_checked_at_construction(workers: Workers) -> None:
    with pytest.raises(ValueError, match="keepalive"):
        EventStreamResponse(workers.P, "s", keepalive=0)
    with pytest.raises(ValueError, match="retry"):
        EventStreamApp(workers.P, retry=-1)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"headers": {"x-a": 1}}, TypeError),
        ({"headers": {b"x-a": "b"}}, TypeError),
        ({"headers": [("x-a",)]}, TypeError),
        ({"headers": ["ab"]}, TypeError),
        ({"headers": {"x a": "b"}}, ValueError),
        ({"headers": {"": "b"}}, ValueError),
        ({"headers": {"x-a": "b\r\nx-injected: 1"}}, ValueError),
        ({"headers": {"x-a": "€"}}, ValueError),  # not Latin-1
        ({"headers": {"x-a": " b"}}, ValueError),  # servers reject it once the stream runs
        ({"keepalive_frame": ": ping\n\n"}, TypeError),
        ({"keepalive_frame": b": ping\n"}, ValueError),  # would run into the next event
        ({"authorize": "yes"}, TypeError),
        ({"make_stream": "text"}, TypeError),
    ],
    ids=lambda value: getattr(value, "__name__", repr(value)),
)
def test_bad_arguments_fail_when_the_response_is_built(
    options: dict[str, Any], error: type[Exception]
) -> None:
    # Not once the stream runs and the status is sent: then all a client sees is a 500.
    context = rs.ResumableStreamContext(backend=rs.MemoryBackend())
    with pytest.raises(error):
        EventStreamResponse(context, "s", **options)
    if "keepalive_frame" not in options:
        with pytest.raises(error):
            EventStreamApp(context, **options)


@pytest.mark.parametrize("headers", [{"X-Kind": "chat"}, [("X-Kind", "chat")]], ids=type)
async def test_extra_headers_as_a_mapping_or_pairs(workers: Workers, headers: Any) -> None:
    source = TestingSource()
    source.close()  # an empty stream: a 200 all the same
    app = EventStreamApp(workers.P, lambda sid, scope: source.make(), headers=headers)
    async with client(app) as c, c.request("/s") as response:
        assert response.status == 200
        assert response.header("x-kind") == "chat"
        assert await response.events() == []


async def test_only_get(workers: Workers) -> None:
    async with client(EventStreamApp(workers.P)) as c, c.request("/s", method="POST") as response:
        assert response.status == 405


async def test_reconnect_after_the_end_gets_the_tail_then_204(two) -> None:
    a, b, sources = two
    source = sources["t"]
    async with a.request("/t") as first:
        source.write("ab")
        assert await first.events(1) == [sse("ab", 2)]
        first.disconnect()
    source.write(E("cd", "last"))
    source.close()
    with anyio.fail_after(5):
        await source.finished.wait()
    async with b.request("/t", headers={"Last-Event-ID": "2"}) as second:
        assert second.status == 200
        assert await second.events() == [sse("cd", 4, "last")]
    async with b.request("/t", headers={"Last-Event-ID": "4"}) as third:
        assert third.status == 204


async def test_a_send_failing_with_oserror_ends_the_response_quietly(workers: Workers) -> None:
    # ASGI 2.4 servers need not send http.disconnect; a send to a gone client raises OSError.
    source = TestingSource()
    app = EventStreamApp(workers.P, lambda sid, scope: source.make(), keepalive=None)
    sent: list[Any] = []
    never = anyio.Event()
    first_body = anyio.Event()

    async def receive() -> Any:
        await never.wait()

    async def send(message: Any) -> None:
        if len(sent) == 2:
            raise OSError("connection reset by peer")
        sent.append(message)
        if message["type"] == "http.response.body":
            first_body.set()

    scope: Any = {"type": "http", "method": "GET", "path": "/s", "headers": [], "query_string": b""}
    source.write("one")
    source.write("two")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            await first_body.wait()
            source.write("three")  # the send of this one fails: the app must simply return
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    source.close()
    follower = await workers.C.resume_existing_stream("s", resume_at=0)
    assert await read(follower) == "onetwothree"  # the producer was not disturbed
