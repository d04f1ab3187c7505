"""The framework-neutral core (`resumable_stream.http`): the decisions from plain request values,
the same as the ASGI response's, and the body iterator with its keep-alive, on every backend."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import pytest

import resumable_stream as rs
from resumable_stream.asgi import EventStreamResponse, with_context
from resumable_stream.http import EventStream, EventStreamBody, PreparedResponse, prepare_stop
from resumable_stream.sse import ServerSentEvent, SSEDecoder
from resumable_stream.tasks import TaskEndpoint, TaskRequest

from .asgi_driver import client, serve
from .conftest import HTTP_FLAVORS, Workers
from .helpers import Faulty, TestingSource, never_called, poll_until, read

pytestmark = pytest.mark.anyio

STEP = 5.0  # seconds: the bound of any one wait
DURABLE = True  # conftest: every `workers` test here runs in both modes


@pytest.fixture(params=HTTP_FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # HTTP-level: the backends under uvloop too


class Tracked:
    """A reader that records whether it was closed, wrapped around a real one."""

    def __init__(self, inner: rs.ResumableStream) -> None:
        self.inner = inner
        self.closed = False

    @property
    def attempt(self) -> int:
        return self.inner.attempt

    def __aiter__(self) -> Tracked:
        return self

    async def __anext__(self) -> str:
        return await self.inner.__anext__()

    async def next_batch(self, limit: int | None = None) -> Any:
        return await self.inner.next_batch(limit)

    def take_ready(self) -> Any:
        return self.inner.take_ready()

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


class TrackingContext:
    """A context whose readers are `Tracked`: what a body did with its reader shows."""

    compat = None  # native mode (what the task and AI SDK endpoints check)

    def __init__(self, inner: rs.ResumableStreamContext) -> None:
        self.inner = inner
        self.readers: list[Tracked] = []

    def _track(self, reader: rs.ResumableStream | None) -> Tracked | None:
        if reader is None:
            return None
        self.readers.append(Tracked(reader))
        return self.readers[-1]

    async def resumable_stream(
        self, stream_id: str, make: Any, resume_at: Any = None, **options: Any
    ) -> Any:
        return self._track(await self.inner.resumable_stream(stream_id, make, resume_at, **options))

    async def resume_existing_stream(
        self, stream_id: str, resume_at: Any = None, **options: Any
    ) -> Any:
        return self._track(await self.inner.resume_existing_stream(stream_id, resume_at, **options))

    async def has_existing_stream(self, stream_id: str) -> Any:
        return await self.inner.has_existing_stream(stream_id)

    async def current_attempt(self, stream_id: str, **options: Any) -> Any:
        return await self.inner.current_attempt(stream_id, **options)


def tracking(context: rs.ResumableStreamContext) -> Any:
    return TrackingContext(context)


async def body_of(response: PreparedResponse) -> bytes:
    """The whole body, within STEP."""
    if response.body is None:
        return response.content
    pieces = []
    with anyio.fail_after(STEP):
        async for piece in response.body:
            pieces.append(piece)
    return b"".join(pieces)


async def next_piece(body: EventStreamBody) -> bytes:
    with anyio.fail_after(STEP):
        return await body.__anext__()


async def next_frames(body: EventStreamBody) -> bytes:
    """The next piece that is not a keep-alive (a durable stream's followers read its text from
    the store, which the producer writes every `flush_interval`: they may idle meanwhile)."""
    while (piece := await next_piece(body)) == b": keep-alive\n\n":
        pass
    return piece


def events(data: bytes) -> list[ServerSentEvent]:
    return SSEDecoder().feed(data)


# The decisions, the same as the ASGI response's


REQUESTS = [
    pytest.param({}, "", id="new"),
    pytest.param({"Last-Event-ID": "1"}, "", id="header"),
    pytest.param({}, "resumeAt=2", id="query"),
    pytest.param({"Last-Event-ID": "2"}, "resumeAt=0", id="header-wins"),
    pytest.param({"Last-Event-ID": "3"}, "", id="at-the-end"),
    pytest.param({"Last-Event-ID": "end"}, "", id="seen-the-end"),
    pytest.param({"Last-Event-ID": "x"}, "", id="bad-header"),
    pytest.param({}, "resumeAt=1&resumeAt=2", id="twice"),
    pytest.param({}, "resumeAt=%FF", id="bad-query"),
]


@pytest.mark.parametrize("raw", [False, True], ids=["sse", "raw"])
@pytest.mark.parametrize(("headers", "query"), REQUESTS)
@pytest.mark.parametrize("ending", ["done", "failed"])
async def test_the_same_answers_as_the_asgi_response(
    workers: Workers, headers: dict[str, str], query: str, raw: bool, ending: str
) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("abc")
    if ending == "done":
        source.close()
        assert await read(own) == "abc"
    else:
        source.fail(RuntimeError("boom"))
        with pytest.raises(rs.StreamFailedError):
            await read(own)

    def make() -> AsyncIterator[str]:
        raise AssertionError("the stream exists: nothing may start it again")

    options: dict[str, Any] = {"raw": raw, "retry": 100, "headers": {"X-Kind": "t"}}
    asgi_response = EventStreamResponse(workers.C, "s", make, **options)
    async with client(asgi_response) as c, c.request("/s", headers=headers, query=query) as r:
        expected = (r.status, r.headers, await r.read())
    prepared = await EventStream(workers.C, "s", make, **options).prepare(
        headers=headers, query=query
    )
    got = await body_of(prepared)
    encoded = [(k.lower().encode(), v.encode()) for k, v in prepared.headers]
    assert (prepared.status, encoded, got) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {"Last-Event-ID": "2"},
        {"LAST-EVENT-ID": "2"},
        [("last-event-id", "2")],
        [(b"last-event-id", b"2")],
        [(b"Last-Event-Id", b""), (b"last-event-id", b"2")],  # the first non-empty one
    ],
    ids=["mapping", "upper", "pairs", "bytes", "first-non-empty"],
)
async def test_headers_as_any_framework_holds_them(workers: Workers, headers: Any) -> None:
    source = TestingSource()
    source.write("abcd")
    source.close()
    assert await read(await workers.P.resumable_stream("s", source.make)) == "abcd"
    prepared = await EventStream(workers.P, "s", raw=True).prepare(headers=headers)
    assert await body_of(prepared) == b"cd"


@pytest.mark.parametrize(
    "query",
    ["resumeAt=2", b"x=1&resumeAt=2", [("resumeAt", "2")], {"resumeAt": "2"}],
    ids=["str", "bytes", "pairs", "mapping"],
)
async def test_query_raw_or_parsed(workers: Workers, query: Any) -> None:
    source = TestingSource()
    source.write("abcd")
    source.close()
    assert await read(await workers.P.resumable_stream("s", source.make)) == "abcd"
    prepared = await EventStream(workers.P, "s", raw=True).prepare(query=query)
    assert await body_of(prepared) == b"cd"


async def test_authorize_gets_the_request_and_refusing_starts_nothing(workers: Workers) -> None:
    source = TestingSource()
    asked: list[tuple[object, str]] = []
    request = object()  # whatever the framework's request is

    async def refuse(request: object, stream_id: str) -> bool:
        asked.append((request, stream_id))
        return False

    answer = await EventStream(workers.P, "s", source.make, authorize=refuse).prepare(
        request=request
    )
    assert (answer.status, answer.content, answer.body) == (403, b"not allowed", None)
    assert asked == [(request, "s")]
    assert source.calls == 0
    assert await workers.P.has_existing_stream("s") is None


async def test_head_starts_and_reads_nothing(workers: Workers) -> None:
    source = TestingSource()
    context = tracking(workers.C)
    stream = EventStream(context, "s", source.make)
    unknown = await stream.prepare(method="HEAD")
    assert (unknown.status, unknown.body) == (204, None)
    assert source.calls == 0
    own = await workers.P.resumable_stream("s", source.make)
    source.write("a")
    assert await read(own, 1) == "a"
    running = await stream.prepare(method="HEAD")
    assert running.status == 200
    assert running.headers == stream.stream_headers()
    assert (running.content, running.body) == (b"", None)
    assert source.calls == 1  # the producer's, not the HEAD's
    assert context.readers == []
    source.close()
    assert await read(own) == ""


async def test_prepare_stop(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("a")
    bad = await prepare_stop(workers.C, "x" * 300)
    assert bad.status == 400
    assert b"stream_id must be 1 to 256 characters" in bad.content
    refused = await prepare_stop(workers.C, "s", request="r", authorize=lambda r, s: r != "r")
    assert refused.status == 403
    assert await workers.C.has_existing_stream("s") is True
    stopped = await prepare_stop(workers.C, "s")
    assert (stopped.status, stopped.headers, stopped.content) == (204, [], b"")
    with pytest.raises(rs.StreamCancelledError):
        await read(own)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"keepalive": 0}, ValueError),
        ({"retry": -1}, ValueError),
        ({"headers": {"x-a": "b\nc"}}, ValueError),
        ({"keepalive_frame": b": ping\n"}, ValueError),
        ({"authorize": "yes"}, TypeError),
        ({"id_prefix": "a\nb"}, ValueError),
    ],
    ids=repr,
)
def test_bad_arguments_fail_when_built(options: dict[str, Any], error: type[Exception]) -> None:
    context = rs.ResumableStreamContext(backend=rs.MemoryBackend())
    with pytest.raises(error):
        EventStream(context, "s", **options)


# The body


async def test_the_body_sends_the_stream_then_ends(workers: Workers) -> None:
    source = TestingSource()
    context = tracking(workers.P)
    prepared = await EventStream(context, "s", source.make, retry=500).prepare()
    assert prepared.status == 200
    assert prepared.streaming
    body = prepared.body
    assert body is not None
    assert await next_piece(body) == b"retry: 500\nid: 0\n\n"
    source.write("Hel")
    source.write(rs.Event("lo", "named"))
    source.close()
    rest = await body_of(prepared)
    assert events(rest) == [
        ServerSentEvent("Hel", id="3"),
        ServerSentEvent("lo", event="named", id="5"),
    ]
    [reader] = context.readers
    assert reader.closed
    with pytest.raises(StopAsyncIteration):
        await body.__anext__()


async def test_keepalive_while_idle_and_never_between_frames(workers: Workers) -> None:
    source = TestingSource()
    frame = b"event: ping\ndata: \n\n"
    stream = EventStream(workers.C, "s", source.make, keepalive=0.02, keepalive_frame=frame)
    body = (await stream.prepare()).body
    assert body is not None
    assert await next_piece(body) == b"id: 0\n\n"
    assert await next_piece(body) == frame
    assert await next_piece(body) == frame  # and again, a keep-alive after each idle interval
    source.write("a\nb")
    while (piece := await next_piece(body)) == frame:
        pass
    assert piece == b"id: 3\ndata: a\ndata: b\n\n"  # whole: a keep-alive never splits a frame
    source.close()
    assert [e for e in events(await body_of_iterator(body)) if e.event != "ping"] == []


async def body_of_iterator(body: EventStreamBody) -> bytes:
    pieces = []
    with anyio.fail_after(STEP):
        async for piece in body:
            pieces.append(piece)
    return b"".join(pieces)


async def test_keepalives_never_lose_or_repeat_text(workers: Workers) -> None:
    # The wait for the next frames goes on across keep-alives (it is never cancelled to send
    # one): every chunk comes exactly once, in order, however the two interleave.
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    body = (await EventStream(workers.C, "s", keepalive=0.001).prepare()).body
    assert body is not None
    sent = [f"{i} " for i in range(200)]

    async def produce() -> None:
        for index, chunk in enumerate(sent):
            source.write(chunk)
            # Pauses of a few keep-alive intervals now and then, like a model's, so that the
            # body waits for frames across keep-alives.
            await anyio.sleep(0.005 if index % 10 == 0 else 0)
        source.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        data = await body_of_iterator(body)
    assert "".join(e.data for e in events(data)) == "".join(sent)
    assert data.count(b": keep-alive\n\n") >= 10
    assert await read(own) == "".join(sent)


async def test_a_slow_consumer_is_not_idle(workers: Workers) -> None:
    # The keep-alive counts from the consumer's return for the next piece, that is, from the
    # end of its send: a send slower than the interval is activity, not idleness.
    source = TestingSource()
    body = (await EventStream(workers.P, "s", source.make, keepalive=0.05).prepare()).body
    assert body is not None
    assert await next_piece(body) == b"id: 0\n\n"
    source.write("x")
    assert await next_piece(body) == b"id: 1\ndata: x\n\n"
    source.write("y")
    # The slow send, acted out: the consumer comes back after several intervals.
    await anyio.sleep(0.2)
    assert await next_piece(body) == b"id: 2\ndata: y\n\n"
    source.close()
    assert await body_of_iterator(body) == b""


@pytest.mark.parametrize("how", ["cancel", "aclose", "disconnected"])
async def test_ending_the_body_detaches_the_reader_only(workers: Workers, how: str) -> None:
    source = TestingSource()
    context = tracking(workers.C)
    gone = anyio.Event()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("a")
    prepared = await EventStream(context, "s", keepalive=0.01).prepare(
        disconnected=gone.wait if how == "disconnected" else None
    )
    body = prepared.body
    assert body is not None
    assert await next_piece(body) == b"id: 0\n\n"
    assert await next_frames(body) == b"id: 1\ndata: a\n\n"
    if how == "cancel":
        # What Django and Quart do when the client goes: cancel the task that iterates.
        with anyio.move_on_after(0.05):
            while True:
                await body.__anext__()
    elif how == "aclose":
        await next_piece(body)  # a keep-alive: a wait for the next frames is pending now
        await prepared.aclose()
        await prepared.aclose()  # idempotent
    else:
        gone.set()
        await body_of_iterator(body)  # ends (within STEP) once the client is gone
    [reader] = context.readers
    assert reader.closed
    with pytest.raises(StopAsyncIteration):
        await body.__anext__()
    # The producer and its other readers carry on.
    source.write("b")
    source.close()
    assert await read(own) == "ab"
    after = await EventStream(workers.C, "s").prepare(headers={"Last-Event-ID": "1"})
    assert events(await body_of(after)) == [ServerSentEvent("b", id="2")]


async def test_a_follower_detached_by_the_body_unsubscribes(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("s", source.make)
    source.write("a")
    body = (await EventStream(workers.C, "s").prepare()).body
    assert body is not None
    assert await next_piece(body) == b"id: 0\n\n"
    assert await next_piece(body) == b"id: 1\ndata: a\n\n"
    live = workers.keys.live("s")
    assert live in await workers.channels()
    with anyio.move_on_after(0.05):
        await body.__anext__()  # cancelled while it waits
    await poll_until(lambda: _has(workers, live), False)
    source.close()
    assert await read(own) == "a"


async def _has(workers: Workers, channel: str) -> bool:
    return channel in await workers.channels()


async def test_a_failed_stream_ends_with_its_error_frame(workers: Workers) -> None:
    source = TestingSource()
    prepared = await EventStream(workers.C, "s", source.make, keepalive=0.01).prepare()
    source.write("x")
    source.fail(RuntimeError("secret"))
    *text, error = events(await body_of(prepared))
    assert [e.data for e in text] == ["x"]
    assert (error.event, error.id) == ("error", "end")
    assert json.loads(error.data) == {"code": "failed", "message": "the stream failed"}


async def test_a_stream_run_without_resumability_is_never_resumed_elsewhere() -> None:
    """Issue 22's campaign (`degraded-resume`, `spliced-resume`: 24 readers and 2 in six
    runs): a stream whose election failed runs for its caller only, yet its events carried
    ids like any other's, and a reconnect with one on another worker was served by offset from
    whatever Redis held under the id: nothing (a 204: the text cut short, no error), or another
    producer's stream of the id (another text, spliced on). Its ids say it ran so (`0.2`), and
    a reconnect with one learns that its text is incomplete."""

    async def refuse(command: Any, *args: Any) -> Any:
        raise rs.BackendError("Redis error: command not allowed when used memory > 'maxmemory'")

    backend = rs.MemoryBackend()
    async with (
        rs.ResumableStreamContext(backend=Faulty(backend, incr=refuse), key_prefix="d") as down,
        rs.ResumableStreamContext(backend=backend, key_prefix="d") as up,
    ):
        source = TestingSource()
        prepared = await EventStream(down, "s", source.make).prepare()
        for chunk in ("ab", "cd"):
            source.write(chunk)
        source.close()
        first, _ = events(await body_of(prepared))  # the client is cut after the first
        assert first.data == "ab"

        async def reconnect(endpoint: EventStream, cursor: str) -> None:
            answer = await endpoint.prepare(headers={"Last-Event-ID": cursor})
            assert answer.status == 200
            [frame] = events(await body_of(answer))
            assert frame.event == "error"
            assert json.loads(frame.data)["code"] == "incomplete"
            # That frame's id stops the client (EventSource reconnects once more).
            again = await endpoint.prepare(headers={"Last-Event-ID": frame.id})
            assert again.status == 204

        # Nothing under the id elsewhere: not a 204, which passes the text off as whole.
        for endpoint in (EventStream(up, "s", never_called), EventStream(up, "s")):
            await reconnect(endpoint, first.id)
        # Another producer of the id, elected since: its text is not the rest of this one.
        other = TestingSource()
        elected = await up.resumable_stream("s", other.make)
        other.write("XYZW")
        await reconnect(EventStream(up, "s", never_called), first.id)
        raw = await EventStream(up, "s", raw=True).prepare(query=f"resumeAt={first.id}")
        assert raw.status == 410
        other.close()
        assert await read(elected) == "XYZW"


async def test_a_reconnect_with_the_whole_text_is_stopped_while_redis_says_running() -> None:
    """Issue 22's campaign (`empty-200`, 4 readers in two runs): a producer finished while a
    full Redis refused its end, so Redis said it ran, and a reconnect at the end of its text
    reached the lingering producer: 200 and an empty body, and EventSource reconnected to the
    same answer again and again until the end was recorded. The body moves the cursor past the
    end (an id-only block), so the next reconnect gets the 204 of a finished stream."""
    refusing = True

    async def full(command: Any, *args: Any) -> Any:
        if refusing:
            raise rs.BackendError("Redis error: command not allowed when used memory > 'maxmemory'")
        return await command(*args)

    backend = rs.MemoryBackend()
    async with (
        rs.ResumableStreamContext(backend=Faulty(backend, set=full), key_prefix="f") as producing,
        rs.ResumableStreamContext(backend=backend, key_prefix="f") as other,
    ):
        source = TestingSource()
        own = await producing.resumable_stream("s", source.make)
        source.write("abcd")
        source.close()
        assert await read(own) == "abcd"  # its end could not be recorded
        assert await other.has_existing_stream("s") is True  # running, says Redis
        endpoint = EventStream(other, "s", never_called)
        cursor, statuses = "4", []
        for _ in range(3):
            answer = await endpoint.prepare(headers={"Last-Event-ID": cursor})
            statuses.append(answer.status)
            if answer.status == 204:
                break
            decoder = SSEDecoder()
            assert decoder.feed(await body_of(answer)) == []  # nothing more to read
            cursor = decoder.last_event_id or cursor
        assert statuses == [200, 204]
        refusing = False


# The task endpoint, for any framework


async def test_task_endpoint_decides_as_the_task_app_does(workers: Workers) -> None:
    async def double(task_input: Any, request: TaskRequest) -> Any:
        assert request.request == "the request"
        assert request.scope == {"type": "http"}
        return task_input * 2

    seen: list[tuple[object, str]] = []

    def authorize(request: object, task_id: str) -> bool:
        seen.append((request, task_id))
        return task_id != "denied"

    endpoint = TaskEndpoint(workers.P, double, max_input_size=10, authorize=authorize)
    common: dict[str, Any] = {"request": "the request", "scope": {"type": "http"}}
    wrong = await endpoint.prepare(method="PUT", **common)
    assert (wrong.status, wrong.headers[-1]) == (405, ("allow", "GET, POST"))
    large = await endpoint.prepare(method="POST", body=b"1" * 11, **common)
    assert large.status == 413
    bad = await endpoint.prepare(method="POST", body=b"{", **common)
    assert bad.status == 400
    denied = await endpoint.prepare(method="POST", headers={"X-Task-Id": "denied"}, **common)
    assert denied.status == 403
    limits: list[int] = []

    async def read_body(limit: int) -> bytes:
        limits.append(limit)
        return b"21"

    posted = await endpoint.prepare(method="POST", body=read_body, **common)
    assert limits == [11]  # at most one byte more than allowed is asked for
    task_id = dict(posted.headers)["x-task-id"]
    settle = [e for e in events(await body_of(posted)) if e.event == "settle"]
    assert [(e.data, e.id) for e in settle] == [("42", f"{task_id}:2")]
    got = await endpoint.prepare(method="GET", query="input=5&taskId=t2", **common)
    assert [e.data for e in events(await body_of(got)) if e.event == "settle"] == ["10"]
    assert [task for _, task in seen] == ["denied", task_id, "t2"]


# The public surface


def test_the_core_needs_no_framework() -> None:
    code = (
        "import sys, resumable_stream, resumable_stream.http, resumable_stream.asgi, "
        "resumable_stream.tasks; print(sorted(m for m in "
        "('django', 'quart', 'falcon', 'starlette', 'trio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["http", "asgi", "tasks", "django", "quart", "falcon"])
def test_each_public_module_has_a_sorted_all(name: str) -> None:
    module = importlib.import_module(f"resumable_stream.{name}")
    assert module.__all__ == sorted(module.__all__)
    for attribute in module.__all__:
        assert hasattr(module, attribute)


# with_context: a context for apps without a lifespan (Django)


@pytest.mark.parametrize("flavor", ["memory", "memory-trio"])
async def test_with_context_opens_the_context_for_the_servers_lifespan() -> None:
    context = rs.ResumableStreamContext(backend=rs.MemoryBackend(), drain_timeout=1)
    seen: list[str] = []

    async def one_chunk() -> AsyncIterator[str]:
        yield "hi"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        stream = await context.resumable_stream("s", one_chunk)  # only in an open context
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": (await read(stream)).encode()})

    async with serve(with_context(app, context)) as c, c.request("/s") as response:
        assert (response.status, await response.read()) == (200, b"hi")
    assert seen == ["http"]  # the lifespan is answered, not passed on
    with pytest.raises(RuntimeError, match="not open"):
        await context.resumable_stream("t", one_chunk)  # closed at shutdown


@pytest.mark.parametrize("flavor", ["memory"])
async def test_with_context_reports_a_context_that_cannot_open() -> None:
    class Broken:
        async def __aenter__(self) -> None:
            raise rs.BackendError("the store refused the credentials")

        async def __aexit__(self, *exc_info: object) -> None:
            raise AssertionError("never entered")

    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        sent.append(message)

    async def never(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the lifespan is not passed on")

    app = with_context(never, cast(rs.ResumableStreamContext, Broken()))
    with anyio.fail_after(STEP):
        await app({"type": "lifespan"}, receive, send)
    assert sent == [
        {
            "type": "lifespan.startup.failed",
            "message": "BackendError: the store refused the credentials",
        }
    ]
