"""Through real uvicorn servers: one worker, and two workers sharing one Redis."""

from __future__ import annotations

import uuid

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
    return "asyncio"  # the client's loop; the servers run on `loop`


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # the servers' event loop


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
    # A new id each time: the Redis outlives the test, and runs on each loop share it.
    path = f"/chat/{uuid.uuid4().hex}"
    async with httpx.AsyncClient(timeout=10) as client:
        status, head = await events(client, f"{first}{path}?prompt=hello", {}, limit=3)
        assert status == 200
        cursor = head[-1].id
        status, tail = await events(client, f"{second}{path}", {"Last-Event-ID": cursor})
        assert status == 200
        assert len(head) == 3
        assert tail
        assert "".join(e.data for e in head + tail) == expected("hello")
        status, nothing = await events(client, f"{second}{path}", {"Last-Event-ID": tail[-1].id})
        assert (status, nothing) == (204, [])


async def test_one_uvicorn_worker_resumes_a_cut_connection(loop: str) -> None:
    with uvicorn_server(APP, loop=loop) as url:
        await cut_and_resume(url, url)


async def test_two_uvicorn_workers_on_one_redis(redis_server: RedisServer, loop: str) -> None:
    env = {"REDIS_URL": redis_server.url}
    with (
        uvicorn_server(APP, env, loop=loop) as worker_a,
        uvicorn_server(APP, env, loop=loop) as worker_b,
    ):
        await cut_and_resume(worker_a, worker_b)
