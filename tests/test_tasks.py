"""Long-running tasks: wait events, exactly one outcome, joining by id, surviving a drop."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

import resumable_stream as rs
from resumable_stream.asgi import StopStreamApp
from resumable_stream.sse import SSEDecoder
from resumable_stream.tasks import TaskApp, TaskError, TaskRequest

from .asgi_driver import client
from .conftest import HTTP_FLAVORS, Workers
from .test_client import serve

pytestmark = pytest.mark.anyio


@pytest.fixture(params=HTTP_FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # HTTP-level: the backends under uvloop too


class Gate:
    """A task function the test releases by hand; counts how often it was started."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.calls: list[tuple[Any, str]] = []

    async def __call__(self, task_input: Any, request: TaskRequest) -> Any:
        self.calls.append((task_input, request.task_id))
        await self.release.wait()
        if task_input == "fail":
            raise TaskError("quota exceeded", "QUOTA")
        if task_input == "crash":
            raise RuntimeError("db password hunter2")
        return {"echo": task_input, "id": request.task_id}


async def test_settle_after_wait_events(workers: Workers) -> None:
    gate = Gate()
    app = TaskApp(workers.P, gate, wait_interval=0.05)
    async with client(app) as c, c.request("/t", method="POST", body=b'{"n": 1}') as response:
        assert response.status == 200
        task_id = response.header("x-task-id")
        assert task_id
        waits = await response.events(2)
        assert [e.event for e in waits] == ["wait", "wait"]
        gate.release.set()
        rest = await response.events()
    [settle] = [e for e in rest if e.event != "wait"]
    assert settle.event == "settle"
    assert json.loads(settle.data) == {"echo": {"n": 1}, "id": task_id}
    assert gate.calls == [({"n": 1}, task_id)]


@pytest.mark.parametrize(
    ("task_input", "event", "payload"),
    [
        ("fail", "server-error", {"message": "quota exceeded", "code": "QUOTA"}),
        ("crash", "internal-error", {"message": "internal error", "code": "INTERNAL_ERROR"}),
    ],
)
async def test_exactly_one_failure_outcome(
    workers: Workers, task_input: str, event: str, payload: dict[str, str]
) -> None:
    gate = Gate()
    gate.release.set()
    app = TaskApp(workers.P, gate)
    body = json.dumps(task_input).encode()
    async with client(app) as c, c.request("/t", method="POST", body=body) as response:
        events = [e for e in await response.events() if e.event != "wait"]
    assert [(e.event, json.loads(e.data)) for e in events] == [(event, payload)]
    assert b"hunter2" not in response.body


async def test_a_dropped_client_reconnects_elsewhere_and_still_gets_the_result(
    workers: Workers,
) -> None:
    gate = Gate()
    a, b = TaskApp(workers.P, gate, wait_interval=0.05), TaskApp(workers.C, gate)
    async with client(a) as ca, client(b) as cb:
        async with ca.request("/t", method="POST", body=b"42") as first:
            task_id = first.header("x-task-id")
            assert task_id is not None
            await first.events(1)
            first.disconnect()  # mid-task
        gate.release.set()
        headers = {"X-Task-Id": task_id, "Last-Event-ID": "0"}
        async with cb.request("/t", method="POST", body=b"42", headers=headers) as again:
            assert again.status == 200
            events = [e for e in await again.events() if e.event != "wait"]
    assert [e.event for e in events] == ["settle"]
    assert json.loads(events[0].data)["echo"] == 42
    assert len(gate.calls) == 1


async def test_a_retried_request_with_the_task_id_joins_the_running_task(
    workers: Workers,
) -> None:
    gate = Gate()
    app = TaskApp(workers.P, gate, wait_interval=0.05)
    other = TaskApp(workers.C, gate, wait_interval=0.05)
    async with client(app) as c, client(other) as d:
        headers = {"X-Task-Id": "job-7"}
        async with (
            c.request("/t", method="POST", body=b"1", headers=headers) as first,
            d.request("/t", query="taskId=job-7&input=1") as retried,  # GET, as EventSource
        ):
            await first.events(1)
            await retried.events(1)
            gate.release.set()
            outcomes = [
                [e.event for e in await r.events() if e.event != "wait"] for r in (first, retried)
            ]
    assert outcomes == [["settle"], ["settle"]]
    assert gate.calls == [(1, "job-7")]


