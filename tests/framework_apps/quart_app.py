"""The Quart test app (routes: see `common.py`)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from quart import Quart, Response, request

from resumable_stream.quart import stop_response, stream_response, task_response

from .common import KEEPALIVE, authorize, double, make_stream, streams, tracking

app = Quart(__name__)


@app.while_serving
async def lifespan() -> AsyncGenerator[None, None]:
    async with tracking:
        yield


@app.get("/chat/<stream_id>")
async def chat(stream_id: str) -> Response:
    make = make_stream(request.args.get)
    return await stream_response(streams, stream_id, make, keepalive=KEEPALIVE, authorize=authorize)


@app.post("/chat/<stream_id>/stop")
async def stop(stream_id: str) -> Response:
    return await stop_response(streams, stream_id, authorize=authorize)


@app.get("/debug/<stream_id>")
async def debug(stream_id: str) -> dict[str, Any]:
    return await tracking.debug(stream_id)


@app.route("/tasks", methods=["GET", "POST"])
async def tasks() -> Response:
    return await task_response(streams, double, wait_interval=KEEPALIVE)
