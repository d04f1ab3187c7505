"""Through real uvicorn servers: one worker, and two workers sharing one Redis."""

from __future__ import annotations

import httpx
import pytest

from resumable_stream.sse import ServerSentEvent, SSEDecoder

from .conftest import RedisServer
from .servers import uvicorn_server
from .test_frameworks import expected

pytestmark = pytest.mark.anyio

APP = "examples.fastapi_app:app"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def events(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], limit: int | None = None
) -> tuple[int, list[ServerSentEvent]]:
    """Read events; with a limit, drop the connection as soon as that many arrived."""
    decoder = SSEDecoder()
    got: list[ServerSentEvent] = []
    async with client.stream("GET", url, headers=headers) as response:
        async for piece in response.aiter_bytes():
            got += decoder.feed(piece)
            if limit is not None and len(got) >= limit:
                break  # leaving the block cuts the connection mid-stream
    return response.status_code, got


async def cut_and_resume(first: str, second: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        status, head = await events(client, f"{first}/chat/s1?prompt=hello", {}, limit=3)
        assert status == 200
        cursor = head[-1].id
        status, tail = await events(client, f"{second}/chat/s1", {"Last-Event-ID": cursor})
        assert status == 200
        assert len(head) == 3
        assert tail
        assert "".join(e.data for e in head + tail) == expected("hello")
        status, nothing = await events(client, f"{second}/chat/s1", {"Last-Event-ID": tail[-1].id})
        assert (status, nothing) == (204, [])


async def test_one_uvicorn_worker_resumes_a_cut_connection() -> None:
    with uvicorn_server(APP) as url:
        await cut_and_resume(url, url)


async def test_two_uvicorn_workers_on_one_redis(redis_server: RedisServer) -> None:
    env = {"REDIS_URL": redis_server.url}
    with uvicorn_server(APP, env) as worker_a, uvicorn_server(APP, env) as worker_b:
        await cut_and_resume(worker_a, worker_b)
