"""The FastAPI, Starlette and Litestar examples, through their lifespans, in-process; and the
Starlette response in a FastAPI app."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from starlette.background import BackgroundTask

import resumable_stream as rs
from resumable_stream import asgi, starlette

from .asgi_driver import client, serve
from .conftest import ASYNCIO_LOOPS
from .helpers import TestingSource

pytestmark = pytest.mark.anyio

EXAMPLES = ["fastapi_app", "starlette_app", "litestar_app"]


@pytest.fixture(params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param  # asyncio and uvloop


@pytest.fixture(params=EXAMPLES)
def example(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("REDIS_URL", raising=False)
    return importlib.import_module(f"examples.{request.param}")


def expected(prompt: str) -> str:
    return "".join(
        word + " "
        for word in f"You asked {prompt!r}. Here is a long answer, one word at a time.".split(" ")
    )


async def test_stream_drop_and_resume(example: Any) -> None:
    async with serve(example.app) as client:
        async with client.request("/chat/c1", query="prompt=hi") as first:
            assert first.status == 200
            assert first.header("content-type") == "text/event-stream; charset=utf-8"
            head = await first.events(3)
            first.disconnect()
        cursor = head[-1].id
        assert int(cursor) == sum(len(e.data) for e in head)
        async with client.request("/chat/c1", headers={"Last-Event-ID": cursor}) as second:
            tail = await second.events()
        assert "".join(e.data for e in head + tail) == expected("hi")
        async with client.request("/chat/c1", headers={"Last-Event-ID": tail[-1].id}) as third:
            assert third.status == 204


async def test_bad_cursor_is_a_400(example: Any) -> None:
    async with serve(example.app) as client, client.request("/chat/c2", query="resumeAt=x") as r:
        assert r.status == 400
        assert b"resumeAt must be a character offset" in await r.read()


async def test_task_example_settles_and_reports_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    module = importlib.import_module("examples.task_app")
    async with serve(module.app) as client:
        async with client.request("/tasks/report", method="POST", body=b'{"month": 3}') as bad:
            [event] = [e for e in await bad.events() if e.event != "wait"]
        assert event.event == "server-error"
        assert '"code": "BAD_INPUT"' in event.data
        async with client.request(
            "/tasks/report", method="POST", body=b'{"month": "2026-11"}'
        ) as good:
            task_id = good.header("x-task-id")
            events = await good.events()
    assert [e.event for e in events if e.event != "wait"] == ["settle"]
    assert f'"task": "{task_id}"' in events[-1].data


# resumable_stream.starlette.EventStreamResponse in a FastAPI app


def test_the_starlette_response_takes_the_asgi_responses_arguments() -> None:
    def parameters(cls: Any) -> list[tuple[str, Any, Any]]:
        signature = inspect.signature(cls)
        return [(p.name, p.kind, p.default) for p in signature.parameters.values()]

    extra = ("background", inspect.Parameter.KEYWORD_ONLY, None)
    assert parameters(starlette.EventStreamResponse) == [
        *parameters(asgi.EventStreamResponse),
        extra,
    ]


@pytest.mark.parametrize(
    "options",
    [{"headers": {"x-a": 1}}, {"headers": {"x-a": "b\nc"}}, {"keepalive_frame": ": ping\n\n"}],
    ids=repr,
)
def test_the_starlette_response_checks_its_arguments_when_built(options: dict[str, Any]) -> None:
    context = rs.ResumableStreamContext(backend=rs.MemoryBackend())
    with pytest.raises((TypeError, ValueError)):
        starlette.EventStreamResponse(context, "s", **options)


async def test_the_starlette_response_in_a_fastapi_app() -> None:
    source = TestingSource()
    background = anyio.Event()

    async def refuse(scope: Any, stream_id: str) -> bool:
        return False

    app = FastAPI()

    @app.get("/guarded/{stream_id}")
    async def guarded(stream_id: str) -> Response:
        return starlette.EventStreamResponse(streams, stream_id, source.make, authorize=refuse)

    @app.get("/chat/{stream_id}")
    async def chat(stream_id: str) -> Response:
        return starlette.EventStreamResponse(
            streams,
            stream_id,
            source.make,
            keepalive=0.05,
            keepalive_frame=b"event: ping\ndata: \n\n",
            headers={"x-request-kind": "chat"},  # a mapping, Starlette's usual form
            background=BackgroundTask(background.set),
        )

    async with (
        rs.ResumableStreamContext(backend=rs.MemoryBackend(), drain_timeout=1) as streams,
        client(app) as c,
    ):
        async with c.request("/guarded/s") as refused:
            assert refused.status == 403
        assert source.calls == 0  # refused before anything was created
        async with c.request("/chat/s") as response:
            assert response.status == 200
            assert response.header("x-request-kind") == "chat"
            assert response.header("content-type") == "text/event-stream; charset=utf-8"
            while (piece := await response.chunk()) != b"event: ping\ndata: \n\n":
                assert piece  # a new reader's head frame; then, idle, the frame given
            source.write("hi")
            source.close()
            events = [e for e in await response.events() if e.event != "ping"]
        assert [(e.data, e.id) for e in events] == [("hi", "2")]
        with anyio.fail_after(5):
            await background.wait()
