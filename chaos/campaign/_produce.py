"""Producing a planned stream, recording it: a generator (for `ctx.resumable_stream` and the
SSE servers' `make_stream`) and a writer job (`ctx.writer`).

Every chunk is recorded (and flushed) before the engine gets it, and how the instance ended
after; an instance is one producer run, named `<process>.<incarnation>.<n>`, and its chunks end
with its marker.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable

import anyio

import resumable_stream as rs

from ._plan import StreamSpec, marker
from ._records import Recorder

__all__ = ["PlannedFailure", "Producing"]


class PlannedFailure(Exception):
    """What a stream planned to fail raises."""


class Producing:
    """The producer side of one process incarnation."""

    def __init__(self, recorder: Recorder, name: str, index: int, incarnation: int) -> None:
        self.recorder = recorder
        self.name = name
        self.index = index
        self.incarnation = incarnation
        self._count = itertools.count()

    def _instance(self) -> tuple[str, str]:
        """A new instance's name and marker."""
        number = next(self._count)
        return (
            f"{self.name}.{self.incarnation}.{number}",
            marker(self.index, self.incarnation, number),
        )

    def source(
        self, stream: StreamSpec, rid: str | None
    ) -> Callable[[], AsyncIterator[str | rs.Event]]:
        """`make_stream` for `stream`: each call is a new instance (elected by `rid`'s call)."""

        def make() -> AsyncIterator[str | rs.Event]:
            return self._generate(stream, rid)

        return make

    async def _generate(self, stream: StreamSpec, rid: str | None) -> AsyncIterator[str | rs.Event]:
        inst, mark = self._instance()
        write = self.recorder.write
        write(
            "inst-start",
            inst=inst,
            sid=stream.id,
            dep=stream.deployment,
            kind="generator",
            attempt=1,
            rid=rid,
        )
        ended = False
        try:
            for chunk in stream.chunks:
                if chunk.delay:
                    await anyio.sleep(chunk.delay)
                if not chunk.text:
                    yield ""
                    continue
                text = chunk.text + mark
                write("inst-chunk", inst=inst, text=text, event=chunk.event)
                yield rs.Event(text, event=chunk.event) if chunk.event else text
            ended = True
            if stream.fails:
                write("inst-end", inst=inst, how="failed")
                raise PlannedFailure(f"stream {stream.id} fails as planned")
            write("inst-end", inst=inst, how="done")
        finally:
            if not ended:
                write("inst-end", inst=inst, how="cancelled")

    async def write_stream(
        self, ctx: rs.ResumableStreamContext, stream: StreamSpec, restart: bool
    ) -> None:
        """Run `stream` as a writer job (`restart=True`: a retried job)."""
        write = self.recorder.write
        inst, mark = self._instance()
        try:
            async with ctx.writer(stream.id, restart=restart) as writer:
                write(
                    "inst-start",
                    inst=inst,
                    sid=stream.id,
                    dep=stream.deployment,
                    kind="writer",
                    attempt=writer.attempt,
                    rid=None,
                    restart=restart,
                )
                ended = False
                try:
                    for chunk in stream.chunks:
                        if chunk.delay:
                            await anyio.sleep(chunk.delay)
                        if not chunk.text:
                            await writer.write("")
                            continue
                        text = chunk.text + mark
                        write("inst-chunk", inst=inst, text=text, event=chunk.event)
                        await writer.write(
                            rs.Event(text, event=chunk.event) if chunk.event else text
                        )
                    ended = True
                    if stream.fails:
                        write("inst-end", inst=inst, how="failed")
                        await writer.fail(f"stream {stream.id} fails as planned")
                    else:
                        write("inst-end", inst=inst, how="done")
                finally:
                    if not ended:
                        write("inst-end", inst=inst, how="cancelled")
            if writer.cancelled and ended:
                # Stopped after its last chunk, before its end was recorded: it ended cancelled.
                write("inst-end", inst=inst, how="cancelled")
        except rs.ResumableStreamError as exc:
            write(
                "writer-refused",
                sid=stream.id,
                dep=stream.deployment,
                restart=restart,
                error=type(exc).__name__,
                msg=str(exc)[:300],
            )
