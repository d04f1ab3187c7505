"""A run's plan, drawn from its seed before it starts: processes, streams, calls and faults.

Everything a run does is in its plan except what the faults draw while it runs (latencies,
which command fails), which comes from the same seed. Workloads are small on purpose, so that
a seed runs in milliseconds: 2-4 processes, 1-3 streams of up to a dozen chunks, a handful of
readers and calls, a few faults.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._redis import LinkProfile

__all__ = [
    "CallPlan",
    "ContextPlan",
    "FaultPlan",
    "Plan",
    "ProcessPlan",
    "Step",
    "StreamPlan",
    "make_plan",
]

# Text that exercises offsets: astral-plane characters (one Python character, two UTF-16 code
# units, four UTF-8 bytes), combining marks that may start a chunk, zero-width joiners,
# JSON's special characters, line breaks.
_ALPHABET = (
    "abcdefghij klmnop"
    "é\u0301\u0308\u200d€中文字"
    "\U0001f600\U0001f44d\U0001f3fd\U0001d11e\U00010348"
    '"\\/\n\t<>&'
)
# The last character of every chunk names the instance (the producer run) that made it, so a
# text mixed from two producers of one id can never pass for one producer's.
MARKERS = "ABCDEFGH\U0001d538\U0001d539\U0001d53b\U0001d53c"
_EVENT_NAMES = ("delta", "token", "tool-call", "message")


@dataclass(frozen=True, slots=True)
class ContextPlan:
    ttl: int
    resume_timeout: float
    max_message_size: int
    drain_timeout: float
    linger: float
    liveness_timeout: float
    lost_ttl: int
    max_backlog: int
    durable: bool
    flush_interval: float

    def options(self) -> dict[str, Any]:
        return {
            "ttl": self.ttl,
            "resume_timeout": self.resume_timeout,
            "max_message_size": self.max_message_size,
            "drain_timeout": self.drain_timeout,
            "linger": self.linger,
            "liveness_timeout": self.liveness_timeout,
            "lost_ttl": self.lost_ttl,
            "max_backlog": self.max_backlog,
            "durable": self.durable,
            "flush_interval": self.flush_interval,
        }


@dataclass(frozen=True, slots=True)
class ProcessPlan:
    name: str
    context: ContextPlan
    link: LinkProfile


@dataclass(frozen=True, slots=True)
class Step:
    """One chunk of a stream: wait `delay`, then yield `text` + the instance's marker (an
    empty `text` is yielded as an empty chunk), as an `Event` if `event` is set."""

    delay: float
    text: str
    event: str | None = None
    retry: int | None = None


@dataclass(frozen=True, slots=True)
class StreamPlan:
    id: str
    steps: tuple[Step, ...]
    fails: bool  # the generator raises after its steps

    def chunk_ends(self) -> list[int]:
        """The end offset of each non-empty chunk (every instance's chunks have these)."""
        ends, length = [], 0
        for step in self.steps:
            if step.text:
                length += len(step.text) + 1
                ends.append(length)
        return ends

    @property
    def length(self) -> int:
        ends = self.chunk_ends()
        return ends[-1] if ends else 0

    @property
    def duration(self) -> float:
        return sum(step.delay for step in self.steps)


@dataclass(frozen=True, slots=True)
class CallPlan:
    """A call of the public API at `at`, by `proc`, and for one that returns a stream, how
    its reader reads it."""

    index: int
    proc: str
    stream: str
    at: float
    api: str  # resumable_stream | create_new_resumable_stream | resume_existing_stream |
    #           has_existing_stream | cancel_stream | writer | writer-restart (a retried job)
    resume_at: int | None = None
    mode: str = "iter"  # iter (async for) | batch (next_batch) | ready (next_batch + take_ready)
    limit: int | None = None  # next_batch's limit
    stop_after: int | None = None  # reads, then aclose()
    cancel_after: float | None = None  # seconds, then the reading task is cancelled
    pause: float = 0.0  # between reads: a slow reader
    wait: float | None = None  # resume_existing_stream's `wait`: for a stream not started yet


@dataclass(frozen=True, slots=True)
class FaultPlan:
    at: float
    kind: str  # sub-drop | cmd-drop | net-drop | stall | restart | evict | oom | slow-link |
    #            death | close
    proc: str | None = None
    duration: float = 0.0  # gap, stall, downtime, slow or full period
    delay: float = 0.0  # a slow link's added delay
    stream: str | None = None  # evict: the stream whose key goes
    key: str = "sentinel"  # evict: "sentinel" or "text"


@dataclass(frozen=True, slots=True)
class Plan:
    seed: int
    profile: str  # calm | light | heavy
    processes: tuple[ProcessPlan, ...]
    streams: tuple[StreamPlan, ...]
    calls: tuple[CallPlan, ...]
    faults: tuple[FaultPlan, ...]
    settle: bool  # wait, once every call is over, until nothing lingers; then check leaks

    def stream(self, stream_id: str) -> StreamPlan:
        return next(s for s in self.streams if s.id == stream_id)

    def process(self, name: str) -> ProcessPlan:
        return next(p for p in self.processes if p.name == name)


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    return rng.choices(list(weights), list(weights.values()))[0]


def _text(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.05:
        return ""
    n = (
        rng.randint(1, 6)
        if roll < 0.75
        else rng.randint(7, 20)
        if roll < 0.93
        else rng.randint(21, 70)
    )
    return "".join(rng.choice(_ALPHABET) for _ in range(n))


def _context(
    rng: random.Random,
    durable: bool,
    small_messages: bool,
    ttl: int,
    linger: float,
    liveness_timeout: float,
) -> ContextPlan:
    return ContextPlan(
        ttl=ttl,
        resume_timeout=round(rng.uniform(0.3, 3.0), 3),
        max_message_size=rng.randint(3, 40) if small_messages else 1 << 20,
        drain_timeout=round(rng.choice((0.0, rng.uniform(0.0, 5.0))), 3),
        linger=linger,
        liveness_timeout=liveness_timeout,
        lost_ttl=rng.randint(3, 60),
        max_backlog=rng.randint(8, 200) if rng.random() < 0.05 else 64 << 20,
        durable=durable,
        flush_interval=round(rng.choice((0.0, rng.uniform(0.0, 0.2))), 3),
    )


def _link(rng: random.Random, profile: str) -> LinkProfile:
    latency = rng.uniform(0.0001, 0.003)
    heavy = profile == "heavy"
    return LinkProfile(
        latency=latency,
        jitter=rng.uniform(0.0, 0.004),
        spike_p=0.0 if profile == "calm" else rng.choice((0.0, 0.01, 0.05)),
        spike=rng.uniform(0.05, 1.5),
        fail_p=rng.choice((0.0, 0.005, 0.02)) if heavy else 0.0,
        lost_p=rng.choice((0.0, 0.005, 0.02)) if heavy else 0.0,
        command_timeout=round(rng.uniform(0.5, 5.0), 3),
    )


def _stream(rng: random.Random, stream_id: str) -> StreamPlan:
    steps = []
    n = rng.choice((0, *range(1, 11), *range(1, 6)))
    for _ in range(n):
        roll = rng.random()
        delay = (
            0.0
            if roll < 0.3
            else rng.uniform(0.0, 0.05)
            if roll < 0.6
            else rng.uniform(0.05, 0.5)
            if roll < 0.92
            else rng.uniform(0.5, 3.0)
        )
        text = _text(rng)
        if text and rng.random() < 0.15:
            retry = rng.choice((None, rng.randint(0, 5000)))
            steps.append(Step(delay, text, rng.choice(_EVENT_NAMES), retry))
        else:
            steps.append(Step(delay, text))
    if steps and rng.random() < 0.12:
        # A long pause: the stream runs while readers come and go, and may be cancelled.
        i = rng.randrange(len(steps))
        steps[i] = Step(rng.uniform(8.0, 30.0), steps[i].text, steps[i].event, steps[i].retry)
    return StreamPlan(stream_id, tuple(steps), fails=rng.random() < 0.15)


def _resume_at(rng: random.Random, stream: StreamPlan) -> int | None:
    length = stream.length
    roll = rng.random()
    if roll < 0.25:
        return None
    if roll < 0.45 or length == 0:
        return 0
    if roll < 0.75:
        return rng.randint(1, length)  # mid-chunk, often
    if roll < 0.85:
        return rng.choice(stream.chunk_ends())
    if roll < 0.95:
        return length
    return length + rng.randint(1, 5)


def _reader(rng: random.Random, call: Mapping[str, Any]) -> CallPlan:
    roll = rng.random()
    mode = "iter" if roll < 0.4 else "batch" if roll < 0.75 else "ready"
    return CallPlan(
        **call,
        mode=mode,
        limit=rng.choice((None, None, 1, 2)) if mode != "iter" else None,
        stop_after=rng.randint(1, 3) if rng.random() < 0.1 else None,
        cancel_after=round(rng.uniform(0.0, 2.0), 3) if rng.random() < 0.1 else None,
        pause=round(rng.uniform(0.01, 0.5), 3) if rng.random() < 0.1 else 0.0,
    )


def _faults(
    rng: random.Random,
    profile: str,
    names: list[str],
    lives: list[tuple[StreamPlan, float, float]],
    end: float,
) -> list[FaultPlan]:
    """Faults at random times; an eviction hits a stream while it runs or lingers."""
    if profile == "calm":
        return []
    count = rng.randint(1, 2) if profile == "light" else rng.randint(2, 5)
    weights = {
        "sub-drop": 20,
        "net-drop": 10,
        "cmd-drop": 8,
        "stall": 10,
        "restart": 6,
        "evict": 12,
        "oom": 5,
        "slow-link": 12,
        "death": 7,
        "close": 3,
    }
    faults = []
    for _ in range(count):
        kind = _pick(rng, weights)
        at = round(rng.uniform(0.0, end), 4)
        proc = rng.choice(names)
        if kind in ("sub-drop", "net-drop", "cmd-drop"):
            faults.append(FaultPlan(at, kind, proc, duration=rng.uniform(0.01, 4.0)))
        elif kind == "stall":
            faults.append(FaultPlan(at, kind, duration=rng.uniform(0.05, 8.0)))
        elif kind == "restart":
            faults.append(FaultPlan(at, kind, duration=rng.uniform(0.02, 3.0)))
        elif kind == "evict":
            stream, start, stop = rng.choice(lives)
            at = round(rng.uniform(start, stop + 1.0), 4)
            key = "sentinel" if rng.random() < 0.65 else "text"
            faults.append(FaultPlan(at, kind, stream=stream.id, key=key))
        elif kind == "oom":
            faults.append(FaultPlan(at, kind, duration=rng.uniform(0.1, 5.0)))
        elif kind == "slow-link":
            delay = rng.uniform(0.1, 2.0)
            faults.append(FaultPlan(at, kind, proc, duration=rng.uniform(1.0, 10.0), delay=delay))
        else:  # death, close
            faults.append(FaultPlan(at, kind, proc))
    faults.sort(key=lambda f: f.at)
    return faults


def _aimed(rng: random.Random, calls: list[CallPlan]) -> list[FaultPlan]:
    """Faults aimed at a resume as it happens: the caller's link or the producer's drops or
    slows down just as the request and its answer are on their way (random times would hit
    that moment rarely)."""
    first: dict[str, str] = {}
    for call in sorted(calls, key=lambda c: c.at):
        first.setdefault(call.stream, call.proc)
    faults = []
    for call in calls:
        if call.api not in ("resumable_stream", "resume_existing_stream") or rng.random() > 0.2:
            continue
        proc = call.proc if rng.random() < 0.5 else first[call.stream]
        # A resume takes a few round trips of milliseconds: half of these land inside them.
        offset = rng.uniform(0.0, 0.02) if rng.random() < 0.5 else rng.uniform(-0.01, 0.2)
        at = round(max(0.0, call.at + offset), 4)
        kind = _pick(rng, {"sub-drop": 4, "net-drop": 2, "cmd-drop": 1, "slow-link": 3})
        if kind == "slow-link":
            delay = rng.uniform(0.1, 1.5)
            faults.append(FaultPlan(at, kind, proc, duration=rng.uniform(0.5, 5.0), delay=delay))
        else:
            faults.append(FaultPlan(at, kind, proc, duration=rng.uniform(0.01, 3.0)))
    return faults


def plan_of(streams: list[StreamPlan], stream_id: str) -> StreamPlan:
    return next(stream for stream in streams if stream.id == stream_id)


def make_plan(seed: int) -> Plan:
    rng = random.Random(seed)
    roll = rng.random()
    profile = "calm" if roll < 0.15 else "light" if roll < 0.5 else "heavy"
    durable = rng.random() < 0.35
    small_messages = rng.random() < 0.3
    names = [f"P{i}" for i in range(rng.randint(2, 4))]
    # What a key prefix's streams keep, how long they linger and how soon a producer that is
    # not heard from counts as dead are the deployment's, the same on every context of it: a
    # reader tells a lingering producer by them, and trusts another's verdict of a death.
    ttl = rng.choice((rng.randint(20, 120), 3600, 3600))
    linger = round(rng.choice((0.0, rng.uniform(0.2, 3.0), rng.uniform(3.0, 12.0))), 3)
    liveness = round(rng.uniform(0.3, 3.0), 3)
    processes = tuple(
        ProcessPlan(
            name,
            _context(rng, durable, small_messages, ttl, linger, liveness),
            _link(rng, profile),
        )
        for name in names
    )
    streams = [_stream(rng, f"s{i}") for i in range(rng.choice((1, 1, 2, 2, 3)))]
    calls: list[CallPlan] = []
    lives: list[tuple[StreamPlan, float, float]] = []
    horizon = 0.0
    linger = max(p.context.linger for p in processes)
    for stream in streams:
        start = round(rng.uniform(0.0, 3.0), 4)
        end = start + stream.duration
        horizon = max(horizon, end)
        lives.append((stream, start, end))
        producer = rng.choice(names)
        base = {"index": 0, "proc": producer, "stream": stream.id, "at": start}
        roll = rng.random()
        if roll < 0.3:
            # A background job's writer; a failed, stopped or dead one may be retried.
            calls.append(CallPlan(0, producer, stream.id, start, "writer"))
            if rng.random() < 0.5:
                at = round(end + rng.uniform(0.0, 4.0), 4)
                calls.append(CallPlan(0, rng.choice(names), stream.id, at, "writer-restart"))
                horizon = max(horizon, at + stream.duration)
        else:
            api = "create_new_resumable_stream" if roll < 0.5 else "resumable_stream"
            resume_at = _resume_at(rng, stream)
            calls.append(_reader(rng, {**base, "api": api, "resume_at": resume_at}))
        if rng.random() < 0.3:
            # A reader that comes before the stream starts (a job still queued), and waits.
            at = max(0.0, start - rng.uniform(0.0, 2.0))
            wait = round(start - at + rng.uniform(-0.5, 2.0), 3)
            call = {"index": 0, "proc": rng.choice(names), "stream": stream.id}
            call.update(at=round(at, 4), api="resume_existing_stream", resume_at=None)
            calls.append(_reader(rng, {**call, "wait": max(0.0, wait)}))
        if rng.random() < 0.2:
            # An election race: others ask for the same stream at about the same time.
            for _ in range(rng.randint(1, 2)):
                at = round(max(0.0, start + rng.uniform(-0.02, 0.05)), 4)
                call = {**base, "proc": rng.choice(names), "at": at, "api": "resumable_stream"}
                calls.append(_reader(rng, {**call, "resume_at": _resume_at(rng, stream)}))
        for _ in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.55:
                at = rng.uniform(start - 0.2, end + 0.2)  # while it runs
            elif roll < 0.85:
                at = rng.uniform(end, end + linger + 0.5)  # while its producer lingers
            else:
                at = rng.uniform(end + linger, end + linger + 15.0)  # late
            api = "resumable_stream" if rng.random() < 0.4 else "resume_existing_stream"
            call = {"index": 0, "proc": rng.choice(names), "stream": stream.id}
            call.update(at=round(max(0.0, at), 4), api=api, resume_at=_resume_at(rng, stream))
            calls.append(_reader(rng, call))
        long_pause = any(step.delay >= 8.0 for step in stream.steps)
        if long_pause or rng.random() < 0.1:
            at = round(rng.uniform(start, end + 1.0), 4)
            calls.append(CallPlan(0, rng.choice(names), stream.id, at, "cancel_stream"))
        if rng.random() < 0.3:
            at = round(rng.uniform(max(0.0, start - 0.5), end + linger + 2.0), 4)
            calls.append(CallPlan(0, rng.choice(names), stream.id, at, "has_existing_stream"))
    faults = _faults(rng, profile, names, lives, horizon + 3.0)
    for fault in faults:
        if fault.kind == "evict" and fault.key == "sentinel" and fault.stream is not None:
            # Somebody asks for the stream after Redis lost its election key: a second
            # producer, which followers must not take for the first.
            stream = plan_of(streams, fault.stream)
            at = round(fault.at + rng.uniform(0.0, 0.5), 4)
            call = {"index": 0, "proc": rng.choice(names), "stream": stream.id, "at": at}
            calls.append(_reader(rng, {**call, "api": "resumable_stream", "resume_at": 0}))
    if profile != "calm":
        faults.extend(_aimed(rng, calls))
        faults.sort(key=lambda f: f.at)
    calls.sort(key=lambda call: call.at)
    calls = [
        CallPlan(
            i,
            c.proc,
            c.stream,
            c.at,
            c.api,
            c.resume_at,
            c.mode,
            c.limit,
            c.stop_after,
            c.cancel_after,
            c.pause,
            c.wait,
        )
        for i, c in enumerate(calls)
    ]
    return Plan(
        seed=seed,
        profile=profile,
        processes=processes,
        streams=tuple(streams),
        calls=tuple(calls),
        faults=tuple(faults),
        settle=rng.random() < 0.5,
    )
