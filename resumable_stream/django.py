"""Django views (async, under an ASGI server; Django 5.0 or newer) that stream, stop and run
resumable streams, as `resumable_stream.http` decides.

Django has no lifespan, so the context is made once per process and opened by the server's
lifespan through `resumable_stream.asgi.with_context`:

    # asgi.py
    streams = create_resumable_stream_context()  # REDIS_URL, else in memory
    application = with_context(get_asgi_application(), streams)

    # views.py
    async def chat(request, stream_id):
        prompt = request.GET.get("prompt", "")
        return await stream_response(request, streams, stream_id, lambda: answer(prompt))

A stream is a `StreamingHttpResponse` over `EventStreamBody`; every other answer (204, 400,
403, ...) is an `HttpResponse`. When the client goes away, Django (5.0 and newer) cancels the
response, which detaches the reader; the producer keeps running. `authorize(request,
stream_id)` gets the `HttpRequest`. Under WSGI (`runserver` without an ASGI server) a streamed
response cannot work: Django would collect the whole stream first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from ._context import ResumableStreamContext
from ._http import DEFAULT_KEEPALIVE_FRAME, Headers
from ._producer import MakeStream
from .http import Authorize, EventStream, PreparedResponse, prepare_stop
from .tasks import TaskEndpoint, TaskRequest

__all__ = ["response_of", "stop_response", "stream_response", "task_response"]


async def stream_response(
    request: HttpRequest,
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
) -> HttpResponseBase:
    """Create or resume `stream_id` for this request: the options of
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
        method=request.method or "GET",
        headers=request.headers,
        query=request.META.get("QUERY_STRING", ""),
        request=request,
    )
    return response_of(prepared)


async def stop_response(
    request: HttpRequest,
    context: ResumableStreamContext,
    stream_id: str,
    *,
    authorize: Authorize | None = None,
) -> HttpResponse:
    """Stop `stream_id` from any worker: 204 (405 unless POST or DELETE; 400, 403, 503).

    With Django's CSRF middleware, a POST needs the token (or the view `csrf_exempt`)."""
    answer = await prepare_stop(
        context, stream_id, method=request.method or "", request=request, authorize=authorize
    )
    response = response_of(answer)
    assert isinstance(response, HttpResponse)
    return response


async def task_response(
    request: HttpRequest,
    context: ResumableStreamContext,
    fn: Callable[[Any, TaskRequest], Awaitable[Any]],
    *,
    wait_interval: float = 0.3,
    retry: int | None = 1000,
    max_input_size: int = 1 << 20,
    authorize: Authorize | None = None,
) -> HttpResponseBase:
    """Run `fn(input, task_request)` as a resumable task (`resumable_stream.tasks`): POST a
    JSON body, or GET `?input=<JSON>`; `task_request.request` is the `HttpRequest`."""
    endpoint = TaskEndpoint(
        context,
        fn,
        wait_interval=wait_interval,
        retry=retry,
        max_input_size=max_input_size,
        authorize=authorize,
    )

    async def read_body(limit: int) -> bytes:
        # The ASGI handler has already received the body (in memory, or spooled to disk).
        body: bytes = request.read(limit)
        return body

    prepared = await endpoint.prepare(
        method=request.method or "GET",
        headers=request.headers,
        query=request.META.get("QUERY_STRING", ""),
        body=read_body,
        request=request,
        scope=getattr(request, "scope", None),
    )
    return response_of(prepared)


def response_of(prepared: PreparedResponse) -> HttpResponseBase:
    """A prepared answer as Django's response: streaming, or whole."""
    response: HttpResponseBase
    if prepared.body is None:
        response = HttpResponse(prepared.content, status=prepared.status)
        if not any(name == "content-type" for name, _ in prepared.headers):
            del response["Content-Type"]  # Django's default; a 204 has none
    else:
        response = StreamingHttpResponse(prepared.body, status=prepared.status)
    for name, value in prepared.headers:
        response[name] = value
    return response
