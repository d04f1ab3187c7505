"""`follow`, `run_task` and `resumable-stream tail` against a real uvicorn server that cuts its
own responses mid-stream, and against fault-injecting httpx transports."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
import uvicorn

import resumable_stream as rs
from resumable_stream import client
from resumable_stream.__main__ import main
from resumable_stream.asgi import EventStreamApp, StopStreamApp
from resumable_stream.client import (
    RemoteStreamError,
    RetriesExhaustedError,
    TaskClientError,
    UnexpectedResponseError,
    follow,
    run_task,
)
from resumable_stream.sse import ServerSentEvent, SSEDecoder
from resumable_stream.tasks import TaskApp, TaskError, TaskRequest

from .conftest import ASYNCIO_LOOPS

pytestmark = pytest.mark.anyio

CHUNKS = ["Once ", "upon a ", "time, ", "a naïve ", "😀 emoji ", "and a\nbreak, ", "the ", "end."]
FULL = "".join(CHUNKS)
RETRY_MS = 1234


def offset(n: int) -> str:
    """The id of the event of chunk n (1-based): the character offset at its end."""
    return str(len("".join(CHUNKS[:n])))


@pytest.fixture(params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param  # asyncio and uvloop


@pytest.fixture(autouse=True)
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake clock: the client's reconnection delays are recorded, not slept."""
    chosen: list[float] = []

    async def sleep(delay: float) -> None:
        chosen.append(round(delay, 6))
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(client, "_sleep", sleep)
    return chosen


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run `app` under an in-process uvicorn on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # Connections wait in the backlog until uvicorn accepts them: no start-up race to poll.
    sock.listen()
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", ws="none", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    stopped = anyio.Event()

    async def run() -> None:
        try:
            await server.serve([sock])
        finally:
            stopped.set()

    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                # Let the server shut down even when the block failed: cancelled, it would
                # leave its connections open, and closing a uvloop loop then waits forever.
                server.should_exit = True
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await stopped.wait()


class Exchange:
    """One request as the server saw it, and what it sent back (decoded as it went)."""

    def __init__(self, path: str, headers: dict[str, str]) -> None:
        self.path = path
        self.headers = headers
        self.status = 0
        self.response_headers: dict[str, str] = {}
        self.decoder = SSEDecoder()
        self.events: list[ServerSentEvent] = []
        self.done = False
        self.scope = anyio.CancelScope()
        self.soft = False

    @property
    def cursor(self) -> str | None:
        return self.headers.get("last-event-id")


