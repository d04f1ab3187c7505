"""Litestar (not built on Starlette): the framework-free ASGI app, mounted under /chat.

`uvicorn examples.litestar_app:app`, then `new EventSource("/chat/<id>?prompt=hi")`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import anyio
from litestar import Litestar, asgi
from litestar.types import Receive, Scope, Send

from resumable_stream import ResumableStreamContext, create_resumable_stream_context
from resumable_stream.asgi import EventStreamApp


async def answer(prompt: str) -> AsyncIterator[str]:
    """A stand-in for an LLM: one word every 50 ms."""
    for word in f"You asked {prompt!r}. Here is a long answer, one word at a time.".split(" "):
        await anyio.sleep(0.05)
        yield word + " "


@contextlib.asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    async with create_resumable_stream_context() as streams:  # REDIS_URL, else in memory
        app.state.streams = streams
        yield


def streams_of(scope: MutableMapping[str, Any]) -> ResumableStreamContext:
    streams: ResumableStreamContext = scope["app"].state.streams
    return streams


def new_answer(stream_id: str, scope: MutableMapping[str, Any]) -> AsyncIterator[str]:
    query = parse_qs(scope["query_string"].decode())
    return answer(query.get("prompt", [""])[0])


streams_app = EventStreamApp(streams_of, new_answer)


@asgi("/chat", is_mount=True, copy_scope=True)
async def chat(scope: Scope, receive: Receive, send: Send) -> None:
    await streams_app(scope, receive, send)  # type: ignore[arg-type]


app = Litestar([chat], lifespan=[lifespan])
