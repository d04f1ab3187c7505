"""Django, Quart and Falcon under real uvicorn servers: one worker on the in-memory backend (on
asyncio), and two worker processes sharing a real Redis (on uvloop), each behind a TCP proxy
that can cut its connections. The apps are `tests/framework_apps` (the same routes through each
adapter, see `common.py`); the examples run too, and headless Chromium follows the Django
example's stream through a cut with its own `EventSource`.

A test's servers log no exception (`servers.uvicorn_server` fails the test otherwise).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

from resumable_stream.sse import ServerSentEvent, SSEDecoder

from .framework_apps.common import tokens
from .servers import uvicorn_server
from .tcp_proxy import TcpProxy

pytestmark = pytest.mark.anyio

APPS = {
    "django": "tests.framework_apps.django_project.asgi:application",
    "quart": "tests.framework_apps.quart_app:app",
    "falcon": "tests.framework_apps.falcon_app:app",
}
EXAMPLES = {
    "django": "examples.django_app.asgi:application",
    "quart": "examples.quart_app:app",
    "falcon": "examples.falcon_app:app",
}
KEEPALIVE = 0.2  # the apps' keep-alive interval, seconds
STEP = 10.0  # seconds: the bound of any one request, or poll
SLOW = "0.02"  # a token delay that keeps a stream running for well over a second
KEEPALIVE_FRAME = b": keep-alive\n\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the client's loop; the servers run on theirs


@dataclass
class Deployment:
    """The workers of one framework's app on one backend; `proxied` is the first worker behind
    a proxy that can cut its connections."""

    framework: str
    workers: list[str]
    proxy: TcpProxy

    @property
    def first(self) -> str:
        return self.workers[0]

    @property
    def second(self) -> str:
        """Another worker, where there are two (the first one otherwise)."""
        return self.workers[-1]

    @property
    def proxied(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"


DEPLOYMENTS = [(framework, backend) for framework in APPS for backend in ("memory", "redis")]


@pytest.fixture(scope="module", params=DEPLOYMENTS, ids=[f"{f}-{b}" for f, b in DEPLOYMENTS])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    framework, backend = request.param
    env = {"RS_TEST_KEEPALIVE": str(KEEPALIVE)}
    count, loop = 1, "asyncio"
    if backend == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
        count, loop = 2, "uvloop"
    with ExitStack() as stack:
        workers = [
            stack.enter_context(uvicorn_server(APPS[framework], env, loop=loop))
            for _ in range(count)
        ]
        proxy = stack.enter_context(TcpProxy(port_of(workers[0])))
        yield Deployment(framework, workers, proxy)


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def new_path() -> str:
    # A new id each time: the Redis outlives the test, and the deployments share it.
    return f"/chat/{uuid.uuid4().hex}"


async def events(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str] | None = None,
    limit: int | None = None,
) -> tuple[int, list[ServerSentEvent]]:
    """Read a stream's events; with a limit, close the connection as soon as that many came."""
    decoder = SSEDecoder()
    got: list[ServerSentEvent] = []
    with anyio.fail_after(STEP):
        async with client.stream("GET", url, headers=headers or {}) as response:
            async for piece in response.aiter_bytes():
                got += decoder.feed(piece)
                if limit is not None and len(got) >= limit:
                    break  # leaving the block closes the connection mid-stream
    return response.status_code, got


def text(received: list[ServerSentEvent]) -> str:
    return "".join(e.data for e in received)


async def debug(client: httpx.AsyncClient, worker: str, path: str) -> dict[str, Any]:
    response = await client.get(f"{worker}/debug/{path.rpartition('/')[2]}")
    assert response.status_code == 200
    info: dict[str, Any] = response.json()
    return info


async def poll(client: httpx.AsyncClient, worker: str, path: str, **expected: Any) -> None:
    """Poll a worker's `/debug` (a server offers nothing to wait on) until it shows `expected`."""
    info: dict[str, Any] = {}
    with anyio.move_on_after(STEP):
        while {k: info.get(k) for k in expected} != expected:
            info = await debug(client, worker, path)
            await anyio.sleep(0.02)
        return
    raise AssertionError(f"{worker}: {info} never showed {expected}")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=STEP) as client:
        yield client