class Harness:
    """The test server: streams under /s/, a task at /task, /stop/, /plain; it cuts responses."""

    def __init__(self) -> None:
        self.streams: dict[str, Callable[[], AsyncIterator[str | rs.Event]]] = {}
        self.exchanges: list[Exchange] = []
        self.gate = anyio.Event()
        self.task_calls: list[tuple[Any, str]] = []
        self.context: rs.ResumableStreamContext | None = None
        self._changed = anyio.Event()

    def on(self, path: str) -> list[Exchange]:
        return [x for x in self.exchanges if x.path == path]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    async def cut(self, path: str, *, hard: bool = True) -> int:
        """End the open responses on `path`: hard, mid-body (uvicorn then closes the
        connection), or soft, with a clean end of body. Returns once they have ended."""
        victims = [x for x in self.on(path) if x.status and not x.done]
        for exchange in victims:
            exchange.soft = not hard
            exchange.scope.cancel()
        await self.wait_for(lambda: all(x.done for x in victims))
        return len(victims)

    async def wait_sent(self, path: str, id: str) -> None:
        """Wait until a response on `path` has sent the event with that id."""
        await self.wait_for(lambda: any(x.decoder.last_event_id == id for x in self.on(path)))

    def story(self, path: str, cuts: dict[int, bool]) -> Callable[[], AsyncIterator[str]]:
        """CHUNKS, cutting the responses on `path` once chunk n went out (hard if cuts[n])."""

        async def generate() -> AsyncIterator[str]:
            for n, chunk in enumerate(CHUNKS, 1):
                yield chunk
                if n in cuts:
                    await self.wait_sent(path, offset(n))
                    await self.cut(path, hard=cuts[n])

        return generate

    async def task(self, task_input: Any, request: TaskRequest) -> Any:
        self.task_calls.append((task_input, request.task_id))
        if task_input == "fail":
            raise TaskError("quota exceeded", "QUOTA")
        if task_input == "crash":
            raise RuntimeError("a detail that stays in the log")
        if task_input == "gate":
            await self.gate.wait()
        return {"echo": task_input, "task": request.task_id}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # startup
            async with rs.ResumableStreamContext(backend=rs.MemoryBackend()) as context:
                self.context = context
                await send({"type": "lifespan.startup.complete"})
                await receive()  # shutdown
                self.gate.set()
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert self.context is not None
        path: str = scope["path"]
        app: Any = _not_found
        if path.startswith("/s/"):
            app = EventStreamApp(self.context, self._make, retry=RETRY_MS)
        elif path == "/task":
            app = TaskApp(self.context, self.task, wait_interval=0.05, retry=RETRY_MS)
        elif path.startswith("/stop/"):
            app = StopStreamApp(self.context)
        elif path == "/plain":
            app = _plain
        await self._tracked(app, scope, receive, send)

    def _make(self, stream_id: str, scope: Any) -> AsyncIterator[str | rs.Event]:
        return self.streams[stream_id]()

    async def _tracked(self, app: Any, scope: Any, receive: Any, send: Any) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        exchange = Exchange(scope["path"], headers)
        self.exchanges.append(exchange)
        self._notify()

        async def tracking_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                exchange.response_headers = {
                    k.decode("latin-1"): v.decode("latin-1") for k, v in message["headers"]
                }
            else:
                exchange.events += exchange.decoder.feed(message.get("body", b""))
            await send(message)
            self._notify()

        try:
            with exchange.scope:
                await app(scope, receive, tracking_send)
            if exchange.scope.cancelled_caught and exchange.soft:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            # After a hard cut the app returns with its body unfinished: uvicorn closes the
            # connection, and the client sees an incomplete chunked body.
        finally:
            exchange.done = True
            self._notify()


async def _plain(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"no such thing"})


@pytest.fixture
async def server() -> AsyncIterator[tuple[Harness, str]]:
    harness = Harness()
    async with serve(harness) as url:
        yield harness, url


async def collect(url: str, **options: Any) -> list[ServerSentEvent]:
    with anyio.fail_after(10):
        async with aclosing(follow(url, **options)) as events:
            return [event async for event in events]


# follow, against the real server


