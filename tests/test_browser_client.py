"""The browser client `static/client.js` in headless Chromium, against a real uvicorn server.

The server runs in the test's own event loop (`uvicorn.Server` as a task), so the test holds its
tasks and streams at gates, cuts their open responses server side while the producers go on
(ending a response cleanly, or dropping the connection mid-body), and sees every request the
client made, `X-Task-Id` and `Last-Event-ID` included. The page imports the module from
`ClientScriptApp`; the test calls into it with `page.evaluate`.

Without Chromium or Playwright the browser tests are skipped (they fail under
`RESUMABLE_STREAM_REQUIRE_ALL=1`, as in CI); `RESUMABLE_STREAM_CHROMIUM` names another Chromium
binary.
"""

from __future__ import annotations

import json
import re
import socket
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from typing import Any

import anyio
import pytest
import uvicorn
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from resumable_stream import MemoryBackend, ResumableStreamContext, create_resumable_stream_context
from resumable_stream.asgi import (
    ClientScriptApp,
    EventStreamApp,
    EventStreamResponse,
    Message,
    Receive,
    Scope,
    Send,
)
from resumable_stream.sse import SSEDecoder
from resumable_stream.tasks import TaskApp, TaskError, TaskRequest

from .asgi_driver import client
from .browser import chromium
from .conftest import ASYNCIO_LOOPS
from .helpers import poll_until

pytestmark = pytest.mark.anyio

STEP = 10.0  # seconds: the bound of any one wait
BROWSER_TIMEOUT_MS = 10_000
RETRY_MS = 50  # the servers' `retry:`, so reconnections are quick
WAIT_INTERVAL = 0.05  # TaskApp's `wait` events

# A stream's chunks: SSE-hostile text (line ends, leading spaces, field lookalikes, non-BMP).
TOKENS = [
    "Hello",
    ", ",
    "wörld",
    "!\n",
    " leading space",
    "\n\nblank lines\n",
    ": not a comment",
    "data: not a field",
    "id: 99",
    "😀",
    " 中文 ",
    "tab\there\u2028",
    *(f" word{i}" for i in range(20)),
    " the end.",
]
GATE_AT = 12  # a stream's producer yields this many chunks, then waits for the test

PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>client.js under test</title>
<script type="module">
import * as client from "/client.js";

