"""A campaign's engine process: `python -m chaos.campaign.worker SPEC INCARNATION`.

It runs its share of the plan on two contexts (one durable, one not): the streams it produces
(a generator through `ctx.resumable_stream`, read by the producer's own reader; or a writer job
through `ctx.writer`), its readers (`resume_existing_stream`, with or without `wait=`, or
`resumable_stream`, which may produce the stream itself), and its cancels of other processes'
streams. It records everything (`_records`). A later incarnation (the process was SIGKILLed
and started again) skips what was planned while it was down, runs the writer jobs it missed,
and restarts (`restart=True`) the writer jobs its predecessors left unfinished when the plan
says they are retried.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from functools import partial

import anyio

import resumable_stream as rs

from ._plan import ReadSpec, StreamSpec
from ._process import Control, ProcessSpec, at, open_contexts, setup_logging
from ._produce import Producing
from ._records import Recorder, read_records

__all__ = ["main"]

_CLOSE_TIMEOUT = 10.0


class Worker:
    def __init__(self, spec: ProcessSpec, incarnation: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.incarnation = incarnation
        self.plan = spec.plan
        self.streams = self.plan.by_id()
        self.recorder = Recorder(spec.records / f"{spec.name}.{incarnation}.jsonl")
        self.producing = Producing(
            self.recorder, spec.name, self.plan.process_index(spec.name), incarnation
        )
        self.contexts: dict[str, rs.ResumableStreamContext] = {}

    async def run(self) -> None:
        control = Control()
        async with open_contexts(self.spec, self.recorder) as contexts:
            self.contexts = contexts
            control.say("ready")
            t0 = await control.go()
            async with anyio.create_task_group() as tg:
                tg.start_soon(control.watch)
                async with anyio.create_task_group() as actions:
                    self.schedule(actions, t0)
                    tg.start_soon(self._stop_on, control, actions.cancel_scope)
                control.say("idle")
                await control.stopping.wait()
                tg.cancel_scope.cancel()
            control.say("closing")
        control.say("closed")

    @staticmethod
    async def _stop_on(control: Control, scope: anyio.CancelScope) -> None:
        await control.stopping.wait()
        scope.cancel()

    def schedule(self, tg: anyio.abc.TaskGroup, t0: float) -> None:
        now = time.time() - t0
        fresh = self.incarnation == 0

        def later(when: float, action: Callable[[], Awaitable[None]]) -> None:
            if fresh or when >= now:
                tg.start_soon(at, t0, when, action)

        for stream in self.plan.streams:
            if stream.producer != self.name:
                continue
            if stream.kind == "generator":
                later(stream.start, partial(self.produce, stream))
            elif stream.kind == "writer":
                if not fresh and stream.start < now:
                    if stream.id not in self._started_before():
                        # A job that was due while the process was down runs late.
                        tg.start_soon(self.write, stream, False)
                else:
                    later(stream.start, partial(self.write, stream, False))
        for read in self.plan.reads:
            if read.proc == self.name:
                later(read.at, partial(self.read, read))
        for cancel in self.plan.cancels:
            if cancel.proc == self.name:
                later(cancel.at, partial(self.cancel, cancel.stream))
        if not fresh:
            for stream_id in self._unfinished_writers():
                stream = self.streams[stream_id]
                if stream.retry:
                    tg.start_soon(self.write, stream, True)

    def _previous(self) -> list[dict[str, object]]:
        return [
            record
            for name, incarnation, record in read_records(self.spec.records)
            if name == self.name and incarnation < self.incarnation
        ]

    def _started_before(self) -> set[str]:
        return {
            str(r["sid"])
            for r in self._previous()
            if r["k"] in ("inst-start", "writer-refused") and r.get("kind", "writer") == "writer"
        }

    def _unfinished_writers(self) -> list[str]:
        """The streams whose latest writer here never recorded its end: its process died."""
        latest: dict[str, str] = {}  # stream -> its latest writer instance here
        ended: set[str] = set()
        for record in self._previous():
            if record["k"] == "inst-start" and record["kind"] == "writer":
                latest[str(record["sid"])] = str(record["inst"])
            elif record["k"] == "inst-end":
                ended.add(str(record["inst"]))
        return sorted(sid for sid, inst in latest.items() if inst not in ended)

    # Actions

    async def produce(self, stream: StreamSpec) -> None:
        """The stream's request: produce it (or follow it, if another process was first) and
        read it, as the producer's own reader."""
        read = ReadSpec(
            id=f"o{stream.id}.{self.name}.{self.incarnation}",
            stream=stream.id,
            proc=self.name,
            at=stream.start,
            api="resumable",
            offset=None,
            mode="batch",
            stop_after=None,
        )
        await self.read(read)

    async def write(self, stream: StreamSpec, restart: bool) -> None:
        try:
            await self.producing.write_stream(self.contexts[stream.deployment], stream, restart)
        except Exception as exc:
            self._untyped("writer", stream.id, exc)

    async def cancel(self, stream_id: str) -> None:
        stream = self.streams[stream_id]
        write = self.recorder.write
        write("cancel-start", sid=stream_id, dep=stream.deployment)
        try:
            await self.contexts[stream.deployment].cancel_stream(stream_id)
            write("cancel", sid=stream_id, dep=stream.deployment, result="ok")
        except rs.ResumableStreamError as exc:
            write(
                "cancel",
                sid=stream_id,
                dep=stream.deployment,
                result=type(exc).__name__,
                msg=str(exc)[:300],
            )
        except Exception as exc:
            self._untyped("cancel", stream_id, exc)

    def _untyped(self, what: str, stream_id: str, exc: BaseException) -> None:
        self.recorder.write(
            "untyped",
            what=what,
            sid=stream_id,
            error=type(exc).__name__,
            msg=str(exc)[:300],
            tb="".join(traceback.format_exception(exc))[-4000:],
        )

    async def read(self, read: ReadSpec, attempt: int | None = None) -> None:
        stream = self.streams[read.stream]
        ctx = self.contexts[stream.deployment]
        write = self.recorder.write
        rid = read.id
        write(
            "read-start",
            rid=rid,
            sid=read.stream,
            dep=stream.deployment,
            api=read.api,
            offset=read.offset,
            mode=read.mode,
            attempt=attempt,
        )
        reader: rs.ResumableStream | None = None
        phase = "call"
        try:
            if read.api == "resumable":
                make = self.producing.source(stream, rid)
                reader = await ctx.resumable_stream(read.stream, make, read.offset, attempt=attempt)
            else:
                wait = None
                if read.api == "wait":
                    wait = max(1.0, stream.start - read.at + 5.0)
                reader = await ctx.resume_existing_stream(
                    read.stream, read.offset, wait=wait, attempt=attempt
                )
            if reader is None:
                write("read-end", rid=rid, end="none")
                return
            write("read-open", rid=rid, attempt=reader.attempt)
            phase = "read"
            await self._consume(rid, reader, read)
        except rs.StreamRestartedError as exc:
            write(
                "read-end",
                rid=rid,
                end="error",
                error=type(exc).__name__,
                msg=str(exc)[:300],
                phase=phase,
                attempt=exc.attempt,
            )
            # As a client would: read the new attempt from its start.
            again = ReadSpec(
                f"{rid}+{exc.attempt}",
                read.stream,
                read.proc,
                read.at,
                read.api,
                0,
                read.mode,
                read.stop_after,
            )
            await self.read(again, exc.attempt)
        except rs.ResumableStreamError as exc:
            write(
                "read-end",
                rid=rid,
                end="error",
                error=type(exc).__name__,
                msg=str(exc)[:300],
                phase=phase,
            )
        except anyio.get_cancelled_exc_class():
            write("read-end", rid=rid, end="stopped", phase=phase)
            raise
        except BaseException as exc:  # an exception group, or anything untyped
            write(
                "read-end",
                rid=rid,
                end="untyped",
                error=type(exc).__name__,
                msg=str(exc)[:300],
                phase=phase,
                tb="".join(traceback.format_exception(exc))[-4000:],
            )
            if not isinstance(exc, Exception):
                raise
        finally:
            if reader is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
                    try:
                        await reader.aclose()
                    except Exception as exc:
                        self._untyped("aclose", read.stream, exc)

    async def _consume(self, rid: str, reader: rs.ResumableStream, read: ReadSpec) -> None:
        write = self.recorder.write
        taken = 0
        if read.mode == "iter":
            async for chunk in reader:
                write("read-chunks", rid=rid, items=[[chunk, None, None]])
                taken += 1
                if read.stop_after is not None and taken >= read.stop_after:
                    write("read-end", rid=rid, end="detached")
                    return
        else:
            while True:
                try:
                    batch = await reader.next_batch()
                except StopAsyncIteration:
                    break
                items = [
                    [item, end, None] if isinstance(item, str) else [item.data, end, item.event]
                    for item, end in batch
                ]
                write("read-chunks", rid=rid, items=items)
                taken += len(batch)
                if read.stop_after is not None and taken >= read.stop_after:
                    write("read-end", rid=rid, end="detached")
                    return
        write("read-end", rid=rid, end="stop")


async def _main(spec_path: str, incarnation: int) -> None:
    setup_logging()
    spec = ProcessSpec.read(spec_path)
    await Worker(spec, incarnation).run()


def main() -> None:
    spec_path, incarnation = sys.argv[1], int(sys.argv[2])
    spec = ProcessSpec.read(spec_path)
    loop = spec.plan.loops[spec.plan.workers.index(spec.name)]
    anyio.run(
        _main,
        spec_path,
        incarnation,
        backend="asyncio",
        backend_options={"use_uvloop": loop == "uvloop"},
    )


if __name__ == "__main__":
    main()
