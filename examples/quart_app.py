"""Quart: `uvicorn examples.quart_app:app`, then open `/chat/<id>?prompt=hi` with the browser's
`EventSource`; `POST /chat/<id>/stop` stops it.

The context lives while the app serves; every request for an id after the first one resumes
it, on any worker when `REDIS_URL` points all workers at one Redis.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator

import anyio
from quart import Quart, Response, request

from resumable_stream import create_resumable_stream_context
from resumable_stream.quart import stop_response, stream_response

ANSWER = (
    "Here is a simulated answer, streamed one token at a time like a language model's. "
    "Each token is one Server-Sent Event whose id is the character offset just past it, so a "
    "browser that loses its connection reconnects with Last-Event-ID and resumes exactly there, "
    "on any worker, while the answer keeps being generated on the server whoever listens."
)


async def answer(prompt: str) -> AsyncIterator[str]:
    """A stand-in for a model: a few hundred characters, a token every few milliseconds."""
    for token in re.findall(r"\S+\s*", f"You asked {prompt!r}. {ANSWER}"):
        await anyio.sleep(0.005)
        yield token


app = Quart(__name__)
streams = create_resumable_stream_context()  # REDIS_URL, else in memory


@app.while_serving
async def lifespan() -> AsyncGenerator[None, None]:
    async with streams:
        yield


@app.get("/chat/<stream_id>")
async def chat(stream_id: str) -> Response:
    prompt = request.args.get("prompt", "")
    return await stream_response(streams, stream_id, lambda: answer(prompt))


@app.post("/chat/<stream_id>/stop")
async def stop(stream_id: str) -> Response:
    return await stop_response(streams, stream_id)
