"""The pydantic-ai example (`examples/pydantic_ai_chat.py`): an agent's run, tool call included,
as a resumable UI message stream. The models are pydantic-ai's `FunctionModel` and `TestModel`:
no network."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

if sys.version_info < (3, 11):  # pragma: no cover
    # pydantic-ai supports Python 3.11 and newer (the test dependency has that marker).
    pytest.skip("pydantic-ai needs Python 3.11 or newer", allow_module_level=True)

from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, FunctionModel

from resumable_stream.ai_sdk import ChatStreams

from .conftest import Workers
from .servers import uvicorn_server
from .test_ai_sdk import chunks_of, frames, text_of

pytestmark = pytest.mark.anyio

example = importlib.import_module("examples.pydantic_ai_chat")

STEP = 10.0
WORDS = ["You ", "rolled ", "a ", "four. ", "Good ", "luck!"]


def user(text: str) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "role": "user", "parts": [{"type": "text", "text": text}]}


def scripted(gate: anyio.Event) -> FunctionModel:
    """A model that calls `roll_die`, then answers word by word, waiting at `gate` after the
    second word (so the test cuts the connection mid-answer)."""

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[Any]:
        returned = any(
            isinstance(part, ToolReturnPart)
            for message in messages
            if isinstance(message, ModelRequest)
            for part in message.parts
        )
        if not returned:
            yield {0: DeltaToolCall(name="roll_die", json_args="{}", tool_call_id="call-1")}
            return
        for index, word in enumerate(WORDS):
            if index == 2:
                await gate.wait()
            yield word

    return FunctionModel(stream_function=stream)


@pytest.mark.parametrize("flavor", ["memory", "redis"])
async def test_an_agent_run_with_a_tool_call_resumes_on_another_worker(
    workers: Workers,
) -> None:
    gate = anyio.Event()
    agent = example.make_agent(scripted(gate))

    def model() -> AsyncIterator[dict[str, Any]]:
        return example.agent_chunks(agent, "chat", [user("luck?")])  # type: ignore[no-any-return]

    started = await ChatStreams(workers.P).start("chat", model, message_id="m")
    head = chunks_of(await frames(started, 10))  # the client goes away mid-answer
    assert head[0] == {"type": "start", "messageId": "m"}  # the id injected into its start
    resumed = await ChatStreams(workers.C).resume("chat")
    gate.set()
    got = await frames(resumed)
    assert got[-1] == "[DONE]"
    chunks = chunks_of(got)
    kinds = [c["type"] for c in chunks]
    assert chunks[0] == {"type": "start", "messageId": "m"}  # replayed from its start
    assert kinds.count("start") == 1
    assert chunks[: len(head)] == head
    # The tool call and its result, then the answer, once; the message ends well.
    [call] = [c for c in chunks if c["type"] == "tool-input-available"]
    assert (call["toolName"], call["toolCallId"]) == ("roll_die", "call-1")
    [result] = [c for c in chunks if c["type"] == "tool-output-available"]
    assert result["toolCallId"] == "call-1"
    assert result["output"] in range(1, 7)
    assert text_of(chunks) == "".join(WORDS)
    assert kinds[-1] == "finish"
    assert (await ChatStreams(workers.C).resume("chat")).status == 204


@pytest.mark.parametrize("flavor", ["memory"])
async def test_an_agent_that_fails_ends_with_a_generic_error(
    workers: Workers, caplog: pytest.LogCaptureFixture
) -> None:
    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield "Partial "
        raise RuntimeError("provider said: invalid key sk-live-123")

    agent = example.make_agent(FunctionModel(stream_function=stream))
    answer = await ChatStreams(workers.P).start(
        "chat", lambda: example.agent_chunks(agent, "chat", [user("hi")])
    )
    with caplog.at_level(logging.ERROR):
        got = await frames(answer)
    chunks = chunks_of(got)
    # pydantic-ai's adapter ends the message itself (error, then finish), with the exception's
    # message as errorText: the example sends a generic one, and logs the message.
    assert {"type": "error", "errorText": "An error occurred."} in chunks
    assert chunks[-1] == {"type": "finish", "finishReason": "error"}
    assert text_of(chunks) == "Partial "
    assert "sk-live" not in "".join(got)
    assert "sk-live-123" in caplog.text


def test_the_example_app_runs_under_uvicorn_with_the_test_model() -> None:
    chat = f"chat-{uuid.uuid4().hex}"
    body = {"id": chat, "messages": [user("roll")], "trigger": "submit-message"}
    with uvicorn_server("examples.pydantic_ai_chat:app") as url:
        response = httpx.post(f"{url}/api/chat", json=body, timeout=STEP)
        assert response.status_code == 200
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        data = [block[6:] for block in response.text.split("\n\n") if block]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        kinds = [c["type"] for c in chunks]
        assert kinds[0] == "start"
        assert "tool-output-available" in kinds  # TestModel calls every tool
        assert kinds[-1] == "finish"
        assert httpx.get(f"{url}/api/chat/{chat}/stream", timeout=STEP).status_code == 204
