"""One run: the processes (contexts on the simulated Redis), their calls and readers, the
faults, and everything they did, recorded for the model check.

Ground truth is recorded where it happens: each producer run (an `Instance`) records the exact
chunks its generator handed to the engine and how the generator ended; each call records what
the public API answered, and each reader every chunk it got and how it ended, with virtual
timestamps. A process dies by having its connection severed and its tasks cancelled; it closes
cleanly by cancelling its requests and leaving `async with ctx`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
from dataclasses import dataclass, field
from typing import cast

import anyio

import resumable_stream as rs
from resumable_stream import _protocol as p
from resumable_stream._context import ResumableStreamContext
from resumable_stream._producer import Producer
from resumable_stream._reader import ProducerReader

from ._history import History
from ._ledger import Ledger
from ._plan import MARKERS, CallPlan, FaultPlan, Plan, ProcessPlan, StreamPlan
from ._redis import CLOSED, DEAD, SimBackend, SimRedis

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["CallRecord", "Instance", "LeakReport", "ProcState", "ReadRecord", "World"]

KEY_PREFIX = "resumable-stream"
KEYS = p.Keys(KEY_PREFIX)

# Bounds, in virtual seconds, past which a call or a read counts as a hang. Generous: the
# engine's own bounds are a few seconds (resume_timeout, liveness_timeout, command deadlines),
# 15 s per cleanup step, 40 s to close; a stall lasts at most 8 s; a stream pauses at most 30 s.
CALL_BOUND = 90.0
READ_BOUND = 120.0
ACLOSE_BOUND = 30.0
EXIT_BOUND = 120.0


class SimulatedFailure(Exception):
    """What a failing generator raises."""


@dataclass(slots=True)
class ProcState:
    plan: ProcessPlan
    backend: SimBackend
    calls: list[CallPlan]
    ctx: ResumableStreamContext | None = None
    scope: anyio.CancelScope | None = None  # the whole process: its death cancels it
    calls_scope: anyio.CancelScope | None = None  # its requests: a clean close cancels them
    opened_at: float = math.inf
    died_at: float = math.inf
    closing_at: float = math.inf  # its context began closing
    closed_at: float = math.inf
    counted: bool = False  # done with its requests, for the barrier

    @property
    def name(self) -> str:
        return self.plan.name

    def open_at(self, t: float) -> bool:
        return self.opened_at <= t < min(self.died_at, self.closing_at)


@dataclass(slots=True)
class Instance:
    """One run of a stream's generator: a producer."""

    stream: StreamPlan
    proc: str
    number: int
    call: int  # the call whose `make_stream` it is
    elected_at: float = math.inf  # its call returned its reader
    started_at: float = math.inf  # the engine called `make_stream`
    offline: bool = False  # started while the backend failed: its caller's only
    chunks: list[tuple[str, str | None, int | None]] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    length: int = 0
    ended: str | None = None  # done | failed | cancelled | died | never-started
    ended_at: float = math.inf

    @property
    def marker(self) -> str:
        return MARKERS[self.number % len(MARKERS)]

    @property
    def name(self) -> str:
        return f"{self.stream.id}#{self.number}"

    @property
    def text(self) -> str:
        return "".join(chunk[0] for chunk in self.chunks)


@dataclass(slots=True)
class ReadRecord:
    # (text, end offset or None for `async for`, event name, retry, was an Event)
    pieces: list[tuple[str, int | None, str | None, int | None, bool]] = field(default_factory=list)
    end: str = "open"  # stop | error | aclosed | cancelled | died | closed | hang | untyped
    error: str | None = None
    message: str = ""
    t_end: float = math.inf

    @property
    def text(self) -> str:
        return "".join(piece[0] for piece in self.pieces)


@dataclass(slots=True)
class CallRecord:
    plan: CallPlan
    t_call: float = math.inf
    t_return: float = math.inf
    # stream | none | value | error | untyped | hang | cancelled | died | closed | skipped
    outcome: str = "skipped"
    value: object = None
    error: str | None = None
    message: str = ""
    reads: Instance | None = None  # the instance a producer's reader reads
    read: ReadRecord | None = None


