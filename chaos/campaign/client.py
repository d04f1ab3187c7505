"""A campaign's SSE clients: `python -m chaos.campaign.client SPEC INCARNATION`.

Each planned session reads one stream over SSE as `EventSource` would, on purpose badly: it
cuts its connection after some events or seconds, then resumes with `Last-Event-ID` on the
other server (a 503 or a refused connection is tried again there, with backoff), until a 204,
an `event: error` frame, or an answer it cannot continue from; an `event: restart` frame is
followed by a reconnect from the new attempt's start, as its id says. It records every
connection, every event and how the session ended.
"""

from __future__ import annotations

import contextlib
import sys
import time
from functools import partial

import anyio
import httpx

from resumable_stream.sse import SSEDecoder

from ._plan import SessionSpec
from ._process import Control, ProcessSpec, at, setup_logging
from ._records import Recorder

__all__ = ["main"]

_BACKOFF = (0.2, 0.5, 1.0, 2.0)
# A session that makes no progress for this long (refused, 503s, nothing read) gives up.
_GIVE_UP = 120.0


class Client:
    def __init__(self, spec: ProcessSpec, incarnation: int) -> None:
        self.spec = spec
        self.plan = spec.plan
        self.streams = self.plan.by_id()
        self.recorder = Recorder(spec.records / f"{spec.name}.{incarnation}.jsonl")

    async def run(self) -> None:
        control = Control()
        control.say("ready")
        t0 = await control.go()
        timeout = httpx.Timeout(10.0, read=40.0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
        async with (
            httpx.AsyncClient(timeout=timeout, limits=limits) as http,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(control.watch)
            async with anyio.create_task_group() as sessions:
                for session in self.plan.sessions:
                    sessions.start_soon(at, t0, session.at, partial(self.session, http, session))
                tg.start_soon(self._stop_on, control, sessions.cancel_scope)
            control.say("idle")
            await control.stopping.wait()
            tg.cancel_scope.cancel()
        control.say("closed")

    @staticmethod
    async def _stop_on(control: Control, scope: anyio.CancelScope) -> None:
        await control.stopping.wait()
        scope.cancel()

    async def session(self, http: httpx.AsyncClient, session: SessionSpec) -> None:
        stream = self.streams[session.stream]
        write = self.recorder.write
        rid = session.id
        write(
            "sess-start",
            rid=rid,
            sid=stream.id,
            dep=stream.deployment,
            creates=session.creates,
            offset=session.offset,
        )
        cursor = None if session.offset is None else str(session.offset)
        route = "s" if session.creates else "f"
        server = session.first_server
        connection = 0
        failures = 0
        progress = time.monotonic()
        decoder = SSEDecoder()
        try:
            while True:
                if time.monotonic() - progress > _GIVE_UP:
                    write("sess-end", rid=rid, end="gave-up")
                    return
                # As a browser: the last id seen, whatever became of its connection (a drop
                # mid-body included), else the cursor the session started with.
                seen = decoder.last_event_id
                if seen and seen != cursor:
                    cursor = seen
                    failures = 0
                    progress = time.monotonic()
                base = self.spec.servers[server % len(self.spec.servers)]
                headers = {"X-Campaign-Reader": rid, "Accept": "text/event-stream"}
                if cursor is not None:
                    headers["Last-Event-ID"] = cursor
                cut_events = (
                    session.cut_events[connection] if connection < len(session.cut_events) else None
                )
                cut_seconds = (
                    session.cut_seconds[connection]
                    if connection < len(session.cut_seconds)
                    else None
                )
                write("sess-conn", rid=rid, server=server % len(self.spec.servers), cursor=cursor)
                url = f"{base}/{route}/{stream.deployment}/{stream.id}"
                outcome = "drop"
                try:
                    async with http.stream("GET", url, headers=headers) as response:
                        status = response.status_code
                        kind = response.headers.get("content-type", "")
                        if status == 204:
                            write("sess-end", rid=rid, end="204", cursor=cursor)
                            return
                        if status != 200 or not kind.startswith("text/event-stream"):
                            body = (await response.aread())[:300].decode("utf-8", "replace")
                            write("sess-status", rid=rid, status=status, body=body)
                            if status in (502, 503, 504):
                                outcome = "retry"
                            else:
                                write("sess-end", rid=rid, end="http", status=status, body=body)
                                return
                        else:
                            decoder.close()
                            outcome, cursor = await self._events(
                                rid, response, decoder, cursor, cut_events, cut_seconds
                            )
                            if outcome in ("error", "end"):
                                return
                except httpx.HTTPError as exc:
                    write("sess-drop", rid=rid, error=type(exc).__name__, msg=str(exc)[:200])
                if outcome in ("cut", "eof", "restart"):
                    failures = 0
                    progress = time.monotonic()
                    pause = session.pause if outcome == "cut" else 0.0
                else:
                    pause = _BACKOFF[min(failures, len(_BACKOFF) - 1)]
                    failures += 1
                connection += 1
                server += 1
                if pause:
                    await anyio.sleep(pause)  # the client's reconnection delay
        except anyio.get_cancelled_exc_class():
            write("sess-end", rid=rid, end="stopped")
            raise

    async def _events(
        self,
        rid: str,
        response: httpx.Response,
        decoder: SSEDecoder,
        cursor: str | None,
        cut_events: int | None,
        cut_seconds: float | None,
    ) -> tuple[str, str | None]:
        """Read one connection's events: ("cut" | "eof" | "restart" | "error", the cursor)."""
        write = self.recorder.write
        seen = 0
        scope = anyio.move_on_after(cut_seconds) if cut_seconds is not None else None
        with scope if scope is not None else contextlib.nullcontext():
            async for piece in response.aiter_bytes():
                events = decoder.feed(piece)
                if events:
                    write("sess-events", rid=rid, items=[[e.id, e.event, e.data] for e in events])
                if decoder.last_event_id:
                    cursor = decoder.last_event_id
                for event in events:
                    if event.event == "error":
                        write("sess-end", rid=rid, end="error", data=event.data, id=event.id)
                        return "error", cursor
                    if event.event == "restart":
                        return "restart", cursor
                seen += len(events)
                if cut_events is not None and seen >= cut_events:
                    write("sess-cut", rid=rid, cursor=cursor, after="events")
                    return "cut", cursor
        if scope is not None and scope.cancelled_caught:
            write("sess-cut", rid=rid, cursor=cursor, after="seconds")
            return "cut", cursor
        write("sess-eof", rid=rid, cursor=cursor)
        return "eof", cursor


async def _main(spec_path: str, incarnation: int) -> None:
    setup_logging()
    await Client(ProcessSpec.read(spec_path), incarnation).run()


def main() -> None:
    anyio.run(_main, sys.argv[1], int(sys.argv[2]), backend="asyncio")


if __name__ == "__main__":
    main()