async def test_stopping_a_task_cancels_it(workers: Workers) -> None:
    gate = Gate()
    app = TaskApp(workers.P, gate, wait_interval=0.05)
    async with (
        client(app) as c,
        client(StopStreamApp(workers.C)) as s,
        c.request("/t", method="POST", body=b"1", headers={"X-Task-Id": "j"}) as r,
    ):
        await r.events(1)
        async with s.request("/j", method="POST") as stopped:
            assert stopped.status == 204
        [error] = [e for e in await r.events() if e.event != "wait"]
    assert error.event == "error"
    assert json.loads(error.data)["code"] == "cancelled"


@pytest.mark.parametrize(
    ("method", "query", "body", "headers", "status"),
    [
        ("POST", "", b"{not json", {}, 400),
        ("GET", "input=%7B", b"", {}, 400),
        ("POST", "", b"x" * 2000, {}, 413),
        ("POST", "", b"1", {"X-Task-Id": "x" * 300}, 400),
        ("POST", "", b"1", {"Last-Event-ID": "5"}, 400),  # resuming needs the id
        ("PUT", "", b"1", {}, 405),
    ],
)
async def test_bad_task_requests_are_4xx(
    workers: Workers, method: str, query: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    gate = Gate()
    app = TaskApp(workers.P, gate, max_input_size=1000)
    async with (
        client(app) as c,
        c.request("/t", method=method, query=query, body=body, headers=headers) as response,
    ):
        assert response.status == status
    assert gate.calls == []


DEEP = 100_000  # nesting levels: beyond any interpreter's recursion limit


@pytest.mark.parametrize(
    ("method", "query", "body"),
    [
        ("POST", "", b"[" * DEEP + b"]" * DEEP),
        ("GET", "input=" + "%5B" * DEEP + "%5D" * DEEP, b""),
    ],
    ids=["post", "get"],
)
async def test_deeply_nested_input_is_a_400(
    workers: Workers, method: str, query: str, body: bytes
) -> None:
    # Valid JSON, but json.loads recurses once per level: RecursionError, which was a 500.
    gate = Gate()
    app = TaskApp(workers.P, gate)
    async with (
        client(app) as c,
        c.request("/t", method=method, query=query, body=body) as response,
    ):
        assert response.status == 400
        assert b"nested too deeply" in await response.read()
    assert gate.calls == []


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"wait_interval": 0}, ValueError, "wait_interval"),
        ({"wait_interval": float("nan")}, ValueError, "wait_interval"),
        ({"retry": -1}, ValueError, "retry"),
        ({"max_input_size": "10"}, TypeError, "max_input_size"),
        ({"max_input_size": -1}, ValueError, "max_input_size"),
        ({"fn": "not callable"}, TypeError, "fn"),
        ({"authorize": 42}, (TypeError, ValueError), "authorize"),
    ],
)
def test_task_options_are_checked_when_the_app_is_built(
    options: dict[str, Any], error: type[Exception] | tuple[type[Exception], ...], match: str
) -> None:
    ctx = rs.ResumableStreamContext(backend=rs.MemoryBackend())
    fn = options.pop("fn", Gate())
    with pytest.raises(error, match=match):
        TaskApp(ctx, fn, **options)


@pytest.mark.parametrize("flavor", ["memory-uvloop", "redis-uvloop"], indirect=True)
async def test_concurrent_tasks_under_uvicorn_on_uvloop_all_settle(workers: Workers) -> None:
    # As people run it: a real server on uvloop, a crowd of one-second tasks, the default
    # wait interval. Its millisecond clock made the keep-alive's delay negative now and
    # then, which broke off some of the responses.
    async def nap(task_input: Any, request: TaskRequest) -> Any:
        await anyio.sleep(1)
        return task_input

    outcomes: dict[int, list[tuple[str, str]]] = {}

    async def run(http: httpx.AsyncClient, url: str, n: int) -> None:
        decoder = SSEDecoder()
        events = []
        async with http.stream("POST", url, json=n) as response:
            assert response.status_code == 200
            async for piece in response.aiter_bytes():
                events += decoder.feed(piece)
        outcomes[n] = [(e.event, e.data) for e in events if e.event != "wait"]

    with anyio.fail_after(20):
        async with (
            serve(TaskApp(workers.P, nap)) as url,
            httpx.AsyncClient(timeout=10) as http,
            anyio.create_task_group() as tg,
        ):
            for n in range(20):
                tg.start_soon(run, http, f"{url}/t", n)
    assert outcomes == {n: [("settle", str(n))] for n in range(20)}