@dataclass(slots=True)
class LeakReport:
    what: str
    detail: str


class _Make:
    """The `make_stream` of one call: if the call wins the election, its generator."""

    __slots__ = ("call", "stream", "world")

    def __init__(self, world: World, stream: StreamPlan, call: int) -> None:
        self.world = world
        self.stream = stream
        self.call = call

    def __call__(self) -> _Source:
        instance = self.world.instance(self)
        instance.started_at = self.world.now()
        self.world.history.add(instance.proc, "gen-start", instance.name)
        return _Source(self.world, instance)


class _Source:
    """The generator: an async iterator (not an async generator, whose finalization the garbage
    collector would time) that records exactly what it hands to the engine."""

    __slots__ = ("_i", "instance", "world")

    def __init__(self, world: World, instance: Instance) -> None:
        self.world = world
        self.instance = instance
        self._i = 0

    def __aiter__(self) -> _Source:
        return self

    def _end(self, how: str) -> None:
        instance = self.instance
        if instance.ended is None:
            if how == "cancelled" and self.world.dead(instance.proc):
                how = "died"
            instance.ended = how
            instance.ended_at = self.world.now()
            self.world.history.add(instance.proc, "gen-end", instance.name, how, instance.length)

    async def __anext__(self) -> str | rs.Event:
        instance = self.instance
        steps = instance.stream.steps
        try:
            if self.world.dead(instance.proc):
                await anyio.sleep_forever()  # a dead process produces nothing more
            if self._i >= len(steps):
                if instance.stream.fails:
                    self._end("failed")
                    raise SimulatedFailure(f"{instance.name} fails as planned")
                self._end("done")
                raise StopAsyncIteration
            step = steps[self._i]
            self._i += 1
            if step.delay:
                await anyio.sleep(step.delay)
            if self.world.dead(instance.proc):
                await anyio.sleep_forever()
        except (StopAsyncIteration, SimulatedFailure):
            raise
        except BaseException:
            self._end("cancelled")
            raise
        if not step.text:
            self.world.history.add(instance.proc, "gen", instance.name, instance.length, "")
            return ""
        text = step.text + instance.marker
        instance.chunks.append((text, step.event, step.retry))
        instance.length += len(text)
        instance.ends.append(instance.length)
        self.world.history.add(instance.proc, "gen", instance.name, instance.length, text)
        if step.event is not None:
            return rs.Event(text, event=step.event, retry=step.retry)
        return text

    async def aclose(self) -> None:
        self._end("cancelled")


class _LogCapture(logging.Handler):
    """The engine's log, into the history: warnings as they are, errors also for the model."""

    def __init__(self, world: World) -> None:
        super().__init__(logging.WARNING)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        who = "log"
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message += f" [{type(exc).__name__}: {exc}]"
        self.world.history.add(who, record.levelname.lower(), message[:300])
        if record.levelno >= logging.ERROR:
            self.world.logged_errors.append((self.world.now(), message))


