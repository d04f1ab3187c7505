"""A campaign's plan, drawn from its seed before anything starts: the processes, the streams,
who reads them when and how, the cancels, and the fault schedule.

The same seed, topology, duration and process count give the same plan (and so the same
schedule of faults, aimed at the same planned moments). What the processes then make of it on
a real Redis (which request reaches a subscriber first, where a SIGKILL lands in a stream) is
not reproducible: real processes on real sockets.

Times are seconds from the run's start (`t0`, shared by every process as wall-clock time).
"""

from __future__ import annotations

import dataclasses
import json
import random
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "ALPHABET",
    "EVENT_NAMES",
    "TOPOLOGIES",
    "CancelSpec",
    "Chunk",
    "FaultSpec",
    "Plan",
    "ReadSpec",
    "SessionSpec",
    "Settings",
    "StreamSpec",
    "dump",
    "load",
    "make_plan",
    "marker",
]

TOPOLOGIES = ("server", "sentinel", "cluster")

# Text that exercises offsets: astral-plane characters (one Python character, two UTF-16 code
# units, four UTF-8 bytes), combining marks that may start a chunk, zero-width joiners, JSON's
# and HTML's special characters, line feeds (SSE splits them into `data:` lines). No CR: the
# SSE format turns it into LF. No lone surrogate: UTF-8 cannot carry it.
ALPHABET = (
    "abcdefghij klmnop"
    "é\u0301\u0308\u200d€中文字"
    "\U0001f600\U0001f44d\U0001f3fd\U0001d11e\U00010348"
    '"\\/\n\t<>&:'
)
# Event names; never "message" (a plain chunk's), "error" or "restart" (the SSE layer's own).
EVENT_NAMES = ("delta", "token", "tool-call")
# Every chunk ends with its instance's marker (its process, then a character for its number in
# that process): two producers of one id never make the same text, so a reader's text mixed
# from both matches neither.
_PROCESS_MARKS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
_INSTANCE_MARKS = 20000  # CJK ideographs from U+4E00
MARK_LENGTH = 2


def marker(process_index: int, incarnation: int, number: int) -> str:
    """The two characters that end every chunk of one producer instance (the `number`th of
    its process's `incarnation`)."""
    instance = (incarnation * 4999 + number) % _INSTANCE_MARKS
    return _PROCESS_MARKS[process_index % len(_PROCESS_MARKS)] + chr(0x4E00 + instance)


@dataclass(frozen=True, slots=True)
class Settings:
    """The deployment's options, the same in every process (a reader trusts another's verdict
    of a death, and tells a lingering producer, by them)."""

    linger: float
    liveness_timeout: float
    resume_timeout: float
    lost_ttl: int
    command_timeout: float
    flush_interval: float
    drain_timeout: float

    def options(self, durable: bool) -> dict[str, Any]:
        return {
            "linger": self.linger,
            "liveness_timeout": self.liveness_timeout,
            "resume_timeout": self.resume_timeout,
            "lost_ttl": self.lost_ttl,
            "flush_interval": self.flush_interval,
            "drain_timeout": self.drain_timeout,
            "durable": durable,
        }


@dataclass(frozen=True, slots=True)
class Chunk:
    """Wait `delay`, then yield `text` + the instance's marker (an empty `text` is yielded as
    it is), as an `rs.Event` named `event` if set."""

    delay: float
    text: str
    event: str | None = None


@dataclass(frozen=True, slots=True)
class StreamSpec:
    id: str
    deployment: str  # "mem" (text in the producer only) | "dur" (durable)
    kind: str  # "generator" (ctx.resumable_stream) | "writer" (ctx.writer) | "sse" (a server)
    producer: str  # the process that starts it ("sse": whichever server the session reaches)
    start: float
    chunks: tuple[Chunk, ...]
    fails: bool  # the generator raises (a writer calls `fail`) after its chunks
    retry: bool  # a writer whose process died is restarted by its next incarnation

    @property
    def length(self) -> int:
        """The planned text's length (what any instance of it has once it is done)."""
        return sum(len(c.text) + MARK_LENGTH for c in self.chunks if c.text)

    @property
    def duration(self) -> float:
        return sum(c.delay for c in self.chunks)

    def ends(self) -> list[int]:
        ends, length = [], 0
        for chunk in self.chunks:
            if chunk.text:
                length += len(chunk.text) + MARK_LENGTH
                ends.append(length)
        return ends


