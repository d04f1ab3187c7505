"""Relaying an upstream SSE stream: any chunking, comments, the sentinel, errors, truncation;
through a resumable stream; and the OpenAI proxy example against a fake upstream."""

from __future__ import annotations

import importlib
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import httpx
import pytest

import resumable_stream as rs
from resumable_stream.client import follow
from resumable_stream.proxy import UpstreamError, UpstreamTruncatedError, relay, upstream

from .conftest import ASYNCIO_LOOPS
from .test_client import Body, serve, sse

pytestmark = pytest.mark.anyio

# CRLF line ends, a comment, multi-byte characters, an upstream id, a named event, an event
# without data, the sentinel, and an event after it that must never be read.
BODY = (
    b": PROCESSING\r\n\r\n"
    b'data: {"choices":[{"delta":{"content":"H\xc3\xa9"}}]}\r\n\r\n'
    b"id: 77\r\ndata: \xf0\x9f\x98\x80 multi\r\ndata: line\r\n\r\n"
    b"event: note\r\ndata: named\r\n\r\n"
    b"retry: 10\r\ndata:\r\n\r\n"
    b"data: [DONE]\r\n\r\n"
    b"data: after the end\r\n\r\n"
)
EXPECTED: list[str | rs.Event] = [
    '{"choices":[{"delta":{"content":"Hé"}}]}',
    "😀 multi\nline",
    rs.Event("named", event="note"),
]


@pytest.fixture(params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param  # asyncio and uvloop


async def relayed(*pieces: bytes, done: str | None = "[DONE]") -> list[str | rs.Event]:
    with anyio.fail_after(5):
        async with aclosing(relay(sse(*pieces), done=done)) as chunks:
            return [chunk async for chunk in chunks]


async def test_relay_whatever_the_chunking() -> None:
    for cut in range(len(BODY) + 1):  # inside characters, between CR and LF, everywhere
        assert await relayed(BODY[:cut], BODY[cut:]) == EXPECTED, cut
    assert await relayed(*[BODY[i : i + 1] for i in range(len(BODY))]) == EXPECTED


async def test_upstream_error_event_fails() -> None:
    body = b'data: a\r\n\r\nevent: error\r\ndata: {"error": {"message": "overloaded"}}\r\n\r\n'
    got: list[str | rs.Event] = []

    async def read() -> None:
        async for chunk in relay(sse(body)):
            got.append(chunk)

    with pytest.raises(UpstreamError, match="overloaded") as info:
        await read()
    assert got == ["a"]
    assert not isinstance(info.value, UpstreamTruncatedError)


@pytest.mark.parametrize("error", [None, httpx.RemoteProtocolError("incomplete chunked read")])
async def test_an_upstream_without_its_sentinel_is_truncated(error: Exception | None) -> None:
    got: list[str | rs.Event] = []

    async def read() -> None:
        async for chunk in relay(sse(b"data: a\n\ndata: b\n", error=error)):
            got.append(chunk)

    with pytest.raises(UpstreamTruncatedError) as info:
        await read()
    assert got == ["a"]  # "b" never got its blank line: it was not delivered
    assert info.value.__cause__ is error


async def test_without_a_sentinel_the_end_of_body_is_the_end() -> None:
    assert await relayed(b"data: a\n\ndata: [DONE]\n\n", done=None) == ["a", "[DONE]"]


@pytest.mark.parametrize(
    ("response", "status", "message"),
    [
        (httpx.Response(401, json={"error": {"message": "bad key"}}), 401, "401: bad key"),
        (httpx.Response(200, json={"choices": []}), 200, "not an event stream"),
    ],
)
async def test_an_upstream_that_is_not_a_stream_fails(
    response: httpx.Response, status: int, message: str
) -> None:
    with pytest.raises(UpstreamError, match=message) as info:
        await relay(response).__anext__()
    assert info.value.status_code == status


class GatedBody(Body):
    """`head`, then `tail` once `release` is set."""

    def __init__(self, head: bytes, tail: bytes, error: Exception | None = None) -> None:
        super().__init__(tail, error=error)
        self.head = head
        self.release = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        await self.release.wait()
        async for piece in super().__aiter__():
            yield piece


async def test_a_relayed_stream_resumes_mid_way_with_the_exact_tail() -> None:
    body = GatedBody(
        b"id: 900\ndata: first \n\nid: 901\ndata: s\xc3",  # the upstream's ids are not ours
        b"\xa9cond \n\n: ping\n\ndata: third\n\ndata: [DONE]\n\n",
    )
    transport = httpx.MockTransport(
        lambda request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=body
        )
    )
    full = "first sécond third"
    with anyio.fail_after(10):
        async with (
            httpx.AsyncClient(transport=transport) as http,
            rs.ResumableStreamContext(backend=rs.MemoryBackend()) as ctx,
        ):
            make = upstream(lambda: http.stream("POST", "http://upstream/v1/chat/completions"))
            stream = await ctx.resumable_stream("relay-1", make, resume_at=0)
            assert stream is not None
            head = await stream.__anext__()
            assert head == "first "
            follower = await ctx.resume_existing_stream("relay-1", resume_at=3)  # mid-chunk
            assert follower is not None
            body.release.set()
            tail = [chunk async for chunk in follower]
            rest = [chunk async for chunk in stream]
    assert "".join(tail) == full[3:]
    assert [head, *rest] == ["first ", "sécond ", "third"]
    assert body.closed  # the producer closed the upstream response at the end


