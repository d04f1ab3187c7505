"""A campaign's SSE server: `uvicorn chaos.campaign.app:app`, with `CAMPAIGN_SPEC` (the
process's spec file) and `CAMPAIGN_INCARNATION` in its environment.

It serves `resumable_stream.asgi.EventStreamApp` on both contexts: `GET /s/<dep>/<id>` creates
the stream if it is new (a planned stream, produced here and recorded as any producer's) or
follows it; `GET /f/<dep>/<id>` only follows. A request's `X-Campaign-Reader` header names the
session, so that the checker knows which instance a session's own request elected.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable

import resumable_stream as rs
from resumable_stream.asgi import EventStreamApp, Receive, Scope, Send

from ._process import ProcessSpec, open_contexts, setup_logging
from ._produce import Producing
from ._records import Recorder

__all__ = ["app"]


class CampaignApp:
    def __init__(self) -> None:
        self.apps: dict[tuple[str, str], EventStreamApp] = {}
        self.spec: ProcessSpec | None = None
        self.producing: Producing | None = None

    def _make(self, stream_id: str, scope: Scope) -> AsyncIterable[str | rs.Event]:
        assert self.spec is not None
        assert self.producing is not None
        rid = None
        for name, value in scope.get("headers", ()):
            if name == b"x-campaign-reader":
                rid = value.decode("latin-1")
        stream = self.spec.plan.by_id()[stream_id]
        return self.producing.source(stream, rid)()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        parts = scope.get("path", "").split("/")
        app = self.apps.get((parts[1], parts[2])) if len(parts) == 4 else None
        if app is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"no such route"})
            return
        await app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        setup_logging()
        spec = self.spec = ProcessSpec.read(os.environ["CAMPAIGN_SPEC"])
        incarnation = int(os.environ["CAMPAIGN_INCARNATION"])
        recorder = Recorder(spec.records / f"{spec.name}.{incarnation}.jsonl")
        index = spec.plan.process_index(spec.name)
        self.producing = Producing(recorder, spec.name, index, incarnation)
        started = False
        try:
            async with open_contexts(spec, recorder) as contexts:
                for deployment, ctx in contexts.items():
                    self.apps[("s", deployment)] = EventStreamApp(ctx, self._make)
                    self.apps[("f", deployment)] = EventStreamApp(ctx)
                await send({"type": "lifespan.startup.complete"})
                started = True
                message = await receive()
                assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
        except Exception as exc:
            if started:
                raise
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
        finally:
            recorder.close()


app = CampaignApp()