@dataclass(frozen=True, slots=True)
class ReadSpec:
    """A reader in a worker: `api` is "resume" (`resume_existing_stream`), "wait" (the same
    with `wait=`, for a stream that has not started yet) or "resumable" (`resumable_stream`,
    which produces the stream if nobody does). `mode` is "iter" (`async for`) or "batch"
    (`next_batch`, which gives each chunk's end offset and `Event`); `stop_after` chunks, the
    reader is closed early."""

    id: str
    stream: str
    proc: str
    at: float
    api: str
    offset: int | None
    mode: str
    stop_after: int | None


@dataclass(frozen=True, slots=True)
class CancelSpec:
    stream: str
    proc: str
    at: float


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """An SSE client session: `creates` asks `/s/` (which produces the stream if it is new)
    without a cursor, else `/f/` (follow only) from `offset` (None: no cursor). Each
    connection is cut after `cut_events[i]` events or `cut_seconds[i]` seconds, whichever
    comes first (the last one reads to the end), then resumed with `Last-Event-ID` on the
    next server, after `pause` seconds."""

    id: str
    stream: str
    at: float
    creates: bool
    offset: int | None
    first_server: int
    cut_events: tuple[int, ...]
    cut_seconds: tuple[float, ...]
    pause: float


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One fault of the schedule. `lane` "redis" faults act on the servers, "process" faults
    on a process or its link; each lane runs its faults one at a time, so a fault may start
    later than `at`. `target` names a process ("W0", "S1") for process faults; `pick` chooses
    among what exists when it starts (a node, a slot, a connection)."""

    at: float
    lane: str
    kind: str
    hold: float  # how long it lasts (a stall, a full memory, a slow link, a node down)
    target: str = ""
    value: float = 0.0  # a slow link's added delay (s)
    flag: bool = False  # kill: restart with persistence; stall: long enough to fail over
    pick: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    seed: int
    topology: str
    duration: float
    settings: Settings
    workers: tuple[str, ...]  # engine processes: "W0".."Wk"
    loops: tuple[str, ...]  # each worker's event loop ("asyncio" | "uvloop")
    servers: tuple[str, ...]  # uvicorn servers: "S0" (asyncio), "S1" (uvloop)
    proxied: tuple[str, ...]  # processes whose Redis traffic goes through a proxy
    streams: tuple[StreamSpec, ...]
    reads: tuple[ReadSpec, ...]
    cancels: tuple[CancelSpec, ...]
    sessions: tuple[SessionSpec, ...]
    faults: tuple[FaultSpec, ...]

    @property
    def prefix(self) -> str:
        return f"campaign{self.seed}"

    def key_prefix(self, deployment: str) -> str:
        return f"{self.prefix}-{deployment}"

    def by_id(self) -> dict[str, StreamSpec]:
        return {s.id: s for s in self.streams}

    def process_index(self, name: str) -> int:
        return [*self.workers, *self.servers, "C0"].index(name)


# Drawing the plan


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    return rng.choices(list(weights), list(weights.values()))[0]


def _text(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.06:
        return ""
    n = rng.randint(1, 6) if roll < 0.75 else rng.randint(7, 24) if roll < 0.97 else 300
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def _chunks(rng: random.Random) -> tuple[Chunk, ...]:
    pace = rng.choice((0.0, 0.01, 0.05, 0.1, 0.2, 0.3))
    n = rng.choice((1, 2, 3, 5, 8, 12, 20, 30, 50))
    events = rng.random() < 0.3
    chunks = []
    for _ in range(n):
        roll = rng.random()
        delay = (
            0.0
            if roll < 0.2
            else rng.uniform(0.0, 2 * pace)
            if roll < 0.95
            else rng.uniform(0.5, 3.0)
        )
        text = _text(rng)
        event = rng.choice(EVENT_NAMES) if events and text and rng.random() < 0.5 else None
        chunks.append(Chunk(round(delay, 3), text, event))
    # Keep a stream within 25 s: long enough to span a fault, short enough to end in the run.
    total = sum(c.delay for c in chunks)
    if total > 25.0:
        chunks = [Chunk(round(c.delay * 25.0 / total, 3), c.text, c.event) for c in chunks]
    return tuple(chunks)


def _offset(rng: random.Random, stream: StreamSpec) -> int | None:
    length = stream.length
    roll = rng.random()
    if roll < 0.2:
        return None
    if roll < 0.4 or length == 0:
        return 0
    if roll < 0.7:
        return rng.randint(1, length)  # mid-chunk, often
    if roll < 0.85:
        return rng.choice(stream.ends())
    return length


def _settings(rng: random.Random) -> Settings:
    return Settings(
        linger=rng.choice((5.0, 10.0, 20.0)),
        liveness_timeout=rng.choice((2.0, 3.0)),
        resume_timeout=rng.choice((1.5, 2.0, 3.0)),
        lost_ttl=rng.choice((15, 30)),
        command_timeout=rng.choice((2.0, 5.0)),
        flush_interval=rng.choice((0.0, 0.02, 0.2)),
        drain_timeout=10.0,
    )


_REDIS_FAULTS: dict[str, dict[str, float]] = {
    "server": {"kill": 4, "stall": 4, "oom": 3, "evict": 1},
    "sentinel": {
        "kill-master": 2,
        "kill-replica": 1,
        "failover": 3,
        "stall": 2,
        "oom": 2,
        "evict": 1,
    },
    "cluster": {
        "failover": 4,
        "kill-master": 2,
        "kill-replica": 1,
        "migrate": 4,
        "stall": 2,
        "oom": 2,
        "evict": 1,
    },
}
_PROCESS_FAULTS = {
    "kill-proc": 3,
    "client-kill": 4,
    "proxy-cut": 3,
    "proxy-stall": 2,
    "proxy-delay": 3,
}


def _redis_fault(rng: random.Random, topology: str, at: float) -> FaultSpec:
    kind = _pick(rng, _REDIS_FAULTS[topology])
    pick = rng.randrange(1 << 30)
    if kind == "kill":
        return FaultSpec(
            at, "redis", kind, round(rng.uniform(0.1, 3.0), 3), flag=rng.random() < 0.6
        )
    if kind == "stall":
        # On a cluster or Sentinel, a long stall (over the failure detection) fails it over.
        long = topology != "server" and rng.random() < 0.3
        hold = (
            rng.uniform(1.5, 4.0)
            if long
            else rng.uniform(0.2, 0.8 if topology != "server" else 5.0)
        )
        return FaultSpec(at, "redis", kind, round(hold, 3), flag=long, pick=pick)
    if kind == "oom":
        return FaultSpec(at, "redis", kind, round(rng.uniform(0.5, 5.0), 3), pick=pick)
    if kind == "evict":
        return FaultSpec(at, "redis", kind, round(rng.uniform(0.2, 1.5), 3), pick=pick)
    if kind in ("kill-master", "kill-replica"):
        return FaultSpec(at, "redis", kind, round(rng.uniform(0.2, 3.0), 3), pick=pick)
    if kind == "failover":
        # Sentinel: end the two-masters window at once (as Sentinel does ~10 s later), or not.
        return FaultSpec(at, "redis", kind, 0.0, flag=rng.random() < 0.5, pick=pick)
    return FaultSpec(at, "redis", kind, 0.0, pick=pick)  # migrate


def _process_fault(rng: random.Random, plan_procs: list[str], at: float) -> FaultSpec:
    kind = _pick(rng, _PROCESS_FAULTS)
    target = rng.choice(plan_procs)
    if kind == "kill-proc":
        return FaultSpec(at, "process", kind, round(rng.uniform(0.2, 3.0), 3), target)
    if kind == "client-kill":
        return FaultSpec(at, "process", kind, 0.0, target, pick=rng.randrange(1 << 30))
    if kind == "proxy-stall":
        return FaultSpec(at, "process", kind, round(rng.uniform(0.2, 4.0), 3), target)
    if kind == "proxy-delay":
        delay = round(rng.choice((rng.uniform(0.02, 0.3), rng.uniform(0.3, 1.5))), 3)
        return FaultSpec(at, "process", kind, round(rng.uniform(1.0, 8.0), 3), target, delay)
    return FaultSpec(at, "process", kind, 0.0, target)  # proxy-cut


def make_plan(seed: int, topology: str, duration: float, processes: int = 4) -> Plan:
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    if processes < 2:
        raise ValueError("a campaign needs at least 2 worker processes")
    rng = random.Random(f"{seed}:{topology}:{duration}:{processes}")
    settings = _settings(rng)
    workers = tuple(f"W{i}" for i in range(processes))
    loops = tuple(rng.choice(("asyncio", "uvloop")) for _ in workers)
    servers = ("S0", "S1")
    # About half the workers, and the uvloop server, reach Redis through a proxy.
    proxied_workers = [w for w in workers if rng.random() < 0.5] or [rng.choice(workers)]
    proxied = (*proxied_workers, "S1")

    streams: list[StreamSpec] = []
    reads: list[ReadSpec] = []
    cancels: list[CancelSpec] = []
    sessions: list[SessionSpec] = []
    # Streams start at about 0.25 per second per worker over the run, each lasting at most
    # 25 s and ending before the run does (late readers come up to the run's end).
    usable = max(duration - 3.0, 1.0)
    count = max(3, round(usable * 0.25 * processes))
    for index in range(count):
        chunks = _chunks(rng)
        length = sum(c.delay for c in chunks)
        start = round(rng.uniform(0.5, max(0.6, usable - length)), 3)
        roll = rng.random()
        kind = "generator" if roll < 0.5 else "writer" if roll < 0.75 else "sse"
        producer = rng.choice(servers) if kind == "sse" else rng.choice(workers)
        stream = StreamSpec(
            id=f"s{index:05d}",
            deployment="dur" if rng.random() < 0.4 else "mem",
            kind=kind,
            producer=producer,
            start=start,
            chunks=chunks,
            fails=rng.random() < 0.1,
            retry=kind == "writer" and rng.random() < 0.6,
        )
        streams.append(stream)
        end = start + stream.duration
        settle = settings.linger
        for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4))):
            roll = rng.random()
            api = "resume"
            if roll < 0.1:
                at = rng.uniform(start - 2.0, start)  # before it starts
                api = rng.choice(("wait", "resumable"))
            elif roll < 0.65:
                at = rng.uniform(start, end + 0.2)  # while it runs
            elif roll < 0.9:
                at = rng.uniform(end, end + settle + 1.0)  # while its producer lingers
            else:
                at = rng.uniform(end + settle, end + settle + 10.0)  # late
            if api == "resume" and rng.random() < 0.25:
                api = "resumable"
            at = min(max(0.2, at), duration)
            proc = (
                stream.producer
                if stream.producer in workers and rng.random() < 0.15
                else rng.choice(workers)
            )
            reads.append(
                ReadSpec(
                    id=f"r{len(reads):05d}",
                    stream=stream.id,
                    proc=proc,
                    at=round(at, 3),
                    api=api,
                    offset=_offset(rng, stream),
                    mode=rng.choice(("iter", "batch", "batch")),
                    stop_after=rng.randint(1, 4) if rng.random() < 0.08 else None,
                )
            )
        if rng.random() < 0.08 and stream.duration > 0.5:
            at = round(start + rng.uniform(0.1, 0.9) * stream.duration, 3)
            cancels.append(CancelSpec(stream.id, rng.choice(workers), at))
        # SSE sessions: the creator of an "sse" stream (and a second viewer, sometimes);
        # followers of a worker's stream from an offset.
        viewers: list[tuple[float, bool, int | None]] = []
        if kind == "sse":
            viewers.append((start, True, None))
            if rng.random() < 0.3:
                viewers.append((rng.uniform(start, end + 1.0), True, None))
        elif rng.random() < 0.35:
            for _ in range(rng.randint(1, 2)):
                at = rng.uniform(start, end + settle)
                viewers.append((at, False, _offset(rng, stream)))
        for at, creates, offset in viewers:
            cuts = rng.choice((0, 1, 1, 2, 3))
            sessions.append(
                SessionSpec(
                    id=f"e{len(sessions):05d}",
                    stream=stream.id,
                    at=round(min(at, duration), 3),
                    creates=creates,
                    offset=offset,
                    first_server=rng.randrange(len(servers)),
                    cut_events=tuple(rng.randint(1, 12) for _ in range(cuts)),
                    cut_seconds=tuple(round(rng.uniform(0.1, 4.0), 3) for _ in range(cuts)),
                    pause=round(rng.choice((0.0, rng.uniform(0.0, 0.5))), 3),
                )
            )

    faults: list[FaultSpec] = []
    # Storms of faults and calm spells in turn: in a calm spell nothing excuses a claim, so
    # what readers are told then is judged strictly.
    targets = [*workers, *[w for w in workers if w in proxied], "S0", "S1"]
    at = rng.uniform(0.5, 3.0)
    while at < duration - 2.0:
        storm_end = min(at + rng.uniform(10.0, 30.0), duration - 2.0)
        redis_at, process_at = at + rng.uniform(0.0, 2.0), at
        while redis_at < storm_end:
            faults.append(_redis_fault(rng, topology, round(redis_at, 3)))
            redis_at += rng.uniform(3.0, 8.0)
        while process_at < storm_end:
            faults.append(_process_fault(rng, targets, round(process_at, 3)))
            process_at += rng.uniform(1.5, 5.0)
        at = max(redis_at, process_at) + rng.uniform(6.0, 20.0)
    # Aimed faults: a process's subscriber connection killed, or its link cut or slowed, just
    # as one of its reads resumes (a random time would hit that moment rarely).
    for read in reads:
        if rng.random() < 0.06:
            stream = next(s for s in streams if s.id == read.stream)
            proc = (
                read.proc
                if rng.random() < 0.5 or stream.producer not in workers
                else stream.producer
            )
            kind = _pick(rng, {"client-kill": 3, "proxy-cut": 1, "proxy-delay": 2})
            when = round(max(0.1, read.at + rng.uniform(-0.05, 0.1)), 3)
            if when >= duration - 1.0:
                continue
            if kind == "proxy-delay":
                delay = round(rng.uniform(0.3, 1.5), 3)
                hold = round(rng.uniform(1.0, 4.0), 3)
                faults.append(FaultSpec(when, "aimed", kind, hold, proc, delay))
            else:
                faults.append(
                    FaultSpec(when, "aimed", kind, 0.0, proc, pick=rng.randrange(1 << 30))
                )
    faults.sort(key=lambda f: (f.at, f.lane))
    return Plan(
        seed=seed,
        topology=topology,
        duration=duration,
        settings=settings,
        workers=workers,
        loops=loops,
        servers=servers,
        proxied=proxied,
        streams=tuple(streams),
        reads=tuple(sorted(reads, key=lambda r: r.at)),
        cancels=tuple(sorted(cancels, key=lambda c: c.at)),
        sessions=tuple(sorted(sessions, key=lambda s: s.at)),
        faults=tuple(faults),
    )


# JSON

T = TypeVar("T")


def dump(plan: Plan) -> str:
    return json.dumps(dataclasses.asdict(plan), ensure_ascii=False)


def load(text: str) -> Plan:
    plan: Plan = _build(Plan, json.loads(text))
    return plan


def _build(kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        hints = typing.get_type_hints(kind)
        return kind(
            **{f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(kind)}
        )
    if origin is tuple:
        (item, _) = typing.get_args(kind)
        return tuple(_build(item, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(kind) if a is not type(None)]
        return _build(inner, value)
    if kind is float:
        return float(value)
    return value
