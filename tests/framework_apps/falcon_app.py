"""The Falcon test app (routes: see `common.py`)."""

from __future__ import annotations

import falcon.asgi

from resumable_stream.falcon import ContextMiddleware, stop_response, stream_response, task_response

from .common import KEEPALIVE, authorize, double, make_stream, streams, tracking

Request = falcon.asgi.Request
Response = falcon.asgi.Response


class Chat:
    async def on_get(self, req: Request, resp: Response, stream_id: str) -> None:
        make = make_stream(req.get_param)
        await stream_response(
            req, resp, streams, stream_id, make, keepalive=KEEPALIVE, authorize=authorize
        )

    on_head = on_get  # Falcon routes HEAD only to a responder of its own


class Stop:
    async def on_post(self, req: Request, resp: Response, stream_id: str) -> None:
        await stop_response(req, resp, streams, stream_id, authorize=authorize)


class Debug:
    async def on_get(self, req: Request, resp: Response, stream_id: str) -> None:
        resp.media = await tracking.debug(stream_id)


class Tasks:
    async def on_get(self, req: Request, resp: Response) -> None:
        await task_response(req, resp, streams, double, wait_interval=KEEPALIVE)

    on_post = on_get


app = falcon.asgi.App(middleware=[ContextMiddleware(streams)])
app.add_route("/chat/{stream_id}", Chat())
app.add_route("/chat/{stream_id}/stop", Stop())
app.add_route("/debug/{stream_id}", Debug())
app.add_route("/tasks", Tasks())
