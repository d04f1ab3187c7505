"""A pydantic-ai agent behind `useChat({ resume: true })`: `uvicorn examples.pydantic_ai_chat:app`.

pydantic-ai's `VercelAIAdapter` turns the agent's run into the AI SDK's UI message chunks (text,
tool calls and their results); `ChatStreams` makes that stream resumable: the run goes on when
the browser's connection drops, and `GET /api/chat/{id}/stream` replays it and follows it, on any
worker (`REDIS_URL`). The model is `PYDANTIC_AI_MODEL` (e.g. `openai:gpt-5`), else pydantic-ai's
`TestModel`, which calls the tool and answers without any network.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import AsyncIterator
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic_ai import Agent
from pydantic_ai.models import Model
from pydantic_ai.models.test import TestModel
from pydantic_ai.ui.vercel_ai import VercelAIAdapter
from pydantic_ai.ui.vercel_ai.request_types import SubmitMessage
from pydantic_ai.ui.vercel_ai.response_types import DoneChunk

from resumable_stream import create_resumable_stream_context
from resumable_stream.ai_sdk import ERROR_TEXT, ChatStreams
from resumable_stream.starlette import PreparedStreamResponse

SDK_VERSION: Final = 5  # the chunks of AI SDK 5 are those of 6 and 7 too

logger = logging.getLogger(__name__)


def make_agent(model: Model | str) -> Agent[None, str]:
    agent = Agent(model, instructions="Answer briefly. Roll a die when asked for luck.")

    @agent.tool_plain
    def roll_die() -> int:
        """Roll a six-sided die."""
        return random.randint(1, 6)

    return agent


async def agent_chunks(
    agent: Agent[None, str], chat_id: str, messages: list[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    """The agent's run on the chat's UI messages, as UI message chunks (a whole message, from
    `start` to `finish`, which `ChatStreams` passes on as it is)."""
    run_input = SubmitMessage(id=chat_id, messages=messages)  # type: ignore[arg-type]
    adapter = VercelAIAdapter(agent, run_input, sdk_version=SDK_VERSION)
    async for chunk in adapter.run_stream():
        if isinstance(chunk, DoneChunk):
            continue  # `[DONE]` is the response's to send
        data = json.loads(chunk.encode(SDK_VERSION))
        if data["type"] == "error":
            # The adapter sends the exception's message, which may hold a provider's key or
            # another user's data: that goes to the log, the browser gets a generic text.
            logger.error("the agent's run failed: %s", data.get("errorText"))
            data = {"type": "error", "errorText": ERROR_TEXT}
        yield data


def create_app(agent: Agent[None, str]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, object]]:
        async with create_resumable_stream_context() as streams:  # REDIS_URL, else in memory
            yield {"chats": ChatStreams(streams)}

    app = FastAPI(lifespan=lifespan)

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        body = await request.json()
        chat_id, messages = body.get("id"), body.get("messages") or []
        answer = await request.state.chats.start(
            chat_id, lambda: agent_chunks(agent, chat_id, messages), request=request
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


app = create_app(make_agent(os.environ.get("PYDANTIC_AI_MODEL") or TestModel()))
