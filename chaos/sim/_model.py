"""The model check: what every run must satisfy, given what really happened.

Ground truth: each producer run (an *instance*: one call's `make_stream`, run by the engine)
recorded the exact chunks its generator handed to the engine, its text T, and how it ended:
`done` (the generator returned), `failed` (it raised), `cancelled` (the engine cancelled or
closed it while its process lived: `cancel_stream`, or its context closing), `died` (its
process died under it), or `never-started` (elected, then stopped before the engine called
`make_stream`). The simulator knows every fault it injected, with its span (`_ledger`).

A reader is one call's stream (the producer's own or a follower), resumed at offset o (0 for
`resume_at=None`); R is the concatenation of what it read. Its *candidates* are the instances
of its stream id with R == T[o : o + len(R)]: for a producer's own reader, only the instance it
reads. Times are virtual; a claim's time is when the reader (or call) got it; a call's window
is [its start, its return].

Hard violations
- `wrong-text`: no candidate (R is no instance's T[o:] prefix: text wrong, reordered, lost in
  the middle, or mixed from two producers; every chunk carries its instance's marker, so two
  producers' texts never agree on a chunk).
- `chunking`: a chunk handed out does not end on a chunk boundary of the candidate (the first
  may start mid-chunk), or (batches) a chunk's `Event` name and retry, or its end offset, are
  not the instance's.
- `false-end`: a normal end (`StopAsyncIteration`) without a candidate that ended `done` with
  R == T[o:] exactly (a shorter text, or a stream that failed, was cancelled or died).
- `untyped`: any exception out of the public API that is not a `ResumableStreamError`
  (`ValueError` included: the simulator never passes bad input), exception groups included:
  from `resumable_stream`, `create_new_resumable_stream`, `resume_existing_stream`,
  `has_existing_stream`, `cancel_stream`, a reader's `__anext__`/`next_batch`/`aclose`, or
  `async with ctx` (entering or leaving).
- `hang`: a call not answered within 90 s, a read not answered within 120 s, an `aclose()`
  not done within 30 s, a context not left within 120 s (virtual), a global deadlock, or a run
  that keeps the loop busy without letting time pass.
- `leak`: once every context closed, a task still running on the loop, a subscription in the
  simulated Redis, a key without a TTL, a generator the engine never ended; and in runs that
  settle before closing (once every call is over and nothing can linger any more), a context
  holding a follower, a listener, a producer, or any subscription but its inbox.
- `logged-error`: the engine logged an error (a helper task or a handler that raised) or the
  loop reported an exception nobody retrieved.

False claims (each a violation of its own kind)
- `false-failed`: `StreamFailedError` without a candidate that ended `failed` by then.
- `false-cancelled`: `StreamCancelledError` without a candidate that ended `cancelled` or
  `never-started`, and without a `cancel_stream` of that id started before the claim.
- `false-lost`: `ProducerLostError` although, for every candidate: its process was alive
  and open at the claim; it was elected normally (not an offline producer; and no "ghost"
  before the claim: an election whose reply was lost, or a writer that failed after its
  election, before it started); and neither its process's connections (down or restoring) nor
  the server (stalled, restarting) had an outage longer than two thirds of the reader's
  `liveness_timeout` (heartbeats come every third of it, so such an outage is a silence of the
  whole timeout to a follower, as a death is) overlapping
  [call start - (resume_timeout + liveness_timeout), claim]. A slow link is not an outage
  (Redis still answers, only later), unless a round trip on it (twice its added delay) takes
  the reader's `liveness_timeout` or more: a producer that is starting (or subscribing again)
  on it is not subscribed before a reader must give up, as if it were dead.
- `false-none`: `None` ("nothing to resume") from `resumable_stream` or
  `resume_existing_stream` while the stream's sentinel key existed throughout the call, and
  the latest instance elected before the call (none elected during it) was either still
  running at the return (its process alive and open), or had ended `failed`, `cancelled`,
  `never-started` or `died`, or had ended `done` with `resume_at` given and short of its end,
  and: for a durable context, its stored text was never lost (no eviction, expiry or restart
  of the `text` key before the return); else, its process alive and open through the return
  and the return within `linger` of the generator's end.
- `false-done`: `has_existing_stream` said "DONE" while the latest instance ran throughout the
  call, its process alive and open, no `cancel_stream` of that id had started and nobody had
  written LOST into its sentinel.
- `false-incomplete`: `StreamIncompleteError` (not a conflict) although no key of the stream
  was evicted, expired or lost in a restart, no candidate's process died or closed, no
  candidate ended before the claim with `linger` 0 (its text went with its end), and either
  a candidate's producer still had the text at the claim (running, or within its `linger`
  after its end: it could have been asked again), or nothing could have lost a message on the
  way (no fault in the call's window on the reader's or a candidate's process: an outage of
  its connections, a failed, lost or late command, a slow link that could bring an answer
  after the producer let its text go; nor on the server: stall, restart).
- `false-conflict`: `ProducerConflictError` with fewer than two instances (not offline) of the
  stream elected or started before the claim.
- `false-exists`: `StreamExistsError` (a writer's) although no run of the stream was elected
  before the claim and its sentinel was never written.
- `false-restarted`: `StreamRestartedError` although the stream was never started again (a
  finished or cancelled one replaced as its next attempt) before the claim.
- `false-slow`: `SlowReaderError` with no candidate whose text past o exceeds `max_backlog`.
- `false-backend`: `BackendError` with no fault in the call's window on the caller's process
  (an outage of its connections, a failed, lost, refused or late command, a write refused as
  OOM) or on the server, and the process alive and open.
- `false-closed`: any other `ResumableStreamError` (such as "the stream context was closed")
  while the reader's context was open and alive. `ProducerUnavailableError` (no answer in
  time) is always a fair answer, as is "already running" from `create_new_resumable_stream`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._world import KEYS, CallRecord, Instance, ProcState, World

__all__ = ["Violation", "check"]

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    detail: str
    call: int | None = None
    stream: str | None = None

    def line(self) -> str:
        where = f"call {self.call} " if self.call is not None else ""
        return f"{self.kind}: {where}{self.detail}"


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


class _Checker:
    def __init__(self, world: World) -> None:
        self.world = world
        self.plan = world.plan
        self.ledger = world.ledger
        self.violations: list[Violation] = []

    def add(self, kind: str, detail: str, record: CallRecord | None = None) -> None:
        call = record.plan.index if record is not None else None
        stream = record.plan.stream if record is not None else None
        self.violations.append(Violation(kind, detail, call, stream))

    def instances(self, stream: str) -> list[Instance]:
        return [i for i in self.world.instances if i.stream.id == stream]

    def proc(self, name: str) -> ProcState:
        return self.world.procs[name]

    # Facts about the run

    def ended(self, instance: Instance) -> str:
        if instance.ended is not None:
            return instance.ended
        if instance.started_at == math.inf:
            return "never-started"
        return "open"

    def ended_at(self, instance: Instance) -> float:
        if instance.ended is not None:
            return instance.ended_at
        proc = self.proc(instance.proc)
        return min(proc.died_at, proc.closing_at) if instance.started_at == math.inf else math.inf

    def gone(self, proc: str, t: float) -> bool:
        state = self.proc(proc)
        return state.died_at <= t + _EPS or state.closing_at <= t + _EPS

    def cancel_called(self, stream: str, t: float) -> bool:
        return any(
            r.plan.api == "cancel_stream" and r.plan.stream == stream and r.t_call <= t + _EPS
            for r in self.world.records
        )

    def ghost(self, stream: str, t: float) -> bool:
        key = KEYS.sentinel(stream)
        return any(k == key and at <= t + _EPS for at, k in self.ledger.ghosts)

    def keys_lost(self, stream: str, t: float) -> bool:
        for key in (KEYS.sentinel(stream), KEYS.text(stream)):
            timeline = self.ledger.keys.get(key)
            if timeline is not None and timeline.lost_before(t):
                return True
        return False

    def faulted(self, procs: set[str], start: float, end: float) -> bool:
        """A fault on one of `procs` (or the server) in [start, end]."""
        for outage in self.ledger.outages:
            if (outage.proc is None or outage.proc in procs) and (
                outage.start <= end + _EPS and outage.end >= start - _EPS
            ):
                return True
        if any(
            who in procs and s <= end + _EPS and e >= start - _EPS
            for who, s, e, _ in self.ledger.slow_links
        ):
            return True  # what comes late may come after the producer has let its text go
        return any(
            who in procs and start - _EPS <= at <= end + _EPS
            for at, who, _, _ in self.ledger.command_faults
        )

    def long_outage(self, proc: str, start: float, end: float, longer_than: float) -> bool:
        return any(
            o.length > longer_than and o.start <= end + _EPS and o.end >= start - _EPS
            for o in self.ledger.outages_of(proc)
        )

    def slow_link(self, proc: str, start: float, end: float, delay_over: float) -> bool:
        return any(
            p == proc and delay >= delay_over and s <= end + _EPS and e >= start - _EPS
            for p, s, e, delay in self.ledger.slow_links
        )

    def candidates(self, record: CallRecord, text: str) -> list[Instance]:
        reads = record.reads
        pool = [reads] if reads is not None else self.instances(record.plan.stream)
        offset = record.plan.resume_at or 0
        return [i for i in pool if i.text[offset : offset + len(text)] == text]

    # The checks

    def run(self) -> list[Violation]:
        for record in self.world.records:
            if record.outcome == "skipped":
                continue
            self.check_call(record)
            if record.read is not None:
                self.check_read(record)
        for instance in self.world.instances:
            if instance.started_at < math.inf and instance.ended is None:
                self.add("leak", f"{instance.name}'s generator was never ended nor closed")
        for leak in self.world.leaks:
            self.add(leak.what, leak.detail)
        for at, message in self.world.logged_errors:
            self.add("logged-error", f"at {at:.6f}: {message}")
        return self.violations

    def check_call(self, record: CallRecord) -> None:
        call = record.plan
        what = f"{call.api}({call.stream!r}, resume_at={call.resume_at})"
        if record.outcome == "hang":
            self.add("hang", f"{what} did not return within its bound", record)
        elif record.outcome == "untyped":
            self.add("untyped", f"{what} raised {record.error}", record)
        elif record.outcome == "error":
            assert record.error is not None
            self.check_claim(record, record.error, record.message, record.t_return, "", [])
        elif record.outcome == "none":
            self.check_none(record)
        elif record.outcome == "value" and call.api == "has_existing_stream":
            self.check_state(record)

    def check_read(self, record: CallRecord) -> None:
        read = record.read
        assert read is not None
        call = record.plan
        offset = call.resume_at or 0
        text = read.text
        candidates = self.candidates(record, text)
        if not candidates and not text:
            # Nothing read, and no producer ever ran (an election that Redis lost, say).
            if read.end == "stop":
                self.add("false-end", "ended normally, but no producer of it ever ran", record)
            elif read.end == "error":
                assert read.error is not None
                self.check_claim(record, read.error, read.message, read.t_end, text, [])
            elif read.end in ("hang", "untyped"):
                self.add(read.end, f"the read ended: {read.end} {read.error or ''}", record)
            return
        if not candidates:
            texts = {i.name: _short(i.text[offset:]) for i in self.instances(call.stream)}
            self.add(
                "wrong-text",
                f"read {_short(text)} from offset {offset}; the instances have {texts}",
                record,
            )
            return
        fitting = [i for i in candidates if self.chunking(record, i) is None]
        if not fitting:
            problem = self.chunking(record, candidates[0])
            self.add("chunking", f"{problem} (instance {candidates[0].name})", record)
            return
        if read.end == "stop":
            whole = [i for i in fitting if i.text[offset:] == text and self.ended(i) == "done"]
            if not whole:
                states = {i.name: f"{self.ended(i)} with {len(i.text)} characters" for i in fitting}
                self.add(
                    "false-end",
                    f"ended normally with {len(text)} characters from offset {offset}; "
                    f"the instance(s) {states}",
                    record,
                )
        elif read.end == "error":
            assert read.error is not None
            self.check_claim(record, read.error, read.message, read.t_end, text, fitting)
        elif read.end == "hang":
            self.add("hang", f"a read waited more than its bound, after {_short(text)}", record)
        elif read.end == "untyped":
            self.add("untyped", f"a read raised {read.error}", record)

    def chunking(self, record: CallRecord, instance: Instance) -> str | None:
        """What is wrong with the chunk boundaries of what was read, if anything."""
        read = record.read
        assert read is not None
        position = record.plan.resume_at or 0
        ends = {end: i for i, end in enumerate(instance.ends)}
        for text, end, event, retry, is_event in read.pieces:
            position += len(text)
            if not text or position not in ends:
                return f"a chunk {_short(text)} ends at {position}, not on a chunk boundary"
            if end is not None:
                if end != position:
                    return f"a chunk {_short(text)} says it ends at {end}, it ends at {position}"
                chunk = instance.chunks[ends[position]]
                if (chunk[1], chunk[2]) != (event, retry) or is_event != (chunk[1] is not None):
                    return (
                        f"the chunk ending at {position} came as event={event!r} retry={retry!r}"
                        f" ({'an Event' if is_event else 'a str'}); it was yielded as "
                        f"event={chunk[1]!r} retry={chunk[2]!r}"
                    )
        return None

    def check_claim(
        self,
        record: CallRecord,
        error: str,
        message: str,
        at: float,
        text: str,
        candidates: list[Instance],
    ) -> None:
        call = record.plan
        stream = call.stream
        if not text and record.reads is None:
            candidates = [
                i for i in self.instances(stream) if min(i.elected_at, i.started_at) <= at + _EPS
            ]
        proc = self.proc(call.proc)
        options = proc.plan.context
        said = f"{error} ({message[:120]})"
        if error == "StreamFailedError":
            if not any(self.ended(i) == "failed" and i.ended_at <= at + _EPS for i in candidates):
                self.add("false-failed", f"{said}, but no producer of it failed", record)
        elif error == "StreamCancelledError":
            cancelled = any(self.ended(i) in ("cancelled", "never-started") for i in candidates)
            if not cancelled and not self.cancel_called(stream, at):
                self.add("false-cancelled", f"{said}, but nothing cancelled it", record)
        elif error == "ProducerLostError":
            self.check_lost(record, said, at, candidates)
        elif error == "ProducerUnavailableError":
            pass  # no answer in time: always a fair answer
        elif error == "ProducerConflictError":
            online = [i for i in self.instances(stream) if not i.offline]
            if sum(1 for i in online if min(i.elected_at, i.started_at) <= at + _EPS) < 2:
                self.add("false-conflict", f"{said}, but only one producer ever ran", record)
        elif error == "StreamIncompleteError":
            self.check_incomplete(record, said, at, candidates)
        elif error == "StreamExistsError":
            # A writer's: the id was taken already (by any run: a reader's `resumable_stream`
            # elects a producer too), or its sentinel was written (a stop before the start).
            timeline = self.ledger.keys.get(KEYS.sentinel(stream))
            runs = [i for i in self.instances(stream) if min(i.elected_at, i.started_at) <= at]
            if not runs and (timeline is None or not timeline.written_before(at)):
                self.add("false-exists", f"{said}, but nothing ever had that id", record)
        elif error == "StreamRestartedError":
            # A reader whose cursor is into an earlier run of the id, after a later one was
            # started (create_new_resumable_stream replacing a finished stream, a writer's
            # restart): it must be told, never given the new run's text from its offset.
            key_name = KEYS.sentinel(stream)
            if not any(key == key_name and t <= at + _EPS for t, key in self.ledger.restarts):
                self.add("false-restarted", f"{said}, but it was never started again", record)
        elif error == "SlowReaderError":
            offset = call.resume_at or 0
            if not any(len(i.text) - offset > options.max_backlog for i in candidates):
                self.add("false-slow", f"{said}, max_backlog={options.max_backlog}", record)
        elif error == "BackendError":
            if not (self.gone(call.proc, at) or self.faulted({call.proc}, record.t_call, at)):
                self.add("false-backend", f"{said}, but Redis did nothing wrong", record)
        elif error == "ResumableStreamError" and "already running" in message:
            pass
        elif not self.gone(call.proc, at):
            self.add("false-closed", f"{said}, while its context was open", record)

    def check_incomplete(
        self, record: CallRecord, said: str, at: float, candidates: list[Instance]
    ) -> None:
        call = record.plan
        if self.keys_lost(call.stream, at) or any(self.gone(i.proc, at) for i in candidates):
            return  # the stored text, or the producer's memory, is gone
        if any(
            self.proc(i.proc).plan.context.linger == 0 and self.ended_at(i) < at for i in candidates
        ):
            # Without `linger` the text goes with the end: a follower that needs the producer
            # after it (its live subscription took effect only after the end was published,
            # or it was paging through a replay) has nobody left to ask.
            return
        holding = [i for i in candidates if self.holds_text(i, at)]
        if not holding:
            procs = {call.proc, *(i.proc for i in candidates)}
            if self.faulted(procs, record.t_call, at):
                return  # messages lost on the way, and nobody has the text any more
            detail = "no message could have been lost"
        else:
            names = ", ".join(f"{i.name} on {i.proc}" for i in holding)
            detail = f"its producer {names} still had the text (running or lingering)"
        self.add("false-incomplete", f"{said}, but {detail}", record)

    def holds_text(self, instance: Instance, at: float) -> bool:
        """Whether `instance`'s producer still has its text at `at`: running, or lingering."""
        if instance.offline or self.gone(instance.proc, at):
            return False
        if self.ended(instance) in ("open", "never-started"):
            return self.ended(instance) == "open"
        linger = self.proc(instance.proc).plan.context.linger
        return at < instance.ended_at + linger - _EPS

    def check_lost(
        self, record: CallRecord, said: str, at: float, candidates: list[Instance]
    ) -> None:
        call = record.plan
        options = self.proc(call.proc).plan.context
        start = record.t_call - (options.resume_timeout + options.liveness_timeout)
        if self.ghost(call.stream, at):
            return
        excuses = []
        for instance in candidates:
            if instance.offline or self.gone(instance.proc, at):
                return
            # Heartbeats come every third of the timeout: an outage that long less one of
            # them is a silence of the whole timeout to a follower, as a death is.
            if self.long_outage(instance.proc, start, at, options.liveness_timeout * 2 / 3):
                return
            if self.slow_link(instance.proc, start, at, options.liveness_timeout / 2):
                return
            excuses.append(f"{instance.name} on {instance.proc} (alive, {self.ended(instance)})")
        if not candidates:
            return  # nothing ran that it could be about (an election Redis lost, say)
        self.add(
            "false-lost",
            f"{said}, but its producer {', '.join(excuses)} had no outage over "
            f"liveness_timeout={options.liveness_timeout}s since {start:.3f}",
            record,
        )

    def check_none(self, record: CallRecord) -> None:
        call = record.plan
        stream = call.stream
        start, end = record.t_call, record.t_return
        sentinel = self.ledger.keys.get(KEYS.sentinel(stream))
        if sentinel is None or sentinel.absent_during(start, end):
            return
        instances = [i for i in self.instances(stream) if not i.offline]
        before = [i for i in instances if min(i.elected_at, i.started_at) < start]
        if not before or any(start <= min(i.elected_at, i.started_at) <= end for i in instances):
            return
        if len(instances) > 1 and self.keys_lost(stream, end):
            return  # Redis lost the stream's keys and a second producer ran: either may answer
        instance = max(before, key=lambda i: min(i.elected_at, i.started_at))
        state = self.ended(instance)
        ended_at = self.ended_at(instance)
        proc = self.proc(instance.proc)
        options = proc.plan.context
        what = f"None from {call.api}({stream!r}, resume_at={call.resume_at})"
        if ended_at > end:
            if not self.gone(instance.proc, end):
                self.add("false-none", f"{what} while {instance.name} was running", record)
            return
        if state in ("failed", "cancelled", "never-started", "died"):
            self.add("false-none", f"{what}: {instance.name} had ended {state}", record)
            return
        if state != "done" or call.resume_at is None or call.resume_at >= len(instance.text):
            return
        left = f"{len(instance.text) - call.resume_at} characters left"
        if options.durable:
            text = self.ledger.keys.get(KEYS.text(stream))
            if (
                text is not None
                and not text.lost_before(end)
                and not text.absent_during(start, end)
            ):
                self.add(
                    "false-none", f"{what}: {instance.name} ended done, stored, {left}", record
                )
            return
        if not self.gone(instance.proc, end) and end <= ended_at + options.linger + _EPS:
            self.add(
                "false-none",
                f"{what}: {instance.name} ended done at {ended_at:.6f} and was lingering "
                f"(linger={options.linger}s, process {instance.proc} alive), {left}",
                record,
            )

    def check_state(self, record: CallRecord) -> None:
        if record.value != "DONE":
            return
        call = record.plan
        stream = call.stream
        start, end = record.t_call, record.t_return
        before = [i for i in self.instances(stream) if not i.offline and i.started_at < start]
        if not before:
            return
        instance = max(before, key=lambda i: i.started_at)
        if self.ended_at(instance) <= end or self.gone(instance.proc, end):
            return
        if self.cancel_called(stream, end) or (len(before) > 1 and self.keys_lost(stream, end)):
            return
        key = KEYS.sentinel(stream)
        if any(k == key and at <= end for at, k in self.ledger.lost_writes):
            return
        self.add("false-done", f"has_existing_stream said DONE while {instance.name} ran", record)


def check(world: World, loop_errors: list[str]) -> list[Violation]:
    """Every violation of the model in `world`'s run (see the module's docs)."""
    violations = _Checker(world).run()
    for message in loop_errors:
        violations.append(Violation("logged-error", f"the loop reported: {message}"))
    return violations