async def test_follow_survives_hard_and_soft_cuts_with_no_duplicate(
    server: tuple[Harness, str], delays: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    harness, url = server
    caplog.set_level(logging.DEBUG, "resumable_stream")
    harness.streams["story"] = harness.story("/s/story", {3: True, 6: False})
    got = await collect(f"{url}/s/story")
    assert "".join(e.data for e in got) == FULL
    ids = [int(e.id) for e in got]
    assert ids == sorted(set(ids))  # each event once
    # Each reconnection resumed at the last id it had; the last one was told to stop.
    assert [(x.cursor, x.status) for x in harness.on("/s/story")] == [
        (None, 200),
        (offset(3), 200),
        (offset(6), 200),
        (str(len(FULL)), 204),
    ]
    assert delays == [RETRY_MS / 1000] * 3  # the server's `retry:`, before each reconnection
    # The hard cut broke the body mid-way; the soft one and the stream's end closed it cleanly.
    drops = [r.getMessage() for r in caplog.records if r.msg.startswith("reconnecting")]
    assert [message.rpartition(" after ")[2][:20] for message in drops] == [
        "RemoteProtocolError(",
        "None",
        "None",
    ]


async def test_follow_honours_a_retry_changed_mid_stream(
    server: tuple[Harness, str], delays: list[float]
) -> None:
    harness, url = server
    path = "/s/retry"

    async def stream() -> AsyncIterator[str | rs.Event]:
        yield "a"
        await harness.wait_sent(path, "1")
        await harness.cut(path)
        yield rs.Event("b", retry=250)

    harness.streams["retry"] = stream
    got = await collect(f"{url}{path}")
    assert [(e.data, e.id, e.retry) for e in got] == [("a", "1", RETRY_MS), ("b", "2", 250)]
    assert delays == [1.234, 0.25]


async def test_follow_stops_at_204(server: tuple[Harness, str], delays: list[float]) -> None:
    harness, url = server
    harness.streams["story"] = harness.story("/s/story", {})
    assert "".join(e.data for e in await collect(f"{url}/s/story")) == FULL
    # A finished stream answers a new request with 204 at once: nothing, and no retry.
    assert await collect(f"{url}/s/story") == []
    assert [x.status for x in harness.on("/s/story")] == [200, 204, 204]
    assert delays == [RETRY_MS / 1000]


async def test_follow_raises_the_servers_error_frame(server: tuple[Harness, str]) -> None:
    harness, url = server

    async def failing() -> AsyncIterator[str]:
        yield "partial "
        raise RuntimeError("boom")

    harness.streams["bad"] = failing
    got: list[str] = []

    async def read() -> None:
        async with aclosing(follow(f"{url}/s/bad")) as events:
            async for event in events:
                got.append(event.data)

    with anyio.fail_after(10), pytest.raises(RemoteStreamError) as info:
        await read()
    assert (info.value.code, info.value.message) == ("failed", "the stream failed")
    assert got == ["partial "]
    assert len(harness.on("/s/bad")) == 1  # an error frame is final: no reconnection


async def test_follow_cut_just_before_a_failure_learns_of_it(server: tuple[Harness, str]) -> None:
    harness, url = server
    path = "/s/cut-then-fail"

    async def failing() -> AsyncIterator[str]:
        yield "every word"
        await harness.wait_sent(path, "10")
        await harness.cut(path)  # the reader has all the text, and not the end
        raise RuntimeError("boom")

    harness.streams["cut-then-fail"] = failing
    got: list[str] = []

    async def read() -> None:
        async with aclosing(follow(f"{url}{path}")) as events:
            async for event in events:
                got.append(event.data)

    with anyio.fail_after(10), pytest.raises(RemoteStreamError) as info:
        await read()
    assert (info.value.code, got) == ("failed", ["every word"])
    # The reconnect at the end of the text got the error frame, not a 204 ("finished").
    assert [(x.cursor, x.status) for x in harness.on(path)] == [(None, 200), ("10", 200)]


async def test_run_task_cut_before_a_stop_reports_it(
    server: tuple[Harness, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    harness, url = server
    stopped = anyio.Event()

    async def sleep(delay: float) -> None:
        await stopped.wait()  # the client reconnects only once the task was stopped

    monkeypatch.setattr(client, "_sleep", sleep)
    errors: list[TaskClientError] = []

    async def run() -> None:
        with pytest.raises(TaskClientError) as info:
            await run_task(f"{url}/task", "gate", task_id="job-cut-stop")
        errors.append(info.value)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, httpx.AsyncClient() as http:
            tg.start_soon(run)
            await harness.wait_for(lambda: any(x.events for x in harness.on("/task")))
            assert await harness.cut("/task") == 1
            assert (await http.post(f"{url}/stop/job-cut-stop")).status_code == 204
            stopped.set()
    # Not NO_DATA ("ended without an outcome"): the reconnect learnt that it was stopped.
    assert (errors[0].code, errors[0].message) == ("cancelled", "the stream was cancelled")


@pytest.mark.parametrize(
    ("path", "cursor", "status", "text"),
    [
        ("/plain", None, 200, "not an event stream"),
        ("/nowhere", None, 404, "no such thing"),
        ("/s/story", "abc", 400, "Last-Event-ID must be a character offset"),
    ],
)
async def test_follow_raises_on_a_response_that_is_not_an_event_stream(
    server: tuple[Harness, str], path: str, cursor: str | None, status: int, text: str
) -> None:
    harness, url = server
    with pytest.raises(UnexpectedResponseError, match=text) as info:
        await collect(f"{url}{path}", last_event_id=cursor)
    assert info.value.status_code == status
    assert len(harness.exchanges) == 1


# follow, against fault-injecting transports


class Body(httpx.AsyncByteStream):
    """A response body sent in the given pieces, then broken by `error` if given."""

    def __init__(self, *pieces: bytes, error: Exception | None = None) -> None:
        self.pieces = pieces
        self.error = error
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece
            await anyio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


def sse(
    *pieces: bytes, error: Exception | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    headers = {"content-type": "text/event-stream", **(headers or {})}
    return httpx.Response(200, headers=headers, stream=Body(*pieces, error=error))


class Script:
    """A transport answering the n-th request with the n-th response (or raising it)."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = iter(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = next(self.answers, httpx.Response(204))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self))

    def header(self, name: str) -> list[str | None]:
        return [request.headers.get(name) for request in self.requests]


async def test_the_seed_cursor_is_kept_until_an_id_arrives(delays: list[float]) -> None:
    script = Script(
        httpx.ConnectError("refused"),
        sse(b"retry: 7\n\n: a comment, no id\n\n", error=httpx.ReadError("reset")),
        sse(b"id: 6\ndata: f\n\nid: 7\ndata: g\n\n"),
    )
    async with script.client() as http:
        got = await collect("http://test/s", client=http, last_event_id="5")
    assert [(e.data, e.id) for e in got] == [("f", "6"), ("g", "7")]
    assert script.header("last-event-id") == ["5", "5", "5", "7"]
    # Backoff after fruitless attempts (never below the server's retry), then `retry:` itself.
    assert delays == [0.1, 0.25, 0.007]


async def test_a_server_that_replays_too_much_causes_no_duplicate() -> None:
    script = Script(
        sse(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n", error=httpx.RemoteProtocolError("cut")),
        sse(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\nevent: wait\ndata:\n\nid: 3\ndata: c\n\n"),
    )
    async with script.client() as http:
        got = await collect("http://test/s", client=http)
    assert [(e.event, e.data) for e in got] == [
        ("message", "a"),
        ("message", "b"),
        ("wait", ""),
        ("message", "c"),
    ]


async def test_max_retries_gives_up(delays: list[float]) -> None:
    script = Script(*[httpx.ConnectError("refused")] * 5)
    async with script.client() as http:
        with pytest.raises(RetriesExhaustedError) as info:
            await collect("http://test/s", client=http, max_retries=2)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(script.requests) == 3
    assert delays == [0.1, 0.25]


# run_task


async def test_run_task_returns_the_result(server: tuple[Harness, str]) -> None:
    harness, url = server
    with anyio.fail_after(10):
        result = await run_task(f"{url}/task", {"n": 1})
    [(_, task_id)] = harness.task_calls
    assert result == {"echo": {"n": 1}, "task": task_id}


@pytest.mark.parametrize(
    ("task_input", "message", "code"),
    [("fail", "quota exceeded", "QUOTA"), ("crash", "internal error", "INTERNAL_ERROR")],
)
async def test_run_task_raises_the_servers_error(
    server: tuple[Harness, str], task_input: str, message: str, code: str
) -> None:
    _, url = server
    with anyio.fail_after(10), pytest.raises(TaskClientError) as info:
        await run_task(f"{url}/task", task_input)
    assert (info.value.message, info.value.code) == (message, code)


async def test_run_task_reports_a_stopped_task(server: tuple[Harness, str]) -> None:
    harness, url = server
    errors: list[TaskClientError] = []

    async def run() -> None:
        with pytest.raises(TaskClientError) as info:
            await run_task(f"{url}/task", "gate", task_id="job-stop")
        errors.append(info.value)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, httpx.AsyncClient() as http:
            tg.start_soon(run)
            await harness.wait_for(lambda: any(x.status == 200 for x in harness.on("/task")))
            assert (await http.post(f"{url}/stop/job-stop")).status_code == 204
    assert (errors[0].code, errors[0].message) == ("cancelled", "the stream was cancelled")


async def test_run_task_survives_a_disconnect_mid_task(server: tuple[Harness, str]) -> None:
    harness, url = server
    results: list[Any] = []

    async def run() -> None:
        results.append(await run_task(f"{url}/task", "gate"))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            # The task runs and its response streams: wait frames went out.
            await harness.wait_for(
                lambda: any(e.event == "wait" for x in harness.on("/task") for e in x.events)
            )
            [first] = harness.on("/task")
            task_id = first.response_headers["x-task-id"]
            cut_at = first.decoder.last_event_id  # the first frame's cursor: no chunk yet
            waits = len(first.events)
            assert await harness.cut("/task") == 1
            await harness.wait_for(lambda: len(harness.on("/task")) == 2)
            second = harness.on("/task")[1]
            await harness.wait_for(lambda: second.status != 0)
            running = not harness.gate.is_set()
            harness.gate.set()
    assert running
    assert results == [{"echo": "gate", "task": task_id}]
    assert harness.task_calls == [("gate", task_id)]  # it ran once
    expected = (task_id, f"{task_id}:0", 200)
    assert (second.headers["x-task-id"], second.cursor, second.status) == expected
    assert [e.event for e in second.events if e.event != "wait"] == ["settle"]
    print(
        f"\nrun_task mid-task disconnect: task {task_id}, cut at offset {cut_at} after "
        f"{waits} wait event(s) while the task was still running; reconnected with "
        f"X-Task-Id={second.headers['x-task-id']} Last-Event-ID={second.cursor} "
        f"-> {second.status}; result after reconnect: {results[0]}"
    )


async def test_run_task_without_an_outcome_or_a_task_id() -> None:
    script = Script(sse(b"event: wait\ndata:\n\n", headers={"x-task-id": "t1"}))
    async with script.client() as http:
        with anyio.fail_after(10), pytest.raises(TaskClientError, match="NO_DATA"):
            await run_task("http://test/task", 1, client=http)
    assert script.header("x-task-id") == [None, "t1"]
    assert script.header("last-event-id") == [None, "0"]  # a reconnection never restarts it

    # A start that may have reached the server is not sent again: it could run twice.
    script = Script(httpx.ConnectError("refused"), httpx.ReadTimeout("no answer"))
    async with script.client() as http:
        with anyio.fail_after(10), pytest.raises(TaskClientError, match="RECONNECT"):
            await run_task("http://test/task", 1, client=http)
    assert len(script.requests) == 2


# resumable-stream tail


async def test_tail_prints_the_text_through_a_cut(
    server: tuple[Harness, str], capsys: pytest.CaptureFixture[str]
) -> None:
    harness, url = server
    harness.streams["tail"] = harness.story("/s/tail", {2: True})
    command = ["tail", f"{url}/s/tail", "--header", "X-Test: yes"]
    with anyio.fail_after(20):
        assert await anyio.to_thread.run_sync(main, command) == 0
    assert capsys.readouterr().out == FULL
    assert [x.cursor for x in harness.on("/s/tail")] == [None, offset(2), str(len(FULL))]
    assert {x.headers.get("x-test") for x in harness.on("/s/tail")} == {"yes"}

    command = ["tail", f"{url}/s/tail", "--last-event-id", "5"]
    with anyio.fail_after(20):
        assert await anyio.to_thread.run_sync(main, command) == 0
    assert capsys.readouterr().out == FULL[5:]


async def test_tail_fails_with_a_message(
    server: tuple[Harness, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = server
    with anyio.fail_after(20):
        assert await anyio.to_thread.run_sync(main, ["tail", f"{url}/plain"]) == 1
    assert "not an event stream" in capsys.readouterr().err
    assert main(["tail", "--header", "no colon", url]) == 2


async def test_a_task_outcome_nested_too_deep_is_a_task_client_error() -> None:
    """A `settle` or an error payload json cannot decode for its depth (RecursionError, not
    ValueError) is a TaskClientError, never another exception out of run_task."""
    nested = "[" * 100_000
    for event, code in (("settle", "MALFORMED_RESULT"), ("server-error", "SERVER_ERROR")):
        body = f"id: 0\nevent: {event}\ndata: {nested}\n\n".encode()
        transport = httpx.MockTransport(
            lambda request, body=body: httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=body
            )
        )
        with anyio.fail_after(10):
            async with httpx.AsyncClient(transport=transport) as http:
                with pytest.raises(TaskClientError) as caught:
                    await run_task("http://tasks/run", {"x": 1}, client=http, max_retries=0)
        assert caught.value.code == code
