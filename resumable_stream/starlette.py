"""The SSE response as a Starlette `Response`, so Starlette and FastAPI endpoints can return it.

Make the context in the app's lifespan and hand it to requests through the lifespan state:

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with create_resumable_stream_context() as streams:
            yield {"streams": streams}

    app = FastAPI(lifespan=lifespan)  # or Starlette(routes=..., lifespan=lifespan)

    @app.get("/chat/{stream_id}")
    async def chat(request: Request, stream_id: str, prompt: str = ""):
        return EventStreamResponse(request.state.streams, stream_id, lambda: answer(prompt))
"""

from __future__ import annotations

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from . import asgi
from ._context import ResumableStreamContext
from ._http import DEFAULT_KEEPALIVE_FRAME, Authorize, Headers
from ._producer import MakeStream
from .http import PreparedResponse

__all__ = ["EventStreamResponse", "PreparedStreamResponse"]


class EventStreamResponse(Response):
    """`resumable_stream.asgi.EventStreamResponse` as a Starlette `Response`: the same
    arguments (`authorize`, `keepalive_frame` and `id_prefix` included), checked when it is
    built, plus Starlette's `background` task, run after the response.

    Status and headers are decided when the response runs (200, 204 for a finished stream, 400
    for a malformed cursor, 403 if `authorize` says no), so `status_code` and `headers` here are
    only what Starlette expects to find; extra `headers` (a mapping or pairs) go on a 200.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
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
        background: BackgroundTask | None = None,
    ) -> None:
        self._response = asgi.EventStreamResponse(
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
        self.status_code = 200
        self.background = background
        self.body = b""
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._response(scope, receive, send)
        if self.background is not None:
            await self.background()


class PreparedStreamResponse(Response):
    """A `PreparedResponse` (`resumable_stream.http`, `resumable_stream.ai_sdk`) as a Starlette
    `Response`: its status, headers and body, streamed until the client disconnects."""

    def __init__(
        self, prepared: PreparedResponse, *, background: BackgroundTask | None = None
    ) -> None:
        self._prepared = prepared
        self.status_code = prepared.status
        self.background = background
        self.body = prepared.content
        self.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in prepared.headers
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asgi.send_prepared(self._prepared, receive, send)
        if self.background is not None:
            await self.background()
