"""A backend for the AI SDK's `useChat({ resume: true })`: `uvicorn examples.ai_sdk_chat:app`.

Routes, the AI SDK's defaults: `POST /api/chat` (the message), `GET /api/chat/{id}/stream` (the
resume, on any worker when `REDIS_URL` points every worker at one Redis), and
`POST /api/chat/{id}/stop` (stops the model from any worker; `useChat`'s `stop()` only aborts
the browser's fetch). `create_app(respond)` serves any model: `respond(messages)` yields text
deltas (or UI message chunks); the module's `app` serves a simulated one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response

from resumable_stream import ResumableStreamContext, create_resumable_stream_context
from resumable_stream.ai_sdk import ChatStreams, ModelOutput
from resumable_stream.http import Authorize
from resumable_stream.starlette import PreparedStreamResponse

Respond = Callable[[list[dict[str, Any]]], ModelOutput]


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message (UI messages carry their text in parts)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            parts = message.get("parts") or []
            return "".join(p.get("text", "") for p in parts if p.get("type") == "text")
    return ""


async def simulated_model(messages: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A stand-in for an LLM: one word every `RS_EXAMPLE_DELAY` seconds (default 0.05)."""
    delay = float(os.environ.get("RS_EXAMPLE_DELAY", "0.05"))
    prompt = last_user_text(messages)
    for word in f"You said {prompt!r}. Here is a long answer, one word at a time.".split(" "):
        await anyio.sleep(delay)
        yield word + " "


def create_app(
    respond: Respond,
    *,
    context: ResumableStreamContext | None = None,
    authorize: Authorize | None = None,
) -> FastAPI:
    """The chat app around `respond`, on `context` (default: `REDIS_URL`, else in memory).
    `authorize(request, chat_id)` (e.g. does this chat belong to the user?) guards every
    route: 403 unless it returns True."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, object]]:
        streams = context if context is not None else create_resumable_stream_context()
        keepalive = float(os.environ.get("RS_EXAMPLE_KEEPALIVE", "15"))
        async with streams:
            yield {"chats": ChatStreams(streams, keepalive=keepalive, authorize=authorize)}

    app = FastAPI(lifespan=lifespan)

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        body = await request.json()
        messages = body.get("messages") or []
        answer = await request.state.chats.start(
            body.get("id"), lambda: respond(messages), request=request
        )
        return PreparedStreamResponse(answer)

    @app.get("/api/chat/{chat_id}/stream")
    async def resume(request: Request, chat_id: str) -> Response:
        answer = await request.state.chats.resume(
            chat_id, headers=request.headers, query=request.url.query, request=request
        )
        return PreparedStreamResponse(answer)

    @app.post("/api/chat/{chat_id}/stop")
    async def stop(request: Request, chat_id: str) -> Response:
        return PreparedStreamResponse(await request.state.chats.stop(chat_id, request=request))

    return app


app = create_app(simulated_model)
