"""The FastAPI, Starlette and Litestar examples, through their lifespans, in-process."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from .asgi_driver import serve
from .conftest import ASYNCIO_LOOPS

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
