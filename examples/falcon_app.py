"""Falcon (ASGI): `uvicorn examples.falcon_app:app`, then open `/chat/<id>?prompt=hi` with the
browser's `EventSource`; `POST /chat/<id>/stop` stops it.

The context lives from the app's startup to its shutdown; every request for an id after the
first one resumes it, on any worker when `REDIS_URL` points all workers at one Redis.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import anyio
import falcon.asgi

from resumable_stream import create_resumable_stream_context
from resumable_stream.falcon import ContextMiddleware, stop_response, stream_response

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


streams = create_resumable_stream_context()  # REDIS_URL, else in memory


class Chat:
    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, stream_id: str
    ) -> None:
        prompt = req.get_param("prompt") or ""
        await stream_response(req, resp, streams, stream_id, lambda: answer(prompt))


class Stop:
    async def on_post(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, stream_id: str
    ) -> None:
        await stop_response(req, resp, streams, stream_id)


app = falcon.asgi.App(middleware=[ContextMiddleware(streams)])
app.add_route("/chat/{stream_id}", Chat())
app.add_route("/chat/{stream_id}/stop", Stop())