class World:
    """Runs one plan on one loop; what happened is in its records afterwards."""

    def __init__(self, plan: Plan, history: History, loop: asyncio.AbstractEventLoop) -> None:
        self.plan = plan
        self.history = history
        self.ledger = Ledger()
        self.rng = random.Random(plan.seed * 7919 + 1)  # the faults' draws while running
        self.server = SimRedis(loop, self.rng, history, self.ledger)
        self.procs: dict[str, ProcState] = {}
        for proc_plan in plan.processes:
            link_rng = random.Random(f"{plan.seed}:{proc_plan.name}")
            backend = SimBackend(self.server, proc_plan.name, proc_plan.link, link_rng)
            calls = [call for call in plan.calls if call.proc == proc_plan.name]
            self.procs[proc_plan.name] = ProcState(proc_plan, backend, calls)
        self.instances: list[Instance] = []
        self._by_make: dict[int, Instance] = {}  # by call index
        self.records: list[CallRecord] = []
        self.leaks: list[LeakReport] = []
        self.logged_errors: list[tuple[float, str]] = []
        self.barrier = anyio.Event()
        self._busy = len(self.procs)

    @staticmethod
    def now() -> float:
        return anyio.current_time()

    def dead(self, proc: str) -> bool:
        return self.procs[proc].died_at <= self.now()

    def instance(self, make: _Make) -> Instance:
        found = self._by_make.get(make.call)
        if found is None:
            number = sum(1 for i in self.instances if i.stream.id == make.stream.id)
            proc = self.plan.calls[make.call].proc
            found = Instance(make.stream, proc, number, make.call)
            self.instances.append(found)
            self._by_make[make.call] = found
        return found

    # The run

    async def run(self) -> None:
        capture = _LogCapture(self)
        engine_log = logging.getLogger("resumable_stream")
        saved = engine_log.propagate, engine_log.level
        engine_log.addHandler(capture)
        engine_log.propagate = False
        engine_log.setLevel(logging.WARNING)
        try:
            async with anyio.create_task_group() as tg:
                for proc in self.procs.values():
                    tg.start_soon(self._process, proc)
                tg.start_soon(self._faults)
            await self._final_checks()
        finally:
            engine_log.removeHandler(capture)
            engine_log.propagate, engine_log.level = saved

    async def _process(self, proc: ProcState) -> None:
        options = proc.plan.context.options()
        ctx = ResumableStreamContext(backend=proc.backend, telemetry=False, **options)
        proc.ctx = ctx
        try:
            with anyio.CancelScope() as proc.scope:
                if not await self._enter(proc, ctx):
                    return
                try:
                    await self._serve(proc)
                except BaseException as exc:
                    await self._exit(proc, ctx, exc)
                    raise
                await self._exit(proc, ctx, None)
        finally:
            self._done(proc)

    async def _enter(self, proc: ProcState, ctx: ResumableStreamContext) -> bool:
        # No cancel scope of ours around entering or leaving: the context's task group stays
        # open in between, and scopes must nest. Both are bounded by the engine's own
        # deadlines; how long they took is checked afterwards.
        start = self.now()
        try:
            await ctx.__aenter__()
        except Exception as exc:
            self._context_error(proc.name, "enter", exc)
            return False
        proc.opened_at = self.now()
        if proc.opened_at - start >= CALL_BOUND:
            self.leaks.append(LeakReport("hang", f"{proc.name}: entering its context"))
        self.history.add(proc.name, "open")
        return True

    async def _serve(self, proc: ProcState) -> None:
        with anyio.CancelScope() as proc.calls_scope:
            async with anyio.create_task_group() as tg:
                for call in proc.calls:
                    tg.start_soon(self._call, proc, call)
        self._done(proc)
        await self.barrier.wait()
        if self.plan.settle and proc.closing_at == math.inf:
            longest = max((s.duration for s in self.plan.streams), default=0.0)
            linger = max(p.context.linger for p in self.plan.processes)
            await anyio.sleep(longest + linger + 30.0)
            self._check_settled(proc)
        else:
            await anyio.sleep(self.rng.uniform(0.0, 1.0))

    async def _exit(
        self, proc: ProcState, ctx: ResumableStreamContext, exc: BaseException | None
    ) -> None:
        """Leave `async with ctx`, as the block would with `exc`."""
        proc.closing_at = min(proc.closing_at, self.now())
        self.history.add(proc.name, "closing")
        start = self.now()
        cancelled = anyio.get_cancelled_exc_class()
        try:
            if exc is None:
                await ctx.__aexit__(None, None, None)
            else:
                await ctx.__aexit__(type(exc), exc, exc.__traceback__)
        except BaseException as error:
            if type(error) is cancelled and exc is not None:
                raise  # the process's own cancellation (it died), passing through
            self._context_error(proc.name, "exit", error)
            if not isinstance(error, Exception):
                raise
        finally:
            proc.closed_at = self.now()
            self.history.add(proc.name, "closed")
            took = proc.closed_at - start
            if took >= EXIT_BOUND:
                detail = f"{proc.name}: leaving its context took {took:.1f}s"
                self.leaks.append(LeakReport("hang", detail))

    def _context_error(self, who: str, where: str, exc: BaseException) -> None:
        self.history.add(who, f"{where}-error", type(exc).__name__, str(exc)[:200])
        if not isinstance(exc, rs.ResumableStreamError):
            detail = f"{who}: `async with ctx` ({where}) raised {_describe(exc)}"
            self.leaks.append(LeakReport("untyped", detail))

    def _done(self, proc: ProcState) -> None:
        """`proc` is done with its requests (or gone): the last one lets every process close."""
        if proc.counted:
            return
        proc.counted = True
        self._busy -= 1
        if self._busy == 0:
            self.barrier.set()
            self.history.add("sim", "barrier")

    # Calls and readers

    async def _call(self, proc: ProcState, call: CallPlan) -> None:
        delay = call.at - self.now()
        if delay > 0:
            await anyio.sleep(delay)
        record = CallRecord(call)
        self.records.append(record)
        if not proc.open_at(self.now()) or proc.ctx is None:
            return  # its process is gone or closing: nothing was asked
        record.t_call = self.now()
        self.history.add(proc.name, "call", call.index, call.api, call.stream, call.resume_at)
        with anyio.CancelScope() as own:
            if call.cancel_after is not None:
                own.deadline = self.now() + call.cancel_after
            stream = await self._ask(proc, proc.ctx, call, record)
            if stream is not None:
                record.read = ReadRecord()
                await self._read(proc, call, stream, record.read)

    async def _ask(
        self, proc: ProcState, ctx: ResumableStreamContext, call: CallPlan, record: CallRecord
    ) -> rs.ResumableStream | None:
        """Make the call; its answer (or error) goes into `record`."""
        stream = None
        try:
            with anyio.move_on_after(CALL_BOUND) as bound:
                stream = await self._invoke(ctx, call, record)
            if bound.cancelled_caught:
                record.outcome = "hang"
        except rs.ResumableStreamError as exc:
            record.outcome, record.error, record.message = "error", type(exc).__name__, str(exc)
        except Exception as exc:
            record.outcome, record.error, record.message = "untyped", _describe(exc), str(exc)
        except BaseException as exc:
            if type(exc) is anyio.get_cancelled_exc_class():
                record.outcome = self._why_cancelled(proc)
            else:
                record.outcome, record.error, record.message = "untyped", _describe(exc), str(exc)
            raise
        finally:
            record.t_return = self.now()
            shown = record.error or (record.value if record.outcome == "value" else "")
            self.history.add(proc.name, "return", call.index, record.outcome, shown)
        return stream

    async def _invoke(
        self, ctx: ResumableStreamContext, call: CallPlan, record: CallRecord
    ) -> rs.ResumableStream | None:
        api = call.api
        if api == "has_existing_stream":
            record.value = await ctx.has_existing_stream(call.stream)
            record.outcome = "value"
            return None
        if api == "cancel_stream":
            await ctx.cancel_stream(call.stream)
            record.outcome = "value"
            return None
        if api in ("writer", "writer-restart"):
            await self._write(ctx, call, record)
            return None
        if api == "resume_existing_stream":
            stream = await ctx.resume_existing_stream(call.stream, call.resume_at, wait=call.wait)
        else:
            make = _Make(self, self.plan.stream(call.stream), call.index)
            if api == "create_new_resumable_stream":
                stream = await ctx.create_new_resumable_stream(call.stream, make, call.resume_at)
            else:
                stream = await ctx.resumable_stream(call.stream, make, call.resume_at)
            if isinstance(stream, ProducerReader):
                producer = cast(Producer, stream._producer)
                if producer._make_stream is make:  # this call won the election
                    instance = self.instance(make)
                    instance.elected_at = self.now()
                    instance.offline = producer.offline
                    self.history.add(call.proc, "elected", instance.name, instance.offline)
        if isinstance(stream, ProducerReader):
            make_of = cast(Producer, stream._producer)._make_stream
            if isinstance(make_of, _Make):
                record.reads = self.instance(make_of)
        record.outcome = "none" if stream is None else "stream"
        return stream

    async def _write(self, ctx: ResumableStreamContext, call: CallPlan, record: CallRecord) -> None:
        """A background job's writer: the stream's steps written one by one; a failing stream's
        exception goes through the writer's block (which ends it failed), as a job's would."""
        make = _Make(self, self.plan.stream(call.stream), call.index)
        writer = ctx.writer(call.stream, restart=call.api == "writer-restart")
        started = False
        try:
            async with writer as w:
                started = True
                instance = self.instance(make)
                instance.elected_at = instance.started_at = self.now()
                self.history.add(call.proc, "elected", instance.name, False)
                self.history.add(instance.proc, "gen-start", instance.name)
                source = _Source(self, instance)
                async for chunk in source:
                    await w.write(chunk)
        except SimulatedFailure:
            pass  # the job failed: the stream ended failed
        except rs.BackendError:
            if not started:
                # It may have won the election and failed before its writer started: a running
                # sentinel with no producer, as an election whose reply was lost leaves.
                self.ledger.ghosts.append((self.now(), KEYS.sentinel(call.stream)))
                self.history.add(call.proc, "ghost-election", KEYS.sentinel(call.stream))
            raise
        record.outcome = "value"
        record.value = "cancelled" if writer.cancelled else "written"

    @staticmethod
    def _why_cancelled(proc: ProcState) -> str:
        now = anyio.current_time()
        if proc.died_at <= now:
            return "died"
        if proc.closing_at <= now:
            return "closed"
        return "cancelled"

    async def _read(
        self, proc: ProcState, call: CallPlan, stream: rs.ResumableStream, read: ReadRecord
    ) -> None:
        """Read to the end (or until the plan stops or cancels it), recording every chunk."""
        reads = 0
        try:
            while read.end == "open":
                with anyio.move_on_after(READ_BOUND) as bound:
                    await self._read_once(proc, call, stream, read)
                if bound.cancelled_caught:
                    read.end = "hang"
                reads += 1
                if read.end == "open" and call.stop_after is not None and reads >= call.stop_after:
                    read.end = "aclosed"
                if read.end == "open" and call.pause:
                    await anyio.sleep(call.pause)
        except BaseException:
            if read.end == "open":
                read.end = self._why_cancelled(proc)
            raise
        finally:
            read.t_end = self.now()
            self.history.add(proc.name, "read-end", call.index, read.end, read.error)
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.move_on_after(ACLOSE_BOUND) as bound:
                        await stream.aclose()
                    if bound.cancelled_caught:
                        self.leaks.append(LeakReport("hang", f"call {call.index}: aclose()"))
                except Exception as exc:
                    detail = f"call {call.index}: aclose() raised {_describe(exc)}"
                    self.leaks.append(LeakReport("untyped", detail))

    async def _read_once(
        self, proc: ProcState, call: CallPlan, stream: rs.ResumableStream, read: ReadRecord
    ) -> None:
        try:
            if call.mode == "iter":
                item = await stream.__anext__()
                read.pieces.append((item, None, None, None, False))
                self.history.add(proc.name, "read", call.index, item)
                return
            entries = await stream.next_batch(call.limit)
            if call.mode == "ready":
                entries += stream.take_ready()
            for chunk, end in entries:
                if isinstance(chunk, rs.Event):
                    read.pieces.append((chunk.data, end, chunk.event, chunk.retry, True))
                else:
                    read.pieces.append((chunk, end, None, None, False))
            shown = [(c.data if isinstance(c, rs.Event) else c, end) for c, end in entries]
            self.history.add(proc.name, "read", call.index, *shown)
        except StopAsyncIteration:
            read.end = "stop"
        except rs.ResumableStreamError as exc:
            read.end, read.error, read.message = "error", type(exc).__name__, str(exc)
        except Exception as exc:
            read.end, read.error, read.message = "untyped", _describe(exc), str(exc)

    # Faults

    async def _faults(self) -> None:
        for fault in self.plan.faults:
            with anyio.move_on_after(max(0.0, fault.at - self.now())):
                await self.barrier.wait()
            if self.barrier.is_set():
                return
            self._inject(fault)

    def _inject(self, fault: FaultPlan) -> None:
        server = self.server
        kind = fault.kind
        proc = self.procs[fault.proc] if fault.proc is not None else None
        connection = proc.backend.connection if proc is not None else None
        usable = connection is not None and connection.cmd_state not in (DEAD, CLOSED)
        if kind in ("sub-drop", "cmd-drop", "net-drop"):
            if usable:
                assert connection is not None
                if kind != "sub-drop":
                    connection.drop("cmd", fault.duration, count=kind == "cmd-drop")
                if kind != "cmd-drop":
                    connection.drop("sub", fault.duration, count=kind == "sub-drop")
                if kind == "net-drop":
                    self.ledger.count("net-drop")
        elif kind == "stall":
            server.stall(fault.duration)
        elif kind == "restart":
            server.restart(fault.duration)
        elif kind == "evict":
            assert fault.stream is not None
            key = (
                KEYS.sentinel(fault.stream) if fault.key == "sentinel" else KEYS.text(fault.stream)
            )
            server.evict(key)
        elif kind == "oom":
            server.set_oom(fault.duration)
        elif kind == "slow-link":
            if usable:
                assert connection is not None
                connection.slow(fault.duration, fault.delay)
        elif kind == "death":
            assert proc is not None
            if proc.died_at == math.inf and proc.closing_at == math.inf:
                self.ledger.count("death")
                proc.died_at = self.now()
                self.history.add(proc.name, "death")
                if connection is not None:
                    connection.kill()
                if proc.scope is not None:
                    proc.scope.cancel()
        elif kind == "close":
            assert proc is not None
            if (
                proc.died_at == math.inf
                and proc.closing_at == math.inf
                and proc.opened_at < math.inf
            ):
                self.ledger.count("close")
                proc.closing_at = self.now()
                self.history.add(proc.name, "close")
                if proc.calls_scope is not None:
                    proc.calls_scope.cancel()

    # Leaks

    def _check_settled(self, proc: ProcState) -> None:
        """Once every request is over and nothing can linger any more, a context holds its
        inbox's subscription and nothing else."""
        ctx = proc.ctx
        connection = proc.backend.connection
        if ctx is None or connection is None or connection.cmd_state in (DEAD, CLOSED):
            return
        hub = ctx._hub
        name = proc.name
        if hub._live:
            self.leaks.append(LeakReport("leak", f"{name}: followers left: {sorted(hub._live)}"))
        if hub._listeners:
            self.leaks.append(LeakReport("leak", f"{name}: {len(hub._listeners)} listeners left"))
        if hub._producers:
            self.leaks.append(
                LeakReport("leak", f"{name}: producers left: {sorted(hub._producers)}")
            )
        inbox = hub._inbox
        wanted = [c for c in connection.wanted if c != inbox]
        held = [c for c in self.server.subscriptions_of(connection) if c != inbox]
        if wanted or held:
            self.leaks.append(
                LeakReport("leak", f"{name}: subscriptions left: wanted {wanted}, held {held}")
            )

    async def _final_checks(self) -> None:
        """After every context closed: no task, subscription or key without a TTL is left."""
        me = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not me and not task.done():
                self.leaks.append(LeakReport("leak", f"a task still runs: {task.get_name()}"))
        if self.server.channels:
            self.leaks.append(
                LeakReport("leak", f"subscriptions left: {sorted(self.server.channels)}")
            )
        for key in self.server.live_keys():
            ttl = self.server.ttl_of(key)
            if ttl is None or ttl == math.inf or ttl > 10 * 24 * 3600:
                self.leaks.append(LeakReport("leak", f"a key without a TTL: {key}"))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        inner = ", ".join(_describe(e) for e in exc.exceptions)
        return f"{type(exc).__name__}({inner})"
    return f"{type(exc).__name__}: {exc}"[:300]