const plain = (error) => ({
  name: error?.name, message: error?.message, code: error?.code, status: error?.status,
  isStreamError: error instanceof client.StreamError,
});
// A promise's outcome as plain data, or {timeout: true} after `ms`.
window.outcome = async (promise, ms) => {
  let timer;
  const deadline = new Promise((resolve) => {
    timer = setTimeout(resolve, ms, { timeout: true });
  });
  try {
    return await Promise.race([
      promise.then((value) => ({ value }), (error) => ({ error: plain(error) })), deadline,
    ]);
  } finally {
    clearTimeout(timer);
  }
};
window.tasks = {};
window.startTask = (name, url, input) => {
  const record = { waits: 0, taskIds: [], reconnects: [] };
  record.promise = client.runTask(url, input, {
    onWait: () => { record.waits += 1; },
    onTaskId: (id) => record.taskIds.push(id),
    onReconnect: (info) => record.reconnects.push(info),
  });
  record.promise.catch(() => {});  // handled: the test awaits it later
  window.tasks[name] = record;
};
window.follows = {};
window.startFollow = (name, url, options) => {
  const record = { events: [], reconnects: [], ended: false, error: null };
  record.done = new Promise((resolve) => {
    record.controller = client.follow(url, {
      ...options,
      onChunk: (data, event) => record.events.push({ ...event, same: data === event.data }),
      onEnd: () => { record.ended = true; resolve(); },
      onError: (error) => { record.error = plain(error); resolve(); },
      onReconnect: (info) => record.reconnects.push(info),
    });
  });
  window.follows[name] = record;
};
window.sources = {};
window.startEventSource = (name, url) => {
  // The browser's own EventSource, as a page without our client would use it.
  const record = { events: [], waits: 0, errors: 0, readyState: 0 };
  const source = new EventSource(url);
  source.addEventListener("wait", () => { record.waits += 1; });
  for (const type of ["settle", "server-error", "internal-error"]) {
    source.addEventListener(type, (e) => {
      record.events.push({ type, data: e.data, id: e.lastEventId });
    });
  }
  source.onerror = () => { record.errors += 1; record.readyState = source.readyState; };
  window.sources[name] = record;
};
window.client = client;
window.ready = true;
</script>
"""


@pytest.fixture(scope="module", params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    # Playwright's async API runs on asyncio only (uvloop included), and the server runs in
    # the test's loop: asyncio and uvloop. Module scope lets one browser (a module fixture)
    # serve every test of a loop.
    return request.param


# The test server


@dataclass
class Seen:
    """A request the server got, and what it answered."""

    method: str
    path: str
    task_id: str | None
    last_event_id: str | None
    status: int | None = None
    sent: int = 0  # body bytes
    ended: bool = False


@dataclass(eq=False)
class _Open:
    seen: Seen
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    mode: str = "end"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _respond(send: Send, status: int, body: bytes, media: bytes = b"text/plain") -> None:
    headers = [(b"content-type", media), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Harness:
    """The test server's ASGI app, and the test's handle on it.

    Routes: `/` the page, `/client.js` the module, `POST /task` a `TaskApp` (`/task/denied` one
    that refuses everything), `GET /stream/{id}` an `EventStreamApp`, `POST /chat/{id}` a stream
    started by a POST with a JSON body (what `EventSource` cannot do), `GET /raw` an event
    stream whose bytes the test writes piece by piece.
    """

    def __init__(self, context: ResumableStreamContext) -> None:
        self.context = context
        self.url = ""
        self.requests: list[Seen] = []
        self.task_calls: list[tuple[Any, str]] = []
        self.gates: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)
        self.at_gate: set[str] = set()
        self._open: set[_Open] = set()
        self._changed = anyio.Event()
        self.raw_in: MemoryObjectSendStream[bytes]
        self.raw_out: MemoryObjectReceiveStream[bytes]
        self.raw_in, self.raw_out = anyio.create_memory_object_stream[bytes](16)
        self.script = ClientScriptApp()
        self.tasks = TaskApp(context, self.task, wait_interval=WAIT_INTERVAL, retry=RETRY_MS)
        self.denied = TaskApp(context, self.task, authorize=lambda scope, task_id: False)
        # For EventSource: a long reconnection delay, so the task can end before it is over.
        self.slow_retry = TaskApp(context, self.task, wait_interval=WAIT_INTERVAL, retry=600)
        self.streams = EventStreamApp(
            context, lambda stream_id, scope: self.produce(stream_id, TOKENS), retry=RETRY_MS
        )

    # What the test sees and does

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        with anyio.move_on_after(STEP):
            while not predicate():
                await self._changed.wait()
            return
        pytest.fail(f"timed out waiting for {what}; requests so far: {self.requests}")

    def cut(self, prefix: str, mode: str) -> int:
        """End the open responses under `prefix`: "end" finishes their bodies, "abort" drops
        their connections mid-body. Their producers go on."""
        victims = [
            response
            for response in self._open
            if response.seen.path.startswith(prefix)
            and response.seen.status == 200
            and not response.seen.ended
        ]
        for response in victims:
            response.mode = mode
            response.scope.cancel()
        return len(victims)

    def seen(self, prefix: str) -> list[Seen]:
        return [seen for seen in self.requests if seen.path.startswith(prefix)]

    # What the server runs

    async def task(self, task_input: Any, request: TaskRequest) -> Any:
        self.task_calls.append((task_input, request.task_id))
        self._notify()
        if gate := task_input.get("gate"):
            await self.gates[gate].wait()
        if task_input.get("mode") == "fail":
            raise TaskError("quota exceeded", "QUOTA")
        if task_input.get("mode") == "crash":
            raise RuntimeError("db password hunter2")
        return {"echo": task_input, "taskId": request.task_id, "text": "é😀\n", "n": [1, 2.5, None]}

    async def produce(self, stream_id: str, tokens: list[str]) -> AsyncIterator[str]:
        for index, token in enumerate(tokens):
            if index == GATE_AT:
                self.at_gate.add(stream_id)
                self._notify()
                await self.gates[stream_id].wait()
            yield token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served
        path: str = scope["path"]
        if path == "/":
            await _respond(send, 200, PAGE, b"text/html; charset=utf-8")
        elif path == "/client.js":
            await self.script(scope, receive, send)
        elif path == "/task":
            await self._tracked(self.tasks, scope, receive, send)
        elif path == "/task/denied":
            await self._tracked(self.denied, scope, receive, send)
        elif path == "/task/es":
            await self._tracked(self.slow_retry, scope, receive, send)
        elif path.startswith("/stream/"):
            await self._tracked(self.streams, scope, receive, send)
        elif path.startswith("/chat/"):
            await self._tracked(self._chat, scope, receive, send)
        elif path == "/raw":
            await self._tracked(self._raw, scope, receive, send)
        else:
            await _respond(send, 404, b"not found")

    async def _tracked(
        self,
        app: Callable[[Scope, Receive, Send], Any],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        seen = Seen(
            scope["method"],
            scope["path"],
            _header(scope, b"x-task-id"),
            _header(scope, b"last-event-id"),
        )
        self.requests.append(seen)
        self._notify()

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen.status = message["status"]
            else:
                seen.sent += len(message.get("body", b""))
                seen.ended = not message.get("more_body", False)
            await send(message)
            self._notify()

        response = _Open(seen)
        self._open.add(response)
        try:
            with response.scope:
                await app(scope, receive, tracking_send)
        finally:
            self._open.discard(response)
            self._notify()
        if response.scope.cancelled_caught and response.mode == "end" and not seen.ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # "abort": returning with the body unfinished makes the server drop the connection.

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await _respond(send, 405, b"use POST")
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        prompt = json.loads(body)["prompt"]
        stream_id = scope["path"].removeprefix("/chat/")
        tokens = [f"You said: {prompt}\n", *TOKENS]
        make = partial(self.produce, stream_id, tokens)
        response = EventStreamResponse(self.context, stream_id, make, retry=RETRY_MS)
        await response(scope, receive, send)

    async def _raw(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _header(scope, b"last-event-id") is not None:
            await _respond(send, 204, b"")  # the test writes one body only
            return
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for piece in self.raw_out:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.fixture
async def server() -> AsyncIterator[Harness]:
    context = create_resumable_stream_context(backend=MemoryBackend(), drain_timeout=1.0)
    async with context:
        harness = Harness(context)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)  # the browser's connections wait in the backlog until uvicorn runs
            harness.url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
            config = uvicorn.Config(
                harness,
                lifespan="off",
                ws="none",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=2,
            )
            uvicorn_server = uvicorn.Server(config)
            async with anyio.create_task_group() as tg:
                tg.start_soon(uvicorn_server.serve, [sock])
                try:
                    yield harness
                finally:
                    uvicorn_server.should_exit = True
                    for gate in list(harness.gates.values()):
                        gate.set()  # a failed test may leave producers waiting
                    harness.raw_in.close()
                    harness.raw_out.close()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """One Chromium for the module; each test gets its own browser context (`page`)."""
    async with chromium() as browser:
        yield browser


@pytest.fixture
async def page(browser: Any, server: Harness) -> AsyncIterator[Any]:
    context = await browser.new_context()
    try:
        context.set_default_timeout(BROWSER_TIMEOUT_MS)
        page = await context.new_page()
        errors: list[Any] = []
        page.on("pageerror", lambda error: errors.append(error))
        await page.goto(server.url)
        await page.wait_for_function("window.ready === true")
        yield page
        assert errors == [], f"uncaught errors in the page: {errors}"
    finally:
        await context.close()  # before the server stops: no connection outlives the test


async def outcome(page: Any, promise: str, *args: Any) -> dict[str, Any]:
    """Await `promise` (a JS expression of `args`) in the page, bounded on both sides."""
    with anyio.fail_after(STEP + 5):
        result: dict[str, Any] = await page.evaluate(
            f"(args) => outcome({promise}, {int(STEP * 1000)})", list(args)
        )
    assert "timeout" not in result, f"{promise} did not settle within {STEP} s"
    return result


# The ASGI app serving the module


async def test_client_script_app_serves_the_module_with_an_etag() -> None:
    app = ClientScriptApp()
    async with client(app) as c:
        async with c.request("/client.js") as response:
            body = await response.read()
        assert response.status == 200
        assert response.header("content-type") == "text/javascript; charset=utf-8"
        assert response.header("cache-control") == "no-cache"
        etag = response.header("etag")
        assert etag is not None
        assert etag.startswith('"')
        exported = re.findall(rb"^export (?:async function|function|class) (\w+)", body, re.M)
        assert sorted(exported) == [b"SSEParser", b"StreamError", b"follow", b"runTask"]
        async with c.request("/client.js", headers={"If-None-Match": f'"x", W/{etag}'}) as again:
            assert again.status == 304
            assert await again.read() == b""
        async with c.request("/client.js", method="HEAD") as head:
            assert head.status == 200
        async with c.request("/client.js", method="POST") as post:
            assert post.status == 405
            assert post.header("allow") == "GET, HEAD"


# The parser


PARSER_CASES = [
    b"\xef\xbb\xbfdata: bom\r\n\r\n",
    b"\xef\xbb\xbf\xef\xbb\xbfdata: a second BOM is text\n\n",
    b"data:a\rdata: b\r\rid: 3\n\nevent: x\ndata\n\n",
    b": comment\ndata:  two spaces\nretry: 12a\nretry: 250\nid: a\x00b\ndata: x\n\n",
    "data: café 😀\r\n\r\nid\nevent:\ndata: never finished".encode(),
    b"data: \xff\xfe bad bytes \xf0\x9f\x98\n\n",
    b"data: a\r\n\r\n\r\ndata: b\n\r\n\rid: 7\r\n\r\nevent: e\r\n\r\ndata: after\n\n",
    b"id: 5\n\ndata: keeps 5\n\nid\ndata: clears it\n\nfield without colon\ndata:\n\n",
    b"data: a\r\ndata: b\r\n\r\n",  # split between CR and LF: still one event "a\nb"
    b"id: 1\ndata: one\n\nid: 2\ndata: never finished, so its id does not count",
]


async def test_parser_matches_the_reference_decoder_whatever_the_chunking(page: Any) -> None:
    """`SSEParser` dispatches what the Python reference decoder does, fed in any two pieces or
    byte by byte: CR/LF split across chunks, BOMs, split UTF-8, comments, ids and retry."""
    results = await page.evaluate(
        """(cases) => cases.map((bytes) => {
            const data = new Uint8Array(bytes);
            const run = (pieces) => {
                const parser = new client.SSEParser();
                const events = pieces.flatMap((piece) => parser.feed(piece));
                return JSON.stringify([events, parser.lastEventId, parser.retry]);
            };
            const seen = new Set([run([data]), run(Array.from(data, (b) => Uint8Array.of(b)))]);
            for (let i = 0; i <= data.length; i++) seen.add(run([data.slice(0, i), data.slice(i)]));
            return [...seen];
        })""",
        [list(case) for case in PARSER_CASES],
    )
    for case, seen in zip(PARSER_CASES, results, strict=True):
        decoder = SSEDecoder()
        expected = [
            [{"id": e.id, "event": e.event, "data": e.data} for e in decoder.feed(case)],
            decoder.last_event_id,
            decoder.retry,
        ]
        assert [json.loads(result) for result in seen] == [expected], case


# runTask


@pytest.mark.parametrize("mode", ["end", "abort"])
async def test_run_task_survives_a_cut_and_resolves_with_the_result(
    server: Harness, page: Any, mode: str
) -> None:
    task_input = {"gate": f"task-{mode}", "question": "¿qué? 😀"}
    await page.evaluate("(input) => startTask('t', '/task', input)", task_input)
    await server.until(lambda: len(server.task_calls) == 1, "the task to start")
    await page.wait_for_function("window.tasks.t.waits >= 2")  # the response is streaming
    assert server.cut("/task", mode) == 1
    await server.until(lambda: len(server.seen("/task")) == 2, "the reconnection")
    server.gates[f"task-{mode}"].set()
    result = await outcome(page, "window.tasks[args[0]].promise", "t")
    [(_, task_id)] = server.task_calls  # the task ran once
    assert result == {
        "value": {"echo": task_input, "taskId": task_id, "text": "é😀\n", "n": [1, 2.5, None]}
    }
    first, second = server.seen("/task")
    assert (first.method, first.task_id, first.last_event_id, first.status) == (
        "POST",
        None,
        None,
        200,
    )
    assert (second.method, second.task_id, second.last_event_id, second.status) == (
        "POST",
        task_id,
        f"{task_id}:0",  # the first frame's cursor: the task's outcome is its only text
        200,
    )
    record = await page.evaluate("window.tasks.t")
    assert record["taskIds"] == [task_id]
    cursor = f"{task_id}:0"
    assert record["reconnects"] == [{"attempt": 1, "lastEventId": cursor, "delay": RETRY_MS}]
    print(f"{mode}: cut at offset 0 after {record['waits']} wait events, resumed from 0: {result}")


@pytest.mark.parametrize("task_id_in_url", [True, False], ids=["taskId", "input-only"])
@pytest.mark.parametrize("mode", ["end", "abort"])
async def test_native_event_source_gets_a_task_outcome_that_came_during_its_retry_delay(
    server: Harness, page: Any, mode: str, task_id_in_url: bool
) -> None:
    task_input = {"gate": f"es-{mode}-{task_id_in_url}"}
    query = f"input={json.dumps(task_input)}"
    if task_id_in_url:
        query += f"&taskId=job-{mode}"
    await page.evaluate("(url) => startEventSource('s', url)", f"/task/es?{query}")
    await server.until(lambda: len(server.task_calls) == 1, "the task")
    [(_, task_id)] = server.task_calls
    # The page got a wait frame, so it also took the first frame's cursor: a drop right after
    # bytes were sent may lose them in the browser (it can see the error before the data).
    await page.wait_for_function("window.sources.s.waits > 0")
    assert server.cut("/task/es", mode) == 1
    # The task ends while the browser waits out its 600 ms reconnection delay.
    server.gates[task_input["gate"]].set()
    await poll_until(lambda: server.context.has_existing_stream(task_id), "DONE", timeout=STEP)
    assert len(server.seen("/task/es")) == 1, "the browser reconnected before the task ended"
    await page.wait_for_function("window.sources.s.readyState === 2")  # closed by a 204
    record = await page.evaluate("window.sources.s")
    assert [e["type"] for e in record["events"]] == ["settle"]
    assert json.loads(record["events"][0]["data"])["taskId"] == task_id
    assert len(server.task_calls) == 1  # the reconnect joined the task, it did not start one
    first, second, third = server.seen("/task/es")
    assert (first.last_event_id, first.status) == (None, 200)
    assert (second.last_event_id, second.status) == (f"{task_id}:0", 200)  # the first frame's
    assert third.status == 204


async def test_run_task_rejects_with_the_code_of_each_failure(server: Harness, page: Any) -> None:
    await page.evaluate(
        """() => {
            startTask('fail', '/task', {mode: 'fail'});
            startTask('crash', '/task', {mode: 'crash'});
            startTask('denied', '/task/denied', {});
            startTask('cancel', '/task', {gate: 'never'});
        }"""
    )
    await server.until(lambda: len(server.task_calls) == 3, "the three tasks to start")
    await page.wait_for_function("window.tasks.cancel.taskIds.length === 1")
    [cancel_id] = await page.evaluate("window.tasks.cancel.taskIds")
    await server.context.cancel_stream(cancel_id)
    results = {
        name: await outcome(page, "window.tasks[args[0]].promise", name)
        for name in ("fail", "crash", "denied", "cancel")
    }
    error = {"name": "StreamError", "isStreamError": True, "status": None}
    assert results == {
        "fail": {"error": {**error, "message": "quota exceeded", "code": "QUOTA"}},
        "crash": {"error": {**error, "message": "internal error", "code": "INTERNAL_ERROR"}},
        "denied": {"error": {**error, "message": "not allowed", "code": "HTTP_403", "status": 403}},
        "cancel": {"error": {**error, "message": "the stream was cancelled", "code": "cancelled"}},
    }
    assert "hunter2" not in json.dumps(results)
    # Joining a task that is over (not resuming it): the server has no outcome to send.
    [fail_id] = await page.evaluate("window.tasks.fail.taskIds")
    gone = await outcome(page, "client.runTask('/task', null, {taskId: args[0]})", fail_id)
    assert gone == {
        "error": {
            **error,
            "message": "the server has no outcome for this task: it already finished, or is "
            "unknown",
            "code": "NO_DATA",
            "status": 204,
        }
    }


# follow


def _check_events(events: list[dict[str, Any]], text: str, start: int = 0) -> None:
    """Each event once, in order, with the offset just past it as its id."""
    assert all(event["same"] and event["event"] == "message" for event in events)
    assert "".join(event["data"] for event in events) == text[start:]
    ids = [int(event["id"]) for event in events]
    assert ids == list(accumulate((len(event["data"]) for event in events), initial=start))[1:]


@pytest.mark.parametrize("mode", ["end", "abort"])
async def test_follow_a_post_stream_through_a_cut_gets_the_text_exactly_once(
    server: Harness, page: Any, mode: str
) -> None:
    stream_id = f"chat-{mode}"
    prompt = "Résumé, s'il vous plaît 🙏"
    tokens = [f"You said: {prompt}\n", *TOKENS]
    text = "".join(tokens)
    options = {"body": json.dumps({"prompt": prompt}), "headers": {"X-Test": "1"}}
    await page.evaluate(
        "([id, options]) => startFollow('f', '/chat/' + id, options)", [stream_id, options]
    )
    await page.wait_for_function(f"window.follows.f.events.length === {GATE_AT}")
    await server.until(lambda: stream_id in server.at_gate, "the producer to reach its gate")
    assert server.cut("/chat/", mode) == 1
    await server.until(lambda: len(server.seen("/chat/")) == 2, "the reconnection")
    server.gates[stream_id].set()
    assert await outcome(page, "window.follows.f.done") == {"value": None}
    record = await page.evaluate("window.follows.f")
    assert record["ended"]
    assert record["error"] is None
    _check_events(record["events"], text)
    assert [event["data"] for event in record["events"]] == tokens  # chunk boundaries kept
    cut_at = len("".join(tokens[:GATE_AT]))
    requests = [(s.method, s.last_event_id, s.status) for s in server.seen("/chat/")]
    assert requests == [
        ("POST", None, 200),
        ("POST", str(cut_at), 200),  # resumed where the cut left it
        ("POST", str(len(text)), 204),  # the body ended: one more request learns it is over
    ]
    assert [r["lastEventId"] for r in record["reconnects"]] == [str(cut_at), str(len(text))]
    print(f"{mode}: cut at offset {cut_at}, resumed from {cut_at}, ended at {len(text)}")


async def test_follow_keeps_its_seed_cursor_when_cut_before_the_first_event(
    server: Harness, page: Any
) -> None:
    stream_id = "seeded"
    text = "".join(TOKENS)
    reader = await server.context.resumable_stream(
        stream_id, lambda: server.produce(stream_id, TOKENS)
    )
    assert reader is not None
    await reader.aclose()  # the producer goes on alone
    await server.until(lambda: stream_id in server.at_gate, "the producer to reach its gate")
    seed = len("".join(TOKENS[:GATE_AT])) + 2  # past the text so far: the response waits
    await page.evaluate(
        "([id, seed]) => startFollow('f', '/stream/' + id, {resumeAt: seed})", [stream_id, seed]
    )
    await server.until(
        lambda: [(s.status, s.sent > 0) for s in server.seen("/stream/")] == [(200, True)],
        "the response to send its `retry:` frame",
    )
    assert server.cut("/stream/", "abort") == 1
    await server.until(lambda: len(server.seen("/stream/")) == 2, "the reconnection")
    server.gates[stream_id].set()
    assert await outcome(page, "window.follows.f.done") == {"value": None}
    record = await page.evaluate("window.follows.f")
    assert record["ended"]
    _check_events(record["events"], text, seed)
    assert record["events"][0]["data"] == TOKENS[GATE_AT][2:]  # resumed mid-chunk
    # (The first delay is the default or the server's `retry:`: a connection reset may discard
    # what the browser had received but not yet handed to the page.)
    first, second = record["reconnects"]
    assert (first["lastEventId"], second["lastEventId"]) == (str(seed), str(len(text)))
    assert second["delay"] == RETRY_MS
    requests = [(s.method, s.last_event_id, s.status) for s in server.seen("/stream/")]
    assert requests == [
        ("GET", str(seed), 200),
        ("GET", str(seed), 200),  # cut before any id arrived: the seed again
        ("GET", str(len(text)), 204),
    ]
    print(f"seeded at {seed}, cut before any event, resumed from {seed}, ended at {len(text)}")


async def test_follow_parses_line_ends_and_characters_split_across_reads(
    server: Harness, page: Any
) -> None:
    """Each piece is written only once the page dispatched the previous one's event, so the
    pieces arrive in separate reads: a CRLF and a UTF-8 character are split between two."""
    pieces = [
        (b"\xef\xbb\xbfretry: 40\r\n: hello\r\nid: 1\r\ndata: one\r\n\r\ndata: a\r", 1),
        (b"\ndata: b\r\rdata: caf\xc3", 2),  # one event "a\nb": the CR and LF are one line end
        (b"\xa9\nevent: named\nid: 7\n\n", 3),
    ]
    await page.evaluate("() => startFollow('f', '/raw', {})")
    for piece, count in pieces:
        await server.raw_in.send(piece)
        await page.wait_for_function(f"window.follows.f.events.length === {count}")
    server.raw_in.close()
    assert await outcome(page, "window.follows.f.done") == {"value": None}
    record = await page.evaluate("window.follows.f")
    events = [(e["id"], e["event"], e["data"]) for e in record["events"]]
    assert events == [("1", "message", "one"), ("1", "message", "a\nb"), ("7", "named", "café")]
    assert record["ended"]
    assert record["reconnects"] == [{"attempt": 1, "lastEventId": "7", "delay": 40}]
    assert [(s.last_event_id, s.status) for s in server.seen("/raw")] == [(None, 200), ("7", 204)]


async def test_follow_reports_errors_and_ends(server: Harness, page: Any) -> None:
    # close() stops at once: whatever happens to its request, no callback is called (checked
    # at the end of the test, after everything else had time to happen).
    await page.evaluate(
        """() => {
            startFollow('closed', '/stream/unknown', {resumeAt: 0});
            window.follows.closed.controller.close();
        }"""
    )
    # A stream that is cancelled while followed ends with its `event: error` frame.
    await page.evaluate("() => startFollow('cancelled', '/stream/doomed', {})")
    await server.until(lambda: "doomed" in server.at_gate, "the producer to reach its gate")
    await page.wait_for_function(f"window.follows.cancelled.events.length === {GATE_AT}")
    await server.context.cancel_stream("doomed")
    await page.evaluate(
        """() => {
            startFollow('unknown', '/stream/unknown', {resumeAt: 0});
            startFollow('bad-cursor', '/stream/x', {resumeAt: 'abc'});
            startFollow('wrong-method', '/stream/x', {method: 'POST', body: '{}'});
            startFollow('missing', '/nowhere', {});
        }"""
    )
    results = {}
    for name in ("cancelled", "unknown", "bad-cursor", "wrong-method", "missing"):
        assert await outcome(page, "window.follows[args[0]].done", name) == {"value": None}
        record = await page.evaluate("(name) => window.follows[name]", name)
        results[name] = (record["ended"], record["error"] and record["error"]["code"])
    assert results == {
        "cancelled": (False, "cancelled"),
        "unknown": (True, None),  # 204: nothing to resume
        "bad-cursor": (False, "HTTP_400"),
        "wrong-method": (False, "HTTP_405"),
        "missing": (False, "HTTP_404"),
    }
    record = await page.evaluate("window.follows['bad-cursor']")
    assert "Last-Event-ID must be a character offset" in record["error"]["message"]
    closed = await page.evaluate("window.follows.closed")
    assert (closed["ended"], closed["error"], closed["events"]) == (False, None, [])
