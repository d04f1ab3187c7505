"""Proxy an OpenAI-compatible chat completion as a resumable stream.

    OPENAI_API_KEY=... uvicorn examples.openai_proxy:app

`POST /chat/<stream_id>` with a chat completion body (`{"model": ..., "messages": [...]}`)
starts the completion upstream (`$OPENAI_BASE_URL`, default https://api.openai.com/v1) with
`stream: true`, and streams each token delta as one event. The upstream request belongs to the
stream, not to the client: a client that drops can reconnect (the same POST or `GET
/chat/<stream_id>`, with `Last-Event-ID`) and gets the rest, on any worker with `REDIS_URL`.
`python -m resumable_stream tail http://127.0.0.1:8000/chat/<stream_id>` follows it too.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from resumable_stream import create_resumable_stream_context
from resumable_stream.proxy import UpstreamError, relay
from resumable_stream.starlette import EventStreamResponse


async def tokens(http: httpx.AsyncClient, body: dict[str, object]) -> AsyncIterator[str]:
    """The text deltas of one streamed chat completion."""
    async with http.stream("POST", "chat/completions", json={**body, "stream": True}) as response:
        async for chunk in relay(response):  # ends at `data: [DONE]`, fails without it
            payload = json.loads(chunk if isinstance(chunk, str) else chunk.data)
            if "error" in payload:  # some servers report a failure mid-stream this way
                raise UpstreamError(str(payload["error"]))
            for choice in payload.get("choices", []):
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    yield delta


def create_app(transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The app; `transport` lets tests stand in for the upstream."""
    base_url = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    api_key = os.environ.get("OPENAI_API_KEY", "")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        # Leaving the context waits for running streams before the client they use closes.
        async with (
            httpx.AsyncClient(
                base_url=base_url,
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=httpx.Timeout(10.0, read=120.0),  # a model may think for a while
                transport=transport,
            ) as http,
            create_resumable_stream_context() as streams,  # REDIS_URL, else in memory
        ):
            yield {"http": http, "streams": streams}

    async def start(request: Request) -> Response:
        body = await request.json() if request.method == "POST" else None
        state = request.state
        make = None if body is None else (lambda: tokens(state.http, body))
        # Without a body (GET) or with Last-Event-ID the request only resumes.
        return EventStreamResponse(state.streams, request.path_params["stream_id"], make)

    routes = [Route("/chat/{stream_id}", start, methods=["GET", "POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


app = create_app()