async def test_a_broken_upstream_fails_the_resumable_stream() -> None:
    body = GatedBody(b"data: a\n\n", b"data: b\n\n", error=httpx.ReadError("reset"))
    body.release.set()
    transport = httpx.MockTransport(
        lambda request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=body
        )
    )
    got: list[str] = []
    async with (
        httpx.AsyncClient(transport=transport) as http,
        rs.ResumableStreamContext(backend=rs.MemoryBackend()) as ctx,
    ):
        # A coroutine opening the response works too; the relay closes what it opened.
        request = http.build_request("GET", "http://upstream/events")
        make = upstream(lambda: http.send(request, stream=True))
        stream = await ctx.resumable_stream("relay-2", make, resume_at=0)
        assert stream is not None

        async def read() -> None:
            async for chunk in stream:
                got.append(chunk)

        with anyio.fail_after(10), pytest.raises(rs.StreamFailedError):
            await read()
    assert got == ["a", "b"]
    assert body.closed


# The example: examples/openai_proxy.py against a fake upstream


def openai_body(tokens: list[str]) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": token}}]} for token in tokens]
    chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    # Upstream ids (OpenAI sends none; others do) must not leak into our offsets.
    frames = [f"id: up-{n}\ndata: {json.dumps(chunk)}\n\n" for n, chunk in enumerate(chunks)]
    return ": OPENROUTER PROCESSING\n\n".join([*frames, "data: [DONE]\n\n"]).encode()


async def test_the_openai_proxy_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://fake-upstream/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("REDIS_URL", raising=False)
    # Imported by name, as tests/test_frameworks.py does, so mypy checks the example once.
    create_app = importlib.import_module("examples.openai_proxy").create_app

    tokens = ["Hel", "lo, ", "wörld", "! 😀"]
    body = openai_body(tokens)
    seen: list[httpx.Request] = []

    async def fake_openai(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        await request.aread()
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]  # frames split anywhere
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=Body(*pieces)
        )

    app = create_app(transport=httpx.MockTransport(fake_openai))
    request: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    with anyio.fail_after(20):
        async with serve(app) as url:
            async with aclosing(follow(f"{url}/chat/c1", method="POST", json=request)) as events:
                got = [event async for event in events]
            async with aclosing(follow(f"{url}/chat/c1", last_event_id=got[1].id)) as events:
                tail = [event.data async for event in events]
    assert [event.data for event in got] == tokens  # one event per token delta
    assert [event.id for event in got] == ["3", "7", "12", "15"]  # our offsets (characters)
    assert tail == tokens[2:]
    [upstream_request] = seen  # a resume never calls the upstream again
    assert str(upstream_request.url) == "http://fake-upstream/v1/chat/completions"
    assert upstream_request.headers["authorization"] == "Bearer sk-test"
    assert json.loads(upstream_request.content) == {**request, "stream": True}


async def test_an_upstream_error_nested_too_deep_is_an_upstream_error() -> None:
    """An error body that json cannot decode for its depth (RecursionError, not ValueError)
    still gives UpstreamError with the text, nothing else."""
    nested = "[" * 100_000
    transport = httpx.MockTransport(lambda request: httpx.Response(500, text=nested))
    with anyio.fail_after(10):
        async with httpx.AsyncClient(transport=transport) as http:
            make = upstream(lambda: http.stream("POST", "http://upstream/v1/chat/completions"))
            with pytest.raises(UpstreamError) as caught:
                async for _ in make():
                    pass
    assert caught.value.status_code == 500
