"""Falcon (ASGI) responders that stream, stop and run resumable streams, as
`resumable_stream.http` decides.

The context lives from the app's startup to its shutdown, through a middleware:

    streams = create_resumable_stream_context()  # REDIS_URL, else in memory

    class Chat:
        async def on_get(self, req, resp, stream_id):
            prompt = req.get_param("prompt") or ""
            await stream_response(req, resp, streams, stream_id, lambda: answer(prompt))

    app = falcon.asgi.App(middleware=[ContextMiddleware(streams)])
    app.add_route("/chat/{stream_id}", Chat())

The helpers fill Falcon's `resp`; `authorize(req, stream_id)` gets Falcon's `Request`. Falcon
does not end a streamed response whose client went away (it keeps sending into the void), so
the body watches for the disconnect itself, on the ASGI `receive` that Falcon's request holds,
and ends then: the reader is detached, the producer keeps running.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from falcon.asgi import Request, Response

from ._context import ResumableStreamContext
from ._http import DEFAULT_KEEPALIVE_FRAME, Headers
from ._producer import MakeStream
from .http import (
    Authorize,
    Disconnected,
    EventStream,
    EventStreamBody,
    PreparedResponse,
    prepare_stop,
)
from .tasks import TaskEndpoint, TaskRequest

__all__ = [
    "ContextMiddleware",
    "fill_response",
    "stop_response",
    "stream_response",
    "task_response",
]


class ContextMiddleware:
    """A Falcon ASGI middleware that opens `context` at the app's startup and closes it (after
    the running streams drain) at its shutdown."""

    def __init__(self, context: ResumableStreamContext) -> None:
        self.context = context

    async def process_startup(self, scope: Mapping[str, Any], event: Mapping[str, Any]) -> None:
        # Falcon calls both in its lifespan task, so the context's task group is entered and
        # left by one task, as `async with` would.
        await self.context.__aenter__()

    async def process_shutdown(self, scope: Mapping[str, Any], event: Mapping[str, Any]) -> None:
        await self.context.__aexit__(None, None, None)


async def stream_response(
    req: Request,
    resp: Response,
    context: ResumableStreamContext,
    stream_id: str,
    make_stream: MakeStream | None = None,
    *,
    raw: bool = False,
    keepalive: float | None = 15.0,
    retry: int | None = None,
    headers: Headers | None = None,
    authorize: Authorize | None = None,
    keepalive_frame: bytes = DEFAULT_KEEPALIVE_FRAME,
    id_prefix: str = "",
    wait: float | None = None,
) -> None:
    """Create or resume `stream_id` for `req`, into `resp`: the options of
    `resumable_stream.http.EventStream` (checked before anything else happens)."""
    stream = EventStream(
        context,
        stream_id,
        make_stream,
        raw=raw,
        keepalive=keepalive,
        retry=retry,
        headers=headers,
        authorize=authorize,
        keepalive_frame=keepalive_frame,
        id_prefix=id_prefix,
        wait=wait,
    )
    prepared = await stream.prepare(
        method=req.method,
        headers=req.headers,
        query=req.query_string,
        request=req,
        disconnected=_disconnected(req),
    )
    fill_response(resp, prepared)


async def stop_response(
    req: Request,
    resp: Response,
    context: ResumableStreamContext,
    stream_id: str,
    *,
    authorize: Authorize | None = None,
) -> None:
    """Stop `stream_id` from any worker: 204 (405 unless POST or DELETE; 400, 403, 503)."""
    answer = await prepare_stop(
        context, stream_id, method=req.method, request=req, authorize=authorize
    )
    fill_response(resp, answer)


async def task_response(
    req: Request,
    resp: Response,
    context: ResumableStreamContext,
    fn: Callable[[Any, TaskRequest], Awaitable[Any]],
    *,
    wait_interval: float = 0.3,
    retry: int | None = 1000,
    max_input_size: int = 1 << 20,
    authorize: Authorize | None = None,
) -> None:
    """Run `fn(input, task_request)` as a resumable task (`resumable_stream.tasks`): POST a
    JSON body, or GET `?input=<JSON>`; `task_request.request` is Falcon's request."""
    endpoint = TaskEndpoint(
        context,
        fn,
        wait_interval=wait_interval,
        retry=retry,
        max_input_size=max_input_size,
        authorize=authorize,
    )

    async def read_body(limit: int) -> bytes:
        return await req.stream.read(limit)

    prepared = await endpoint.prepare(
        method=req.method,
        headers=req.headers,
        query=req.query_string,
        body=read_body,
        request=req,
        scope=req.scope,
        disconnected=_disconnected(req),
    )
    fill_response(resp, prepared)


def fill_response(resp: Response, prepared: PreparedResponse) -> None:
    """Put a prepared answer into Falcon's `resp`: streaming, or whole."""
    resp.status = prepared.status
    for name, value in prepared.headers:
        resp.set_header(name, value)
    if prepared.body is None:
        resp.data = prepared.content
    else:
        resp.stream = _Stream(prepared.body)


class _Stream:
    """The body as Falcon takes a stream: an async iterator that it `close()`s (awaited)."""

    __slots__ = ("_body",)

    def __init__(self, body: EventStreamBody) -> None:
        self._body = body

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        return await self._body.__anext__()

    async def close(self) -> None:
        await self._body.aclose()


def _disconnected(req: Request) -> Disconnected | None:
    # Falcon keeps the ASGI `receive` privately, and offers no other way to learn that the
    # client went away; without it a stream still ends with its last frame.
    receive: Callable[[], Awaitable[dict[str, Any]]] | None = getattr(req, "_receive", None)
    if receive is None:
        return None

    async def disconnected() -> None:
        # Anything before the disconnect is the rest of a request body nobody reads any more.
        while (await receive())["type"] != "http.disconnect":
            pass

    return disconnected
