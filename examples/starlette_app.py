"""Starlette: `uvicorn examples.starlette_app:app`, then open `/chat/<id>?prompt=hi`.

Use the browser's `EventSource`; a reconnect resumes where it stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from resumable_stream import create_resumable_stream_context
from resumable_stream.starlette import EventStreamResponse


async def answer(prompt: str) -> AsyncIterator[str]:
    """A stand-in for an LLM: one word every 50 ms."""
    for word in f"You asked {prompt!r}. Here is a long answer, one word at a time.".split(" "):
        await anyio.sleep(0.05)
        yield word + " "


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
    async with create_resumable_stream_context() as streams:  # REDIS_URL, else in memory
        yield {"streams": streams}


async def chat(request: Request) -> Response:
    prompt = request.query_params.get("prompt", "")
    stream_id = request.path_params["stream_id"]
    return EventStreamResponse(request.state.streams, stream_id, lambda: answer(prompt))


app = Starlette(routes=[Route("/chat/{stream_id}", chat)], lifespan=lifespan)
