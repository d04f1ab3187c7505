"""Authorization, stop endpoints, unguessable ids and key-prefix isolation."""

from __future__ import annotations

import re

import anyio
import pytest

import resumable_stream as rs
from resumable_stream.asgi import EventStreamApp, Scope, StopStreamApp

from .asgi_driver import client
from .conftest import HTTP_FLAVORS, Workers
from .helpers import TestingSource, never_called, read

pytestmark = pytest.mark.anyio


@pytest.fixture(params=HTTP_FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # HTTP-level: the backends under uvloop too


def owner_of(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-user":
            return str(value.decode())
    return ""


def owns(scope: Scope, stream_id: str) -> bool:
    """The documented pattern: ids are `<owner>.<random>`; only the owner may touch them."""
    user = owner_of(scope)
    return bool(user) and stream_id.startswith(user + ".")


async def test_authorize_guards_create_resume_and_stop(workers: Workers) -> None:
    source = TestingSource()
    calls: list[str] = []

    async def authorize(scope: Scope, stream_id: str) -> bool:
        calls.append(stream_id)
        await anyio.lowlevel.checkpoint()
        return owns(scope, stream_id)

    streams = EventStreamApp(workers.P, lambda sid, scope: source.make(), authorize=authorize)
    stop = StopStreamApp(workers.C, authorize=owns)
    stream_id = f"alice.{rs.new_stream_id()}"
    async with client(streams) as c, client(stop) as s:
        async with c.request(f"/s/{stream_id}", headers={"x-user": "bob"}) as denied:
            assert denied.status == 403
        assert source.calls == 0  # nothing was created for bob
        async with c.request(f"/s/{stream_id}", headers={"x-user": "alice"}) as mine:
            assert mine.status == 200
            source.write("secret")
            assert [e.data for e in await mine.events(1)] == ["secret"]
            async with c.request(
                f"/s/{stream_id}", headers={"x-user": "bob", "Last-Event-ID": "0"}
            ) as peek:
                assert peek.status == 403
            async with s.request(f"/{stream_id}", method="POST", headers={"x-user": "bob"}) as no:
                assert no.status == 403
            async with s.request(
                f"/{stream_id}", method="DELETE", headers={"x-user": "alice"}
            ) as yes:
                assert yes.status == 204
            [error] = await mine.events()
            assert error.event == "error"
            assert '"code": "cancelled"' in error.data
    assert calls == [stream_id] * 3


async def test_stop_endpoint_validates_its_input(workers: Workers) -> None:
    async with client(StopStreamApp(workers.P)) as s:
        async with s.request("/x", method="GET") as wrong_method:
            assert wrong_method.status == 405
        async with s.request("/" + "x" * 257, method="POST") as too_long:
            assert too_long.status == 400
        async with s.request("/never-started", method="POST") as early:
            assert early.status == 204
    with pytest.raises(rs.StreamCancelledError):
        await workers.C.resumable_stream("never-started", never_called)


def test_new_stream_ids_are_unguessable_and_valid() -> None:
    ids = {rs.new_stream_id() for _ in range(1000)}
    assert len(ids) == 1000
    for stream_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", stream_id)


async def test_two_apps_with_different_prefixes_never_see_each_others_streams(
    workers: Workers,
) -> None:
    backend = workers.backends[0]
    async with (
        rs.ResumableStreamContext(backend=backend, key_prefix=workers.prefix + "-a") as a,
        rs.ResumableStreamContext(backend=backend, key_prefix=workers.prefix + "-b") as b,
    ):
        first, second = TestingSource(), TestingSource()
        stream_a = await a.resumable_stream("same-id", first.make)
        stream_b = await b.resumable_stream("same-id", second.make)
        first.write("from a")
        second.write("from b")
        first.close()
        second.close()
        assert await read(stream_a) == "from a"
        assert await read(stream_b) == "from b"
        assert first.calls == second.calls == 1  # two producers: the ids did not collide
        assert await b.resume_existing_stream("other") is None
        await b.cancel_stream("same-id")  # b's stream already ended; a's is untouched
        assert await read(await a.resume_existing_stream("same-id", resume_at=0)) == "from a"
