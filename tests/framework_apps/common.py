"""What every framework's test app shares: the routes' behaviour, and what the tests can ask.

Routes (the same in each app):

- `GET /chat/<id>?prompt=...&pause=<s>&delay=<s>`: the stream (a simulated model that waits
  `pause` seconds before its first token, then gives a token every `delay` seconds, default
  `RS_TEST_TOKEN_DELAY`); keep-alive every
  `RS_TEST_KEEPALIVE` s; ids starting with `denied` are refused (`authorize`);
- `POST /chat/<id>/stop`: stops it, from any worker;
- `GET /debug/<id>`: this worker's view, as JSON: the stream's state and the readers its
  responses opened and have not closed (a server offers nothing to wait on, so tests poll it);
- `GET|POST /tasks`: a task endpoint whose task doubles its input.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, cast

import anyio

import resumable_stream as rs
from resumable_stream.tasks import TaskRequest

KEEPALIVE = float(os.environ.get("RS_TEST_KEEPALIVE", "0.2"))
TOKEN_DELAY = float(os.environ.get("RS_TEST_TOKEN_DELAY", "0.005"))

TEXT = (
    "Here is a simulated answer, streamed one token at a time like a language model's. Each "
    "token is one event whose id is the character offset just past it, so a reader that loses "
    "its connection reconnects with Last-Event-ID and resumes exactly there, on any worker. "
    "Ünïcödé and emoji 😀 count as characters too, and a line\nbreak survives the framing."
)


def tokens(prompt: str) -> list[str]:
    return re.findall(r"\S+\s*", f"You asked {prompt!r}. {TEXT}")


async def model(prompt: str, pause: float, delay: float) -> AsyncIterator[str]:
    if pause:
        await anyio.sleep(pause)  # "thinking" before the first token: the stream is idle
    for token in tokens(prompt):
        await anyio.sleep(delay)
        yield token


def make_stream(query: Callable[[str], str | None]) -> Any:
    """The stream of a request whose query parameters `query(name)` gives."""
    prompt = query("prompt") or ""
    pause = float(query("pause") or 0)
    delay = float(query("delay") or TOKEN_DELAY)
    return lambda: model(prompt, pause, delay)


def authorize(request: object, stream_id: str) -> bool:
    return not stream_id.startswith("denied")


async def double(task_input: Any, request: TaskRequest) -> Any:
    await anyio.sleep(3 * KEEPALIVE)  # long enough for a few wait events
    return {"doubled": task_input * 2, "request": type(request.request).__name__}


class _Tracked:
    """A reader that tells its context when it is closed."""

    def __init__(self, inner: rs.ResumableStream, owner: TrackingContext) -> None:
        self.inner = inner
        self.owner = owner
        self.closed = False

    @property
    def attempt(self) -> int:
        return self.inner.attempt

    def __aiter__(self) -> _Tracked:
        return self

    async def __anext__(self) -> str:
        return await self.inner.__anext__()

    async def next_batch(self, limit: int | None = None) -> Any:
        return await self.inner.next_batch(limit)

    def take_ready(self) -> Any:
        return self.inner.take_ready()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner.open -= 1
        await self.inner.aclose()


class TrackingContext:
    """The app's context, counting the readers its responses hold (what a detach releases)."""

    compat = None  # native mode (what the task and AI SDK endpoints check)

    def __init__(self) -> None:
        self.inner = rs.create_resumable_stream_context(drain_timeout=2.0)
        self.open = 0
        self.opened = 0

    def _track(self, reader: rs.ResumableStream | None) -> Any:
        if reader is None:
            return None
        self.open += 1
        self.opened += 1
        return _Tracked(reader, self)

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

    async def cancel_stream(self, stream_id: str) -> None:
        await self.inner.cancel_stream(stream_id)

    async def __aenter__(self) -> TrackingContext:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    async def debug(self, stream_id: str) -> dict[str, Any]:
        state = await self.inner.has_existing_stream(stream_id)
        return {"state": state, "open": self.open, "opened": self.opened}


tracking = TrackingContext()
# What the adapters take: the tracking context stands in for the real one.
streams = cast(rs.ResumableStreamContext, tracking)
