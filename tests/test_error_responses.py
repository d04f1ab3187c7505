"""Every typed error a stream can end with, against every kind of response (issue 22, defect 5):
no error of ours becomes a 500 or escapes a response; each has the answer the README promises.

The context here raises a chosen error from its resume and create calls, as a real one does
under the conditions other tests act out (a lost durable text: `test_chaos_regressions.py`); what
is checked is the HTTP layers' translation, which every adapter (ASGI, Starlette, Django, Quart,
Falcon) shares through `resumable_stream.http`, plus the task and AI SDK endpoints on top.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

import resumable_stream as rs
from resumable_stream.ai_sdk import ChatStreams
from resumable_stream.asgi import EventStreamApp
from resumable_stream.http import EventStream
from resumable_stream.tasks import TaskApp

from .helpers import never_called

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FailingContext(rs.ResumableStreamContext):
    """A context whose streams cannot be opened: every open raises `error`."""

    def __init__(self, error: rs.ResumableStreamError) -> None:
        super().__init__(backend=rs.MemoryBackend())
        self.error = error

    async def resumable_stream(self, *args: Any, **kwargs: Any) -> rs.ResumableStream | None:
        raise self.error

    async def resume_existing_stream(self, *args: Any, **kwargs: Any) -> rs.ResumableStream | None:
        raise self.error

    async def resolve_alias(self, name: str) -> str | None:
        return "the-stream"


# (error, SSE code of its frame or None for 503, raw status, AI SDK answer: "frame", 204 or 503)
CASES: list[tuple[rs.ResumableStreamError, str | None, int, object]] = [
    (rs.StreamFailedError("x"), "failed", 410, "frame"),
    (rs.StreamCancelledError("x"), "cancelled", 410, 204),
    (rs.ProducerLostError("x"), "producer_lost", 410, "frame"),
    (rs.StreamIncompleteError("x"), "incomplete", 410, "frame"),
    (rs.ProducerConflictError("x"), "incomplete", 410, "frame"),
    (rs.ProducerUnavailableError("x"), None, 503, 503),
    (rs.BackendError("x"), None, 503, 503),
    (rs.SlowReaderError("x"), None, 503, "frame"),
    (rs.ResumableStreamError("x"), None, 503, "frame"),
    # Raised by cancel_stream only (compat mode): were a stream's open to raise it, as any.
    (rs.StreamNotCancellableError("x"), None, 503, "frame"),
    # Raised by a writer only: were a stream's open to raise it, as any.
    (rs.StreamExistsError("x"), None, 503, "frame"),
    # A cursor into an earlier attempt: a frame that restarts the reader at the new one.
    (rs.StreamRestartedError("x", 3), "restart", 409, "frame"),
]
IDS = [type(case[0]).__name__ for case in CASES]


def test_every_public_error_is_covered() -> None:
    errors = {
        name
        for name in rs.__all__
        if isinstance(getattr(rs, name), type)
        and issubclass(getattr(rs, name), rs.ResumableStreamError)
    }
    assert errors == set(IDS)


async def get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # an exception in the app fails the test
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.get(path, headers=headers or {})


@pytest.mark.parametrize(("error", "code", "raw_status", "chat"), CASES, ids=IDS)
@pytest.mark.parametrize("cursor", [None, "3"], ids=["new", "resuming"])
async def test_sse_and_raw(
    error: rs.ResumableStreamError, code: str | None, raw_status: int, chat: object, cursor: Any
) -> None:
    context = FailingContext(error)
    headers = {} if cursor is None else {"Last-Event-ID": cursor}
    sse = await get(
        EventStreamApp(context, make_stream=lambda stream_id, scope: never_called()), "/s", headers
    )
    if code is None:
        assert sse.status_code == 503
    elif code == "restart":
        assert sse.status_code == 200
        assert sse.text == 'event: restart\nid: 3.0\ndata: {"attempt": 3}\n\n'
    else:
        assert sse.status_code == 200
        assert sse.text.startswith("event: error\nid: end\n")
        data = json.loads(sse.text.split("data: ", 1)[1])
        assert data["code"] == code
    raw = await get(EventStreamApp(context, raw=True), "/s?resumeAt=3")
    assert raw.status_code == raw_status


@pytest.mark.parametrize(("error", "code", "raw_status", "chat"), CASES, ids=IDS)
async def test_the_neutral_layer_every_adapter_uses(
    error: rs.ResumableStreamError, code: str | None, raw_status: int, chat: object
) -> None:
    prepared = await EventStream(FailingContext(error), "s").prepare(headers={"last-event-id": "3"})
    assert prepared.status == (503 if code is None else 200)
    assert not prepared.streaming


@pytest.mark.parametrize(("error", "code", "raw_status", "chat"), CASES, ids=IDS)
async def test_a_task_resumed(
    error: rs.ResumableStreamError, code: str | None, raw_status: int, chat: object
) -> None:
    async def fn(value: object, request: object) -> object:
        return value

    app = TaskApp(FailingContext(error), fn)
    answer = await get(app, "/", {"X-Task-Id": "t1", "Last-Event-ID": "t1:3"})
    assert answer.status_code == (503 if code is None else 200)


@pytest.mark.parametrize(("error", "code", "raw_status", "chat"), CASES, ids=IDS)
async def test_an_ai_sdk_chat_resumed(
    error: rs.ResumableStreamError, code: str | None, raw_status: int, chat: object
) -> None:
    prepared = await ChatStreams(FailingContext(error)).resume("chat-1")
    if chat == "frame":
        assert prepared.status == 200
        assert b'"type":"error"' in prepared.content
    else:
        assert prepared.status == chat
