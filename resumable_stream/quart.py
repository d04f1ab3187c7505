"""Quart views that stream, stop and run resumable streams, as `resumable_stream.http` decides.

The context lives while the app serves:

    app = Quart(__name__)
    streams = create_resumable_stream_context()  # REDIS_URL, else in memory

    @app.while_serving
    async def lifespan():
        async with streams:
            yield

    @app.get("/chat/<stream_id>")
    async def chat(stream_id):
        prompt = request.args.get("prompt", "")
        return await stream_response(streams, stream_id, lambda: answer(prompt))

The helpers read Quart's current `request`; `authorize(request, stream_id)` gets it. A streamed
response has no `RESPONSE_TIMEOUT` (Quart's default would cut it after 60 s); when the client
goes away, Quart cancels the response, which detaches the reader, and the producer keeps
running.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from quart import Request, Response, request

from ._context import ResumableStreamContext
from ._http import DEFAULT_KEEPALIVE_FRAME, Headers, Scope
from ._producer import MakeStream
from .http import Authorize, EventStream, PreparedResponse, prepare_stop
from .tasks import TaskEndpoint, TaskRequest

__all__ = ["response_of", "stop_response", "stream_response", "task_response"]


def _request() -> Request:
    """The current request itself, not Quart's proxy of it (what `authorize` keeps)."""
    current: Request = request._get_current_object()  # type: ignore[attr-defined, unused-ignore]
    return current


async def stream_response(
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
) -> Response:
    """Create or resume `stream_id` for the current request: the options of
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
    current = _request()
    prepared = await stream.prepare(
        method=current.method,
        headers=list(current.headers.items()),
        query=current.query_string,
        request=current,
    )
    return response_of(prepared)


async def stop_response(
    context: ResumableStreamContext, stream_id: str, *, authorize: Authorize | None = None
) -> Response:
    """Stop `stream_id` from any worker: 204 (405 unless POST or DELETE; 400, 403, 503)."""
    current = _request()
    answer = await prepare_stop(
        context, stream_id, method=current.method, request=current, authorize=authorize
    )
    return response_of(answer)


async def task_response(
    context: ResumableStreamContext,
    fn: Callable[[Any, TaskRequest], Awaitable[Any]],
    *,
    wait_interval: float = 0.3,
    retry: int | None = 1000,
    max_input_size: int = 1 << 20,
    authorize: Authorize | None = None,
) -> Response:
    """Run `fn(input, task_request)` as a resumable task (`resumable_stream.tasks`): POST a
    JSON body, or GET `?input=<JSON>`; `task_request.request` is Quart's request."""
    endpoint = TaskEndpoint(
        context,
        fn,
        wait_interval=wait_interval,
        retry=retry,
        max_input_size=max_input_size,
        authorize=authorize,
    )
    current = _request()

    async def read_body(limit: int) -> bytes:
        body = bytearray()
        async for chunk in current.body:
            body += chunk
            if len(body) > limit:
                break  # enough to tell that it is too large
        return bytes(body)

    prepared = await endpoint.prepare(
        method=current.method,
        headers=list(current.headers.items()),
        query=current.query_string,
        body=read_body,
        request=current,
        scope=cast(Scope, current.scope),
    )
    return response_of(prepared)


def response_of(prepared: PreparedResponse) -> Response:
    """A prepared answer as Quart's response: streaming, or whole."""
    if prepared.body is None:
        response = Response(prepared.content, status=prepared.status)
        if not any(name == "content-type" for name, _ in prepared.headers):
            del response.headers["content-type"]  # Quart's default; a 204 has none
        if prepared.status == 204 and "content-length" in response.headers:
            del response.headers["content-length"]  # RFC 9110: a 204 sends none (Quart does)
    else:
        response = Response(prepared.body, status=prepared.status)
        response.timeout = None  # a stream takes as long as it takes, not RESPONSE_TIMEOUT
    for name, value in prepared.headers:
        response.headers[name] = value
    return response
