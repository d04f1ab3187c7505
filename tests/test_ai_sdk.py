"""`resumable_stream.ai_sdk` on every backend: the chat's active stream recorded by one worker and
found by another (`set_alias` / `resolve_alias`, the backend contract it needs), the UI message
chunks a model's output becomes, and `ChatStreams`' answers read straight from their bodies.

The real AI SDK client drives the same code under uvicorn in `test_ai_sdk_client.py`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import resumable_stream as rs
from resumable_stream.ai_sdk import ChatStreams, ui_message_chunks
from resumable_stream.http import PreparedResponse

from .conftest import Workers

pytestmark = pytest.mark.anyio

STEP = 5.0  # seconds: the bound of any one wait
DURABLE = True  # conftest: every `workers` test here runs in both modes
HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-vercel-ai-ui-message-stream", "v1"),
    ("x-accel-buffering", "no"),
]


class Model:
    """A model the test drives: it yields what `say` gives it, and ends at `end` (or raises
    what `fail` gives it)."""

    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[Any](100)

    def __del__(self) -> None:
        self._send.close()  # a model stopped midway never reaches its end
        self._receive.close()

    def say(self, item: Any) -> None:
        self._send.send_nowait(item)

    def end(self) -> None:
        self._send.close()

    async def output(self) -> AsyncIterator[Any]:
        async with self._receive:
            async for item in self._receive:
                if isinstance(item, BaseException):
                    raise item
                yield item


async def collect(chunks: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    with anyio.fail_after(STEP):
        return [chunk async for chunk in chunks]


async def frames(
    answer: PreparedResponse, count: int | None = None, close: bool = True
) -> list[str]:
    """The `data:` of an answer's SSE frames, comments as `: <text>` (the first `count` only,
    then the client goes away unless not `close`)."""
    assert answer.body is not None
    got: list[str] = []
    buffered = ""
    try:
        with anyio.fail_after(STEP):
            async for piece in answer.body:
                buffered += piece.decode()
                *blocks, buffered = buffered.split("\n\n")
                for block in blocks:
                    assert "\n" not in block, block  # one line per frame
                    got.append(block[6:] if block.startswith("data: ") else block)
                if count is not None and len(got) >= count:
                    break
    finally:
        if close:
            await answer.aclose()
    assert not buffered
    return got


def chunks_of(data: list[str]) -> list[dict[str, Any]]:
    return [json.loads(d) for d in data if not d.startswith(":") and d != "[DONE]"]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


# The backend contract: a name that points to a stream


async def test_an_alias_set_on_one_worker_is_resolved_on_another(workers: Workers) -> None:
    assert await workers.C.resolve_alias("chat-1") is None
    await workers.P.set_alias("chat-1", "stream-a")
    assert await workers.C.resolve_alias("chat-1") == "stream-a"
    await workers.C.set_alias("chat-1", "stream-b")  # a later message replaces it
    assert await workers.P.resolve_alias("chat-1") == "stream-b"
    assert await workers.P.resolve_alias("chat-2") is None
    # It lives as long as a stream's keys, in the chat's own hash slot on a cluster.
    key = workers.keys.alias("chat-1")
    assert "{chat-1}" in key
    ttl = await workers.ttl(key)
    assert ttl is not None
    assert 24 * 3600 - 60 < ttl <= 24 * 3600


async def test_an_alias_with_braces_keeps_one_hash_tag(workers: Workers) -> None:
    await workers.P.set_alias("{odd}chat", "s")
    assert await workers.C.resolve_alias("{odd}chat") == "s"
    assert workers.keys.alias("{odd}chat").count("{") == 2  # the digest's tag, then the name


@pytest.mark.parametrize("flavor", ["memory"])
async def test_an_alias_needs_valid_ids(workers: Workers) -> None:
    with pytest.raises(ValueError, match="stream_id"):
        await workers.P.set_alias("", "s")
    with pytest.raises(ValueError, match="stream_id"):
        await workers.P.set_alias("chat", "x" * 300)
    with pytest.raises(ValueError, match="stream_id"):
        await workers.P.resolve_alias("")


# The chunks a model's output becomes


async def _items(*items: Any) -> AsyncIterator[Any]:
    for item in items:
        yield item


@pytest.mark.parametrize("flavor", ["memory"])
async def test_text_becomes_one_text_part_between_start_and_finish() -> None:
    chunks = await collect(ui_message_chunks(_items("Hel", "", "lo"), message_id="m"))
    assert chunks == [
        {"type": "start", "messageId": "m"},
        {"type": "start-step"},
        {"type": "text-start", "id": "m-1"},
        {"type": "text-delta", "id": "m-1", "delta": "Hel"},
        {"type": "text-delta", "id": "m-1", "delta": "lo"},
        {"type": "text-end", "id": "m-1"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]


@pytest.mark.parametrize("flavor", ["memory"])
async def test_chunks_pass_through_and_end_the_open_text_part() -> None:
    data = {"type": "data-weather", "data": {"city": "Paris"}}
    output = _items("a", data, "b")
    chunks = await collect(ui_message_chunks(output, message_id="m"))
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "data-weather",
        "text-start",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    assert chunks[5] == data
    assert chunks[6]["id"] == "m-2"  # a new part, a new id
    # Without a message id, a fresh one; the same on every chunk of the message.
    fresh = await collect(ui_message_chunks(_items("x")))
    assert len(fresh[0]["messageId"]) == 16
    assert fresh[2]["id"].startswith(fresh[0]["messageId"])


@pytest.mark.parametrize("flavor", ["memory"])
@pytest.mark.parametrize(
    "bad", [RuntimeError("key sk-123"), {"type": "finish"}, {"no": "type"}, 42]
)
async def test_a_model_that_raises_or_yields_nonsense_ends_with_a_generic_error(
    bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def output() -> AsyncIterator[Any]:
        yield "partial"
        if isinstance(bad, BaseException):
            raise bad
        yield bad

    with caplog.at_level(logging.ERROR, logger="resumable_stream"):
        chunks = await collect(ui_message_chunks(output(), message_id="m"))
    assert chunks[-1] == {"type": "error", "errorText": "An error occurred."}
    assert [c["type"] for c in chunks[:-1]] == ["start", "start-step", "text-start", "text-delta"]
    assert "sk-123" not in json.dumps(chunks)
    assert caplog.records  # the details went to the log
    if isinstance(bad, BaseException):
        assert "sk-123" in caplog.text


@pytest.mark.parametrize("flavor", ["memory"])
async def test_an_output_that_starts_itself_is_a_whole_message_passed_on() -> None:
    whole = [
        {"type": "start"},
        {"type": "tool-input-available", "toolCallId": "t", "toolName": "f", "input": {}},
        {"type": "start", "messageId": "merged"},  # merged streams may start again
        {"type": "finish", "finishReason": "tool-calls"},
    ]
    chunks = await collect(ui_message_chunks(_items(*whole), message_id="m"))
    # Its start gets the message id, as the AI SDK's own server injects it; nothing is added.
    assert chunks == [{"type": "start", "messageId": "m"}, *whole[1:]]
    own = await collect(ui_message_chunks(_items({"type": "start", "messageId": "x"})))
    assert own == [{"type": "start", "messageId": "x"}]


@pytest.mark.parametrize("flavor", ["memory"])
async def test_an_empty_output_or_one_that_fails_at_once_is_still_a_message() -> None:
    assert [c["type"] for c in await collect(ui_message_chunks(_items(), message_id="m"))] == [
        "start",
        "start-step",
        "finish-step",
        "finish",
    ]

    async def fails() -> AsyncIterator[str]:
        raise ConnectionError("the provider is down")
        yield ""  # a generator

    assert await collect(ui_message_chunks(fails(), message_id="m")) == [
        {"type": "start", "messageId": "m"},
        {"type": "error", "errorText": "An error occurred."},
    ]


# ChatStreams' answers, worker to worker


async def test_a_message_resumed_on_another_worker_replays_then_follows(
    workers: Workers,
) -> None:
    model = Model()
    started = await ChatStreams(workers.P).start("chat", model.output, message_id="m")
    assert (started.status, started.headers) == (200, HEADERS)
    model.say("Hello")
    model.say(", ")
    head = await frames(started, 4)  # then the client goes away
    assert chunks_of(head)[0] == {"type": "start", "messageId": "m"}
    resumed = await ChatStreams(workers.C).resume("chat")
    assert (resumed.status, resumed.headers) == (200, HEADERS)
    model.say("world")
    model.end()
    tail = await frames(resumed)
    assert tail[-1] == "[DONE]"
    chunks = chunks_of(tail)
    assert chunks[0] == {"type": "start", "messageId": "m"}  # replayed from its start
    assert [c["type"] for c in chunks].count("start") == 1
    assert text_of(chunks) == "Hello, world"
    assert chunks[-1] == {"type": "finish", "finishReason": "stop"}
    # It ended: nothing to resume, on either worker.
    assert (await ChatStreams(workers.C).resume("chat")).status == 204
    assert (await ChatStreams(workers.P).resume("chat")).status == 204


async def test_a_chat_without_a_stream_answers_204(workers: Workers) -> None:
    assert (await ChatStreams(workers.C).resume("never-started")).status == 204
    # The chat points to a stream that does not exist (its keys expired, say).
    await workers.P.set_alias("orphan", "no-such-stream")
    assert (await ChatStreams(workers.C).resume("orphan")).status == 204


@pytest.mark.parametrize("how", ["query", "header"])
async def test_a_count_of_received_chunks_continues_instead_of_replaying(
    workers: Workers, how: str
) -> None:
    model = Model()
    started = await ChatStreams(workers.P).start("chat", model.output, message_id="m")
    model.say("one ")
    model.say("two ")
    head = await frames(started, 5)  # start, start-step, text-start, two deltas
    assert text_of(chunks_of(head)) == "one two "
    model.say("three")
    model.end()
    options: dict[str, Any] = (
        {"query": "received=5"} if how == "query" else {"headers": {"X-Received-Chunks": "5"}}
    )
    tail = chunks_of(await frames(await ChatStreams(workers.C).resume("chat", **options)))
    assert [c["type"] for c in tail] == ["text-delta", "text-end", "finish-step", "finish"]
    assert text_of(tail) == "three"
    # A count goes on serving the tail of a stream that just ended (its producer lingers);
    # a count of everything gets nothing more.
    again = chunks_of(await frames(await ChatStreams(workers.C).resume("chat", query="received=7")))
    assert [c["type"] for c in again] == ["finish-step", "finish"]
    rest = await ChatStreams(workers.C).resume("chat", query="received=9")
    assert rest.status in (200, 204)
    if rest.status == 200:
        assert await frames(rest) == ["[DONE]"]


async def test_several_viewers_each_get_the_whole_message(workers: Workers) -> None:
    model = Model()
    started = await ChatStreams(workers.P).start("chat", model.output, message_id="m")
    model.say("a")
    views = [await ChatStreams(w).resume("chat") for w in (workers.C, workers.P, workers.C)]
    model.say("b")
    model.end()
    texts = [text_of(chunks_of(await frames(v))) for v in [started, *views]]
    assert texts == ["ab"] * 4


async def test_a_stop_from_another_worker_ends_every_reader_with_abort(workers: Workers) -> None:
    model = Model()
    started = await ChatStreams(workers.P).start("chat", model.output, message_id="m")
    model.say({"type": "reasoning-start", "id": "r"})
    model.say({"type": "reasoning-delta", "id": "r", "delta": "hmm"})
    viewer = await ChatStreams(workers.C).resume("chat")
    assert (await ChatStreams(workers.C).stop("chat")).status == 204
    for answer in (started, viewer):
        got = await frames(answer)
        assert got[-1] == "[DONE]"
        kinds = [(c["type"], c.get("id")) for c in chunks_of(got)]
        # The open reasoning part ends, then abort: the client's message is clean.
        assert kinds[-2:] == [("reasoning-end", "r"), ("abort", None)]
        assert ("finish", None) not in kinds
    # Stopped: nothing to resume, and stopping again is harmless.
    assert (await ChatStreams(workers.C).resume("chat")).status == 204
    assert (await ChatStreams(workers.P).stop("chat")).status == 204
    assert (await ChatStreams(workers.P).stop("no-such-chat")).status == 204


async def test_a_failing_model_ends_with_an_error_chunk_for_every_reader(
    workers: Workers,
) -> None:
    model = Model()
    started = await ChatStreams(workers.P).start("chat", model.output, message_id="m")
    model.say("so far")
    viewer = await ChatStreams(workers.C).resume("chat")
    model.say(RuntimeError("secret detail"))
    for answer in (started, viewer):
        got = await frames(answer)
        assert got[-2:] == ['{"type":"error","errorText":"An error occurred."}', "[DONE]"]
        assert "secret" not in "".join(got)
        assert text_of(chunks_of(got)) == "so far"


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: 1 / 0, id="raises-at-once"),
        pytest.param(lambda: _items("a", {"type": "data-x", "data": {1, 2}}), id="not-json"),
    ],
)
async def test_whatever_goes_wrong_the_message_ends_with_an_error_chunk(
    workers: Workers, model: Any
) -> None:
    answer = await ChatStreams(workers.P).start("chat", model, message_id="m")
    got = chunks_of(await frames(answer))
    assert got[0] == {"type": "start", "messageId": "m"}
    assert got[-1] == {"type": "error", "errorText": "An error occurred."}
    # The stream itself ended well: nothing more to resume, and no error on a reload.
    assert (await ChatStreams(workers.C).resume("chat")).status == 204


@pytest.mark.parametrize(("state", "status"), [("FAILED", 200), ("LOST", 200), ("CANCELLED", 204)])
async def test_a_stream_that_ended_badly_before_the_resume(
    workers: Workers, state: str, status: int
) -> None:
    # The chat's stream ended before this resume: it failed, its producer died, or it was
    # stopped (written behind the contexts' backs, as another worker would have).
    await workers.P.set_alias("chat", "gone")
    await workers.write(workers.keys.sentinel("gone"), state)
    answer = await ChatStreams(workers.C).resume("chat")
    assert answer.status == status
    if status == 200:
        assert answer.headers == HEADERS
        assert answer.content == (
            b'data: {"type":"error","errorText":"An error occurred."}\n\ndata: [DONE]\n\n'
        )


async def test_keepalive_comments_while_the_model_is_silent(workers: Workers) -> None:
    model = Model()
    chats = ChatStreams(workers.P, keepalive=0.05)
    started = await chats.start("chat", model.output, message_id="m")
    # start, start-step, then a keep-alive: the model is silent
    got = await frames(started, 3, close=False)
    assert got[2] == ": keep-alive"
    model.say("x")
    model.end()
    rest = await frames(started)
    assert rest[-1] == "[DONE]"


async def test_bad_requests(workers: Workers) -> None:
    chats = ChatStreams(workers.P)

    def never() -> AsyncIterator[str]:
        raise AssertionError("no stream may start")

    assert (await chats.start(None, never)).status == 400
    assert (await chats.start("x" * 300, never)).status == 400
    assert (await chats.resume("")).status == 400
    assert (await chats.stop(42)).status == 400
    bad = await chats.resume("chat", query="received=-1")
    assert (bad.status, bad.content) == (400, b"received must be a count of chunks, got '-1'")
    assert (await chats.resume("chat", query="received=1&received=2")).status == 400
    assert (await chats.resume("chat", headers={"x-received-chunks": "a"})).status == 400


async def test_authorize_gets_the_request_and_the_chat_id(workers: Workers) -> None:
    seen: list[tuple[Any, str]] = []

    async def authorize(request: Any, chat_id: str) -> bool:
        seen.append((request, chat_id))
        return chat_id.startswith("mine")

    chats = ChatStreams(workers.P, authorize=authorize)

    def never() -> AsyncIterator[str]:
        raise AssertionError("a refused request starts nothing")

    assert (await chats.start("theirs", never, request="r1")).status == 403
    assert (await chats.resume("theirs", request="r2")).status == 403
    assert (await chats.stop("theirs", request="r3")).status == 403
    assert seen == [("r1", "theirs"), ("r2", "theirs"), ("r3", "theirs")]
    assert await workers.P.resolve_alias("theirs") is None
    answer = await chats.start("mine", lambda: _items("ok"), request="r4")
    assert text_of(chunks_of(await frames(answer))) == "ok"


def test_bad_arguments_fail_when_built() -> None:
    context = rs.ResumableStreamContext(backend=rs.MemoryBackend())
    with pytest.raises(ValueError, match="keepalive"):
        ChatStreams(context, keepalive=0)
    with pytest.raises(TypeError, match="authorize"):
        ChatStreams(context, authorize="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blank line"):
        ChatStreams(context, keepalive_frame=b": ping")
    with pytest.raises(ValueError, match="header"):
        ChatStreams(context, headers={"x-bad": "line\nbreak"})


@pytest.mark.parametrize("flavor", ["memory"])
async def test_extra_headers_go_on_every_streamed_answer(workers: Workers) -> None:
    chats = ChatStreams(workers.P, headers={"x-chat-server": "py"})
    model = Model()
    started = await chats.start("chat", model.output)
    resumed = await chats.resume("chat")
    assert started.headers == resumed.headers == [*HEADERS, ("x-chat-server", "py")]
    model.end()
    assert (await frames(started))[-1] == (await frames(resumed))[-1] == "[DONE]"


def test_importing_it_needs_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, resumable_stream.ai_sdk; print(sorted(m for m in "
        "('fastapi', 'starlette', 'pydantic_ai', 'pydantic', 'trio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_its_all_is_sorted_and_exists() -> None:
    from resumable_stream import ai_sdk

    assert ai_sdk.__all__ == sorted(ai_sdk.__all__)
    for attribute in ai_sdk.__all__:
        assert hasattr(ai_sdk, attribute)


class FlakyBackend:
    """The in-memory backend, whose every command fails with `BackendError` while `down`."""

    def __init__(self) -> None:
        self.inner = rs.MemoryBackend()
        self.down = False

    def connect(self, on_message: Any, on_reconnect: Any = None) -> Any:
        return self._connect(on_message, on_reconnect)

    @contextlib.asynccontextmanager
    async def _connect(self, on_message: Any, on_reconnect: Any) -> AsyncIterator[Any]:
        async with self.inner.connect(on_message, on_reconnect) as connection:
            yield _FlakyConnection(connection, self)


class _FlakyConnection:
    def __init__(self, inner: rs.Connection, backend: FlakyBackend) -> None:
        self._inner = inner
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        command = getattr(self._inner, name)
        if not callable(command):
            return command  # `sharded`

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self._backend.down:
                raise rs.BackendError(f"{name}: the store is down")
            return await command(*args, **kwargs)

        return call


@pytest.mark.parametrize("flavor", ["memory"])
async def test_a_store_that_is_down(caplog: pytest.LogCaptureFixture) -> None:
    backend = FlakyBackend()
    async with rs.ResumableStreamContext(backend=backend, drain_timeout=1) as context:
        chats = ChatStreams(context)
        backend.down = True
        # The message still streams to its sender, not resumable, with a warning.
        with caplog.at_level(logging.WARNING, logger="resumable_stream"):
            answer = await chats.start("chat", lambda: _items("still ", "works"))
            assert answer.status == 200
            assert text_of(chunks_of(await frames(answer))) == "still works"
        assert "will not be resumable" in caplog.text
        # A resume or a stop cannot know: 503, try again.
        assert (await chats.resume("chat")).status == 503
        assert (await chats.stop("chat")).status == 503
        backend.down = False
        assert (await chats.resume("chat")).status == 204  # nothing was recorded


@pytest.mark.parametrize("flavor", ["memory", "memory-trio", "redis"])
async def test_the_example_app_on_a_given_context_ends_a_response_its_client_left(
    workers: Workers,
) -> None:
    """`create_app(respond, context=...)` in-process: a client that goes away mid-message ends
    its response (`send_prepared`), the model runs on, and a resume gets the whole message."""
    from .asgi_driver import serve

    example = importlib.import_module("examples.ai_sdk_chat")
    model = Model()
    app = example.create_app(lambda messages: model.output(), context=workers.context())
    body = {"id": "chat", "messages": [], "trigger": "submit-message"}
    async with serve(app) as client:
        async with client.request(
            "/api/chat", method="POST", body=json.dumps(body).encode()
        ) as response:
            assert response.status == 200
            assert response.header("x-vercel-ai-ui-message-stream") == "v1"
            model.say("before ")
            head = await response.events(4)
        # The request ended when its client left (the driver waits for it, bounded).
        assert text_of([json.loads(e.data) for e in head]) == "before "
        model.say("after")
        model.end()
        async with client.request("/api/chat/chat/stream") as resumed:
            assert resumed.status == 200
            data = [e.data for e in await resumed.events()]
        assert data[-1] == "[DONE]"
        assert text_of(chunks_of(data)) == "before after"
        async with client.request("/api/chat/chat/stop", method="POST") as stopped:
            assert stopped.status == 204