async def test_a_reader_cut_by_its_client_resumes_exactly(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    path = new_path()
    status, head = await events(
        client, f"{deployment.first}{path}?prompt=cut&delay={SLOW}", limit=4
    )
    assert (status, len(head)) == (200, 4)
    async with anyio.create_task_group() as tg:
        viewers: list[list[ServerSentEvent]] = []

        async def uncut_viewer() -> None:
            # Another reader of the same stream, on the other worker, from the start.
            viewers.append((await events(client, f"{deployment.second}{path}"))[1])

        tg.start_soon(uncut_viewer)
        # The browser's reconnect: the same URL, prompt included, and the last id it saw.
        headers = {"Last-Event-ID": head[-1].id}
        url = f"{deployment.second}{path}?prompt=cut&delay={SLOW}"
        status, tail = await events(client, url, headers)
    assert status == 200
    assert tail
    [uncut] = viewers
    assert text(head) + text(tail) == text(uncut) == "".join(tokens("cut"))
    assert [e.id for e in head + tail] == [e.id for e in uncut]
    status, nothing = await events(client, url, {"Last-Event-ID": tail[-1].id})
    assert (status, nothing) == (204, [])


async def test_a_reader_cut_by_the_network_resumes_exactly(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    path = new_path()
    url = f"{deployment.proxied}{path}?prompt=net&delay={SLOW}"
    decoder = SSEDecoder()
    head: list[ServerSentEvent] = []
    with anyio.fail_after(STEP), pytest.raises(httpx.TransportError):  # noqa: PT012
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            async for piece in response.aiter_bytes():
                head += decoder.feed(piece)
                if len(head) >= 4:
                    deployment.proxy.cut()  # the network drops, mid-stream
    assert 4 <= len(head) < len(tokens("net"))
    status, uncut = await events(client, f"{deployment.second}{path}")
    assert status == 200
    # The reconnect goes through the proxy again (it accepts new connections after a cut).
    status, tail = await events(client, url, {"Last-Event-ID": head[-1].id})
    assert status == 200
    assert text(head) + text(tail) == text(uncut) == "".join(tokens("net"))


async def test_a_finished_stream_answers_204(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    path = new_path()
    status, whole = await events(client, f"{deployment.first}{path}?prompt=done")
    assert status == 200
    assert text(whole) == "".join(tokens("done"))
    for worker in deployment.workers:
        # What EventSource sends after the end, and a new viewer of the finished stream.
        for headers in ({"Last-Event-ID": whole[-1].id}, {}):
            response = await client.get(f"{worker}{path}?prompt=done", headers=headers)
            assert (response.status_code, response.content) == (204, b"")
            # RFC 9110: a 204 carries no Content-Length (nor a Content-Type).
            assert "content-length" not in response.headers
            assert "content-type" not in response.headers
        head = await client.head(f"{worker}{path}")
        assert head.status_code == 200  # it exists; a HEAD reads nothing
        assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert (await client.head(f"{worker}/chat/{uuid.uuid4().hex}")).status_code == 204


@pytest.mark.parametrize(
    ("headers", "query", "message"),
    [
        ({"Last-Event-ID": "abc"}, "", "Last-Event-ID must be a character offset"),
        ({}, "&resumeAt=1.5", "resumeAt must be a character offset"),
        ({}, "&resumeAt=1&resumeAt=2", "resumeAt at most once"),
    ],
)
async def test_a_malformed_cursor_answers_400_and_starts_nothing(
    deployment: Deployment, client: httpx.AsyncClient, headers: Any, query: str, message: str
) -> None:
    path = new_path()
    response = await client.get(f"{deployment.first}{path}?prompt=x{query}", headers=headers)
    assert response.status_code == 400
    assert message in response.text
    assert (await debug(client, deployment.second, path))["state"] is None


async def test_authorize_refusing_answers_403_and_starts_nothing(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    path = f"/chat/denied-{uuid.uuid4().hex}"
    before = [await debug(client, worker, path) for worker in deployment.workers]
    response = await client.get(f"{deployment.first}{path}?prompt=x")
    assert (response.status_code, response.text) == (403, "not allowed")
    stop = await client.post(f"{deployment.second}{path}/stop")
    assert stop.status_code == 403
    after = [await debug(client, worker, path) for worker in deployment.workers]
    assert after == before  # no stream, and no reader was ever opened
    assert all(info["state"] is None for info in after)


async def test_keepalive_comments_while_idle(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    path = new_path()
    start = f"{deployment.first}{path}?prompt=idle&pause=5"
    async with anyio.create_task_group() as tg:
        # The producer's reader, on the first worker; a follower on the other, once it runs.
        tg.start_soon(_two_keepalives, client, start)
        await poll(client, deployment.second, path, state=True)
        await _two_keepalives(client, f"{deployment.second}{path}")
    stop = await client.post(f"{deployment.first}{path}/stop")
    assert stop.status_code == 204


async def _two_keepalives(client: httpx.AsyncClient, url: str) -> None:
    """While the model thinks: the first frame, then a keep-alive every interval, no data."""
    body = b""
    with anyio.fail_after(STEP):
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            async for piece in response.aiter_bytes():
                body += piece
                if body.count(KEEPALIVE_FRAME) >= 2:
                    break
    assert body == b"id: 0\n\n" + 2 * KEEPALIVE_FRAME


async def test_a_disconnect_detaches_the_reader_and_the_producer_keeps_running(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    path = new_path()
    first, second = deployment.first, deployment.second
    before = {worker: await debug(client, worker, path) for worker in deployment.workers}
    status, head = await events(client, f"{first}{path}?prompt=leave&delay={SLOW}", limit=3)
    assert status == 200
    status, followed = await events(client, f"{second}{path}", limit=5)
    assert status == 200
    # Every reader these requests opened is closed again, while the stream still runs ...
    for worker in deployment.workers:
        opened = before[worker]["opened"] + (2 if len(deployment.workers) == 1 else 1)
        await poll(client, worker, path, open=before[worker]["open"], opened=opened)
    assert (await debug(client, first, path))["state"] is True
    # ... and goes on to its end with nobody reading.
    await poll(client, second, path, state="DONE")
    status, tail = await events(client, f"{second}{path}", {"Last-Event-ID": followed[-1].id})
    assert status == 200
    assert text(followed) + text(tail) == "".join(tokens("leave"))
    assert text(head) == text(followed[:3])


async def test_a_stop_from_any_worker_ends_every_reader(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    path = new_path()
    url = f"{deployment.first}{path}?prompt=stop&delay={SLOW}"
    received: list[ServerSentEvent] = []
    decoder = SSEDecoder()
    with anyio.fail_after(STEP):
        async with client.stream("GET", url) as response:
            async for piece in response.aiter_bytes():
                received += decoder.feed(piece)
                if len(received) == 2:
                    stop = await client.post(f"{deployment.second}{path}/stop")
                    assert stop.status_code == 204
    *words, error = received
    assert len(words) < len(tokens("stop"))
    assert (error.event, error.id) == ("error", "end")
    assert json.loads(error.data)["code"] == "cancelled"
    again = await client.get(url, headers={"Last-Event-ID": error.id})
    assert again.status_code == 204


async def test_a_task_settles_and_a_reconnect_gets_its_outcome(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    waits: list[ServerSentEvent] = []
    decoder = SSEDecoder()
    with anyio.fail_after(STEP):
        async with client.stream("POST", f"{deployment.first}/tasks", content=b"21") as response:
            assert response.status_code == 200
            task_id = response.headers["x-task-id"]
            async for piece in response.aiter_bytes():
                waits += decoder.feed(piece)
                if waits:
                    break  # a drop while the task runs
    assert [e.event for e in waits] == ["wait"]
    headers = {"X-Task-Id": task_id, "Last-Event-ID": f"{task_id}:0"}
    with anyio.fail_after(STEP):
        async with client.stream("POST", f"{deployment.second}/tasks", headers=headers) as again:
            outcome = [e for e in decoder.feed(await again.aread()) if e.event != "wait"]
    request_class = {"django": "ASGIRequest", "quart": "Request", "falcon": "Request"}
    assert [(e.event, json.loads(e.data)) for e in outcome] == [
        ("settle", {"doubled": 42, "request": request_class[deployment.framework]})
    ]


# The examples, as a user starts them


@pytest.mark.parametrize("framework", list(EXAMPLES))
async def test_the_example_streams_resumes_and_stops(
    framework: str, client: httpx.AsyncClient
) -> None:
    with uvicorn_server(EXAMPLES[framework]) as url:
        path = new_path()
        status, head = await events(client, f"{url}{path}?prompt=hi", limit=3)
        assert status == 200
        status, rest = await events(
            client, f"{url}{path}?prompt=hi", {"Last-Event-ID": head[-1].id}
        )
        assert status == 200
        whole = text(head) + text(rest)
        assert whole.startswith("You asked 'hi'. Here is a simulated answer")
        assert 300 <= len(whole) <= 600  # a few hundred characters
        # A viewer from the start (the finished stream lingers for late readers) gets the same.
        status, viewer = await events(client, f"{url}{path}?resumeAt=0")
        assert (status, text(viewer)) == (200, whole)
        status, nothing = await events(client, f"{url}{path}", {"Last-Event-ID": rest[-1].id})
        assert (status, nothing) == (204, [])
        # The stop endpoint ends a running stream for its reader.
        stopped = new_path()
        received: list[ServerSentEvent] = []
        decoder = SSEDecoder()
        with anyio.fail_after(STEP):
            async with client.stream("GET", f"{url}{stopped}?prompt=stop") as response:
                async for piece in response.aiter_bytes():
                    received += decoder.feed(piece)
                    if len(received) == 1:
                        stop = await client.post(f"{url}{stopped}/stop")
                        assert stop.status_code == 204
        assert received[-1].event == "error"
        assert json.loads(received[-1].data)["code"] == "cancelled"


# The Django example in a real browser


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>EventSource through a cut</title>
<script>
window.record = { text: "", ids: [], opens: 0, errors: 0, closed: false };
window.follow = (url) => {
  // The browser's own EventSource, reconnecting by itself with Last-Event-ID.
  const source = new EventSource(url);
  source.onopen = () => { record.opens += 1; };
  source.onmessage = (event) => { record.text += event.data; record.ids.push(event.lastEventId); };
  source.onerror = () => {
    record.errors += 1;
    record.closed = source.readyState === EventSource.CLOSED;  // after the final 204
  };
};
</script>
"""


async def test_chromium_follows_the_django_example_through_a_cut(client: httpx.AsyncClient) -> None:
    from .browser import chromium

    path = new_path()
    with (
        uvicorn_server(EXAMPLES["django"]) as url,
        TcpProxy(port_of(url)) as proxy,
    ):
        origin = f"http://127.0.0.1:{proxy.port}"
        async with chromium() as browser:
            page = await browser.new_page()
            page.set_default_timeout(20_000)
            # The page comes from the proxy's origin, so its EventSource is same-origin.
            await page.route(
                f"{origin}/", lambda route: route.fulfill(body=PAGE, content_type="text/html")
            )
            await page.goto(f"{origin}/")
            await page.evaluate("(url) => follow(url)", f"{path}?prompt=browser")
            await page.wait_for_function("record.text.length >= 40")
            proxy.stall()  # nothing more reaches the browser ...
            at_cut = len(await page.evaluate("record.text"))
            proxy.cut()  # ... and its connection drops, mid-stream
            proxy.resume()
            await page.wait_for_function("record.closed")
            record = await page.evaluate("record")
        # What a viewer that was never cut got (the finished stream lingers for late readers).
        status, viewer = await events(client, f"{url}{path}?resumeAt=0")
    assert status == 200
    assert at_cut < len(text(viewer))
    assert record["text"] == text(viewer)
    assert record["ids"] == [e.id for e in viewer]
    assert record["opens"] == 2  # the first connection, and the one it made by itself
    print(f"cut at character {at_cut} of {len(record['text'])}; {record['errors']} errors")
