"""Arbitrary input at the API and the ASGI layer: a clear ValueError or a 4xx, never a 500,
never a stuck task, never a leaked subscription."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resumable_stream as rs
from resumable_stream.asgi import EventStreamApp, StopStreamApp

from .asgi_driver import client

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=300),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=2),
)


async def short() -> AsyncIterator[str]:
    yield "ok"


def leftover_channels(backend: rs.MemoryBackend) -> list[str]:
    return list(backend.channels())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_id=anything, resume_at=anything)
def test_the_api_accepts_or_raises_value_error(stream_id: Any, resume_at: Any) -> None:
    async def check() -> None:
        backend = rs.MemoryBackend()
        async with rs.ResumableStreamContext(backend=backend, linger=0, resume_timeout=0.2) as ctx:
            with anyio.fail_after(5):
                for call in (
                    lambda: ctx.resumable_stream(stream_id, short, resume_at),
                    lambda: ctx.resume_existing_stream(stream_id, resume_at),
                    lambda: ctx.create_new_resumable_stream(stream_id, short, resume_at),
                    lambda: ctx.has_existing_stream(stream_id),
                    lambda: ctx.cancel_stream(stream_id),
                ):
                    try:
                        stream: Any = await call()
                    except ValueError:
                        continue
                    except rs.ResumableStreamError:
                        continue  # e.g. cancelled by the call before
                    if hasattr(stream, "aclose"):
                        async for _ in stream:
                            pass
        assert leftover_channels(backend) == []

    anyio.run(check)


header_value = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
segment = st.text(max_size=300)


# The ASGI layer runs on uvloop as well as on asyncio's own loop.
@pytest.mark.parametrize("uvloop", [False, True], ids=["asyncio", "uvloop"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=segment,
    last_event_id=st.one_of(st.none(), header_value),
    query=st.binary(max_size=60),
    body=st.binary(max_size=100),
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD"]),
)
def test_the_asgi_layer_answers_4xx_never_500(
    uvloop: bool, path: str, last_event_id: bytes | None, query: bytes, body: bytes, method: str
) -> None:
    async def check() -> None:
        backend = rs.MemoryBackend()
        async with rs.ResumableStreamContext(backend=backend, linger=0, resume_timeout=0.2) as ctx:
            streams = EventStreamApp(ctx, lambda sid, scope: short(), keepalive=None)
            stop = StopStreamApp(ctx)
            headers = (
                {} if last_event_id is None else {"Last-Event-ID": last_event_id.decode("latin-1")}
            )
            with anyio.fail_after(5):
                for app in (streams, stop):
                    async with (
                        client(app) as c,
                        c.request(
                            "/s/" + path,
                            method=method,
                            headers=headers,
                            query=query.decode("latin-1"),
                            body=body,
                        ) as response,
                    ):
                        assert response.status in (200, 204, 400, 403, 405), response.status
                        await response.read()
        assert leftover_channels(backend) == []

    anyio.run(check, backend_options={"use_uvloop": uvloop})
