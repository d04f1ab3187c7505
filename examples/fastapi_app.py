"""FastAPI: `uvicorn examples.fastapi_app:app`, then `new EventSource("/chat/<id>?prompt=hi")`.

The context lives in the lifespan; every request for an id after the first one resumes it, on
any worker when `REDIS_URL` points all workers at one Redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response

from resumable_stream import create_resumable_stream_context
from resumable_stream.starlette import EventStreamResponse


async def answer(prompt: str) -> AsyncIterator[str]:
    """A stand-in for an LLM: one word every 50 ms."""
    for word in f"You asked {prompt!r}. Here is a long answer, one word at a time.".split(" "):
        await anyio.sleep(0.05)
        yield word + " "


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, object]]:
    async with create_resumable_stream_context() as streams:  # REDIS_URL, else in memory
        yield {"streams": streams}


app = FastAPI(lifespan=lifespan)


@app.get("/chat/{stream_id}")
async def chat(request: Request, stream_id: str, prompt: str = "") -> Response:
    return EventStreamResponse(request.state.streams, stream_id, lambda: answer(prompt))
