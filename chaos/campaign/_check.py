"""The model check of a campaign run: every reader against the producers' records and the
faults the orchestrator did. These are `chaos/sim/_model.py`'s rules, adapted to what a real
run can observe: wall-clock times (recorded by each process as things happened), the faults'
spans as the orchestrator measured them, and the processes' own records and logs.

Ground truth. A producer *instance* (one run of a planned stream, in one process incarnation)
recorded every chunk before the engine got it, and how it ended (`done`, `failed`,
`cancelled`); one whose process was SIGKILLed (or exited) before its end *died* then. Every
chunk ends with its instance's marker, so two instances' texts differ. A *reader* (a library
reader, or an SSE session's segment of one attempt) resumed at offset o (0 for none) and got
the text R; its *candidates* are the instances of its stream (and attempt) whose text T has
R == T[o : o + len(R)] (for a call that elected an instance itself, only that one).

Hard violations
- `wrong-text`: no candidate (a wrong, reordered, duplicated or missing piece, texts mixed from
  two producers), or an SSE event whose id does not continue where the previous one ended.
- `chunking`: a chunk that does not end on one of the candidate's chunk boundaries, or whose
  event name is not the one it was produced with.
- `false-end`: a reader's normal end (`StopAsyncIteration`; over SSE, a 204 answering a
  reconnect) without a candidate that ended `done` with R == T[o:] exactly (a 204 is judged
  as a `None` below).
- `spliced-resume`: an SSE reader's `wrong-text` of a known shape: one producer's text up to
  a reconnect, another's after it (in a library reader, which never reconnects, it stays a
  `wrong-text`). Two producers ran under one id (the first ran without resumability
  because its election failed, or Redis lost the election key), and an SSE reconnect, which
  carries an offset (and an attempt) but nothing of which producer the text came from,
  resumed the other one's by offset.
- `degraded-resume`: over SSE, the events of a stream that ran without resumability (its
  election failed: `on_backend_error="degrade"`) carried ids that a reconnect resumed from on
  another worker, which answered 204: the text cut short, no error (a `false-end`). The ids of
  such a stream say so (`0.<offset>`), and a reconnect with one is owed `incomplete`; a reader
  that got none of its text (a follower with a cursor of its own) never saw its ids: for it the
  stream does not exist elsewhere, and its 204 is judged as a `None`.
- `untyped`: anything but a `ResumableStreamError` out of the API (calls, reads, `aclose`,
  writers, cancels), exception groups included; over SSE, an HTTP 500 (`http-500`) or another
  answer the protocol does not have for it (`http-status`).
- `empty-200`: an SSE reconnect answered 200 with a body that ended with no event, again and
  again (twice or more): a reader with nothing more to read is owed a 204 (or an error
  frame), or an `EventSource` reconnects in a loop.
- `hang`: a reader still waiting when the processes were stopped, for an end its producer had
  reached (or died) more than `wait_bound` seconds before; an SSE session that gave up
  reconnecting; `slow-end`: a reader that got its end more than `wait_bound` seconds after
  its producer's end (or death). The longest such wait is reported in any case.
- `process-exit` (a process exited when nobody killed it), `logged-error` (an ERROR record,
  a traceback that is not a planned failure, "Exception in ASGI application", "Task exception
  was never retrieved"), `leak` (a key of the run without a TTL after the run).

False claims. A fault *touches* a stream if it hit the node that holds it (every node of a
server or Sentinel setup; on a cluster, the master of its slot) or a process involved.
- `false-failed`, `false-cancelled` (no candidate ended so, no `cancel_stream` of it had
  started, and the processes were not stopping), `false-restarted` (no later attempt had
  started), `false-conflict` (fewer than two instances had started), `false-slow`.
- `false-lost`: `ProducerLostError` (SSE: `producer_lost`) although every candidate's process
  was alive at the claim and none of these touched the stream in [call - (resume_timeout +
  liveness_timeout), claim]: a node outage (SIGKILL, SIGSTOP, a Sentinel failover) or a link
  outage of the producer's process (a stalled proxy) that with the heartbeat interval before
  it (a third of `liveness_timeout`: the follower last heard the producer up to that much
  before the outage began) makes `liveness_timeout` or more of silence, a link
  slowed by half of it or more each way, a loss of keys. A planned cluster failover, a slot
  migration, a killed subscriber connection, a cut link or a full memory excuse nothing: the
  README says none of them ends a stream.
- `false-none`: `None` (SSE: a 204) while the latest instance elected before the call (none
  during it) was running with its process alive; or had ended failed or cancelled, or died
  less than `lost_ttl` before; or had ended done with a cursor short of its end while its
  text was still held (durable: stored, and no key loss touched it; else its process alive
  and within `linger` of its end).
- `false-incomplete`: `StreamIncompleteError` (SSE: `incomplete`) although no key loss touched
  the stream and no candidate's process died, and either a candidate still held its text
  (running, lingering, or durable) or no fault at all touched the stream or the reader; but
  for an SSE reader whose ids said its stream ran without resumability (only that producer
  ever had the text, and a reconnect reaches another worker).
- `false-backend`: `BackendError` (SSE: `unavailable`) with no fault touching the stream or
  the reader's process (for an SSE session, its client's and the servers it reached) in its
  window; a writer job refused a `BackendError` as it started while nothing could have made
  its commands fail (as for `false-degrade` below).
- `false-degrade`: a stream that ran without resumability (the engine logged that the backend
  failed as it started: `on_backend_error="degrade"`) although no outage (a node down or
  stopped, a stalled link), full memory, eviction or link slowed by a quarter of
  `command_timeout` each way touched it in [start - command_timeout, start]: Redis could
  have elected it. A killed replica, a planned failover, a migration, a cut link or a killed
  connection that ended before excuse nothing: Redis answered again.
- `false-closed`: any other `ResumableStreamError` while the processes were not stopping.
  `ProducerUnavailableError` (and an SSE 503) is always a fair answer ("try again"); one given
  while a candidate held the text, its process alive, and no fault touched the stream, the
  reader or the producer in [call - (resume_timeout + liveness_timeout), answer] is listed as a
  *warning* (`unexplained-unavailable`), not a violation: nothing was lost, but a reader was
  told to try again for no reason the run can see (a loaded machine can be one).

A margin of `_MARGIN` seconds absorbs the gap between when a thing happened and when it was
recorded. Exact interleavings are not reproducible with real processes: a violation is
reported with its records, its processes' log lines and the faults around it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.crc import key_slot

from ._plan import Plan
from ._records import Record, read_records
from ._topology import FaultRecord

__all__ = ["Checked", "Violation", "check"]

_MARGIN = 1.0
# The attempt in the SSE ids of a stream run without resumability (`resumable_stream.http`).
_UNRESUMABLE = 0
# What may make a command fail, and so a stream run without resumability (`false-degrade`),
# beside an outage: a full memory, evictions.
_COMMAND_FAULTS = {"oom", "evict"}
_CODES = {
    "failed": "StreamFailedError",
    "cancelled": "StreamCancelledError",
    "producer_lost": "ProducerLostError",
    "incomplete": "StreamIncompleteError",
    "too_slow": "SlowReaderError",
    "unavailable": "BackendError",
}
_ERROR_WORDS = (" ERROR ", " CRITICAL ", "ERROR:", "Exception in ASGI application")
_TIME = re.compile(r"^(\d{9,}\.\d{3}) ")


@dataclass
class Instance:
    id: str
    proc: str
    inc: int
    sid: str
    dep: str
    kind: str
    attempt: int
    rid: str | None
    t_start: float
    chunks: list[tuple[str, str | None]] = field(default_factory=list)
    end: str | None = None
    t_end: float = math.inf
    died: float = math.inf  # when its process died (inf: it did not)
    offline: bool = False

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.chunks)

    def boundaries(self) -> dict[int, str | None]:
        """End offset -> event name of each chunk."""
        out, position = {}, 0
        for text, event in self.chunks:
            position += len(text)
            out[position] = event
        return out

    def over(self) -> float:
        """When it stopped producing: its end, or its death."""
        return min(self.t_end, self.died)

    def describe(self) -> str:
        how = self.end or ("died" if self.died < math.inf else "running")
        return (
            f"{self.id} (attempt {self.attempt}, {self.kind}, {how}, {len(self.text)} characters)"
        )


@dataclass
class Piece:
    text: str
    end: int | None  # the offset just past it, when the reader was told
    event: str | None  # its event name (None: a plain chunk), when the reader was told
    named: bool  # whether the reader was told the event name


@dataclass
class Reader:
    rid: str
    proc: str
    inc: int
    sse: bool
    sid: str
    dep: str
    api: str
    offset: int | None
    attempt: int | None  # the attempt its cursor is from (None: whichever it found)
    t_call: float
    t_open: float | None = None
    t_conn: float = 0.0  # an SSE session's last connection
    pieces: list[Piece] = field(default_factory=list)
    end: str | None = None  # stop | none | error | untyped | detached | stopped | killed | ...
    error: str = ""
    msg: str = ""
    t_end: float = math.inf
    phase: str = ""
    gap: str = ""  # a piece that did not continue where the previous one ended
    refusals: list[tuple[float, float]] = field(default_factory=list)  # SSE 503s: (asked, at)
    fresh: bool = False  # an SSE connection is open that has delivered no event yet
    empty: list[float] = field(default_factory=list)  # when a 200 ended with no event
    # Its events' ids said their stream ran without resumability (`0.<offset>`): a reconnect
    # with one is owed `incomplete`, as its text is nowhere else.
    unresumable: bool = False
    servers: set[str] = field(default_factory=set)  # the SSE servers it was connected to

    @property
    def procs(self) -> set[str]:
        """The processes that served it: its own, and for an SSE session the servers its
        connections reached (their engines made the answers)."""
        return {self.proc, *self.servers}

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    @property
    def start(self) -> int:
        return self.offset or 0


@dataclass
class Violation:
    kind: str
    detail: str
    reader: str = ""
    stream: str = ""
    processes: list[tuple[str, int]] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)  # the instances it is about
    at: float = 0.0
    records: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def line(self) -> str:
        where = " ".join(x for x in (self.reader, self.stream) if x)
        return f"{self.kind}: {where + ': ' if where else ''}{self.detail}"


@dataclass
class Checked:
    violations: list[Violation]
    streams: int
    instances: int
    readers: int
    library_readers: int
    sse_readers: int
    outcomes: Counter[str]
    longest_wait: float
    longest_wait_reader: str
    unavailable: int  # fair "try again" answers (ProducerUnavailableError, 503)
    warnings: list[Violation]


class _Checker:
    def __init__(
        self,
        plan: Plan,
        folder: Path,
        faults: list[FaultRecord],
        crashes: list[dict[str, Any]],
        leaks: list[str],
        t_stop: float,
        wait_bound: float,
    ) -> None:
        self.plan = plan
        self.folder = folder
        self.faults = faults
        self.crashes = crashes
        self.leaks = leaks
        self.t_stop = t_stop
        self.wait_bound = wait_bound
        self.settings = plan.settings
        self.streams = plan.by_id()
        self.violations: list[Violation] = []
        self.warnings: list[Violation] = []
        self.degraded: list[tuple[Instance, float, str]] = []
        self.refused: list[tuple[str, int, Record]] = []  # writer jobs refused a BackendError
        self.instances: dict[str, Instance] = {}
        self.by_stream: dict[tuple[str, str], list[Instance]] = defaultdict(list)
        self.readers: list[Reader] = []
        self.cancels: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.deaths: dict[tuple[str, int], float] = {}
        self.records: dict[tuple[str, int], list[Record]] = defaultdict(list)
        self.outcomes: Counter[str] = Counter()
        self.longest = (0.0, "")
        self.unavailable = 0
        self._slots: dict[str, int] = {}

    # Reading the run

    def load(self) -> None:
        for fault in self.faults:
            if fault.kind == "kill-proc" and fault.incarnation >= 0:
                self.deaths[(fault.procs[0], fault.incarnation)] = fault.start
        for crash in self.crashes:
            self.deaths[(crash["process"], crash["incarnation"])] = crash["t"]
        readers: dict[str, Reader] = {}
        for proc, inc, record in read_records(self.folder / "records"):
            self.records[(proc, inc)].append(record)
            kind = record["k"]
            if kind == "inst-start":
                inst = Instance(
                    record["inst"],
                    proc,
                    inc,
                    record["sid"],
                    record["dep"],
                    record["kind"],
                    record["attempt"],
                    record.get("rid"),
                    record["t"],
                )
                inst.died = self.deaths.get((proc, inc), math.inf)
                self.instances[inst.id] = inst
                self.by_stream[(inst.sid, inst.dep)].append(inst)
            elif kind == "inst-chunk":
                self.instances[record["inst"]].chunks.append((record["text"], record["event"]))
            elif kind == "inst-end":
                inst = self.instances[record["inst"]]
                inst.end, inst.t_end = record["how"], record["t"]
            elif kind == "read-start":
                reader = Reader(
                    record["rid"],
                    proc,
                    inc,
                    False,
                    record["sid"],
                    record["dep"],
                    record["api"],
                    record["offset"],
                    record.get("attempt"),
                    record["t"],
                )
                if record["offset"] is not None and reader.attempt is None:
                    reader.attempt = 1
                readers[reader.rid] = reader
                self.readers.append(reader)
            elif kind == "read-open":
                readers[record["rid"]].t_open = record["t"]
            elif kind == "read-chunks":
                reader = readers[record["rid"]]
                for text, end, event in record["items"]:
                    reader.pieces.append(Piece(text, end, event, end is not None))
            elif kind == "read-end":
                reader = readers[record["rid"]]
                reader.end, reader.t_end = record["end"], record["t"]
                reader.error, reader.msg = record.get("error", ""), record.get("msg", "")
                reader.phase = record.get("phase", "")
            elif kind == "writer-refused" and record["error"] == "BackendError":
                self.refused.append((proc, inc, record))
            elif kind == "cancel-start":
                self.cancels[(record["sid"], record["dep"])].append(record["t"])
            elif kind == "untyped":
                self.add(
                    "untyped",
                    f"{record['what']} of {record['sid']} raised "
                    f"{record['error']}: {record['msg']}",
                    stream=record["sid"],
                    processes=[(proc, inc)],
                    at=record["t"],
                    records=[record.get("tb", "")],
                )
            elif kind.startswith("sess-"):
                self._session(proc, inc, record, readers)
        for reader in self.readers:
            if reader.end is None:
                died = self.deaths.get((reader.proc, reader.inc))
                if died is not None:
                    reader.end, reader.t_end = "killed", died
        self._offline()

    def _session(self, proc: str, inc: int, record: Record, readers: dict[str, Reader]) -> None:
        """An SSE session's records, as readers: one per attempt it read."""
        kind, rid = record["k"], record["rid"]
        if kind == "sess-start":
            reader = Reader(
                rid,
                proc,
                inc,
                True,
                record["sid"],
                record["dep"],
                "sse-create" if record["creates"] else "sse-follow",
                record["offset"],
                None if record["offset"] is None else 1,
                record["t"],
            )
            readers[rid] = reader
            self.readers.append(reader)
            return
        reader = readers[rid]
        while rid in readers and readers[rid].end == "restart":
            rid = readers[rid].rid + "+"  # the session's later segment
            reader = readers[rid]
        if kind == "sess-conn":
            reader.t_conn = record["t"]
            servers = self.plan.servers
            reader.servers.add(servers[int(record["server"]) % len(servers)])
            reader.fresh = True
            if str(record.get("cursor") or "").startswith(f"{_UNRESUMABLE}."):
                reader.unresumable = True  # a new reader's first id, before any event
            if reader.t_open is None:
                reader.t_open = record["t"]
        elif kind == "sess-eof" and reader.fresh:
            reader.empty.append(record["t"])
        elif kind == "sess-events":
            reader.fresh = False
            for event_id, name, data in record["items"]:
                attempt, offset = _sse_id(event_id)
                if attempt == _UNRESUMABLE:
                    # The ids of a stream run without resumability: its attempt is the first.
                    reader.unresumable, attempt = True, 1
                if name == "restart":
                    new_attempt = int(json.loads(data)["attempt"])
                    reader.end, reader.t_end = "restart", record["t"]
                    reader.error, reader.msg = "StreamRestartedError", f"attempt {new_attempt}"
                    later = Reader(
                        reader.rid + "+",
                        proc,
                        inc,
                        True,
                        reader.sid,
                        reader.dep,
                        reader.api,
                        0,
                        new_attempt,
                        record["t"],
                        record["t"],
                    )
                    readers[later.rid] = later
                    self.readers.append(later)
                    reader = later
                    continue
                if name == "error":
                    continue  # its end comes as sess-end
                if reader.attempt is None:
                    reader.attempt = attempt
                elif attempt != reader.attempt and not reader.gap:
                    reader.gap = (
                        f"an event of attempt {attempt} in a read of attempt {reader.attempt}"
                    )
                position = reader.start + len(reader.text)
                if (offset is None or offset - len(data) != position) and not reader.gap:
                    reader.gap = (
                        f"event id {event_id!r} with {len(data)} characters after offset {position}"
                    )
                event = None if name == "message" else name
                reader.pieces.append(Piece(data, offset, event, True))
        elif kind == "sess-end":
            end = record["end"]
            reader.t_end = record["t"]
            if end == "204":
                reader.end = "204"
                reader.msg = f"cursor {record.get('cursor')}"
            elif end == "error":
                try:
                    code = str(json.loads(record["data"]).get("code", "error"))
                except (ValueError, AttributeError):
                    code = "error"
                reader.end, reader.error = "error", _CODES.get(code, f"code:{code}")
                reader.msg = record["data"]
            elif end == "http":
                reader.end = "http"
                reader.error, reader.msg = str(record["status"]), record.get("body", "")
            else:
                reader.end = end  # gave-up | stopped
        elif kind == "sess-status":
            self.unavailable += 1
            if record["status"] == 503:
                reader.refusals.append((reader.t_conn, record["t"]))

    def _offline(self) -> None:
        """Instances that ran without resumability (the election failed: degraded mode)."""
        pattern = re.compile(r"stream '([^']+)' runs without resumability")
        for path in sorted((self.folder / "logs").glob("*.stderr")):
            name, _, inc = path.stem.rpartition(".")
            for line in path.read_text(errors="replace").splitlines():
                found = pattern.search(line)
                stamp = _TIME.match(line)
                if not found or not stamp:
                    continue
                at = float(stamp.group(1))
                for inst in self.instances.values():
                    if (inst.proc, inst.inc, inst.sid) == (name, int(inc), found.group(1)) and (
                        abs(inst.t_start - at) < 2.0
                    ):
                        inst.offline = True
                        self.degraded.append((inst, at, line))

    # Facts

    def slot(self, sid: str) -> int:
        if sid not in self._slots:
            self._slots[sid] = key_slot(f"{{{sid}}}".encode())
        return self._slots[sid]

    def touches(self, fault: FaultRecord, sid: str, procs: set[str]) -> bool:
        if fault.procs:
            return bool(set(fault.procs) & procs)
        if fault.slots is None:
            return True
        slot = self.slot(sid)
        return any(a <= slot <= b for a, b in fault.slots)

    def faults_in(self, sid: str, procs: set[str], start: float, end: float) -> list[FaultRecord]:
        return [
            f for f in self.faults
            if f.start <= end + _MARGIN and f.end >= start - _MARGIN and self.touches(f, sid, procs)
        ]  # fmt: skip

    def keys_lost(self, sid: str, dep: str, before: float) -> bool:
        """Whether a fault may have lost keys of the stream, from its first instance's start
        to `before`."""
        first = min((i.t_start for i in self.by_stream.get((sid, dep), [])), default=before)
        return any(
            f.keys_lost
            and f.start <= before + _MARGIN
            and f.end >= first - _MARGIN
            and not f.procs
            and self.touches(f, sid, set())
            for f in self.faults
        )

    def alive(self, proc: str, inc: int, at: float) -> bool:
        return self.deaths.get((proc, inc), math.inf) > at + _MARGIN

    def stopping(self, at: float) -> bool:
        return at >= self.t_stop - _MARGIN

    def candidates(self, reader: Reader) -> list[Instance]:
        pool = self.by_stream.get((reader.sid, reader.dep), [])
        if reader.attempt is not None:
            pool = [i for i in pool if i.attempt == reader.attempt]
        own = [i for i in pool if i.rid is not None and i.rid == reader.rid.split("+")[0]]
        if own and reader.attempt in (None, 1) and not reader.sse:
            pool = own
        text, start = reader.text, reader.start
        if not text:
            return [i for i in pool if i.t_start <= reader.t_end + _MARGIN]
        return [i for i in pool if i.text[start : start + len(text)] == text]

    # Checks

    def add(
        self,
        kind: str,
        detail: str,
        reader: Reader | None = None,
        stream: str = "",
        processes: list[tuple[str, int]] | None = None,
        at: float = 0.0,
        records: list[str] | None = None,
        instances: list[Instance] | None = None,
    ) -> None:
        procs = list(processes or [])
        if reader is not None:
            procs.append((reader.proc, reader.inc))
            stream = stream or reader.sid
            at = at or (reader.t_end if reader.t_end < math.inf else reader.t_call)
        for inst in instances or []:
            if (inst.proc, inst.inc) not in procs:
                procs.append((inst.proc, inst.inc))
        self.violations.append(
            Violation(
                kind,
                detail,
                reader.rid if reader else "",
                stream,
                procs,
                [i.describe() for i in instances or []],
                at,
                list(records or []),
            )
        )

    def run(self) -> None:
        self.load()
        for reader in self.readers:
            self.check_reader(reader)
        for crash in self.crashes:
            self.add(
                "process-exit",
                f"{crash['process']}.{crash['incarnation']} exited with "
                f"{crash['returncode']} when nobody killed it",
                processes=[(crash["process"], crash["incarnation"])],
                at=crash["t"],
                records=[crash["stderr"]],
            )
        for leak in self.leaks:
            self.add("leak", f"a key without a TTL after the run: {leak}")
        for inst, at, line in self.degraded:
            self.check_degrade(inst, at, line)
        for proc, inc, record in self.refused:
            if not self.command_fault(record["sid"], proc, record["t"]):
                self.add(
                    "false-backend",
                    f"a writer job of {record['sid']} could not start "
                    f"although no outage touched it: BackendError ({record['msg']})",
                    stream=record["sid"],
                    processes=[(proc, inc)],
                    at=record["t"],
                )
        self.scan_logs()

    def check_reader(self, reader: Reader) -> None:
        end = reader.end
        self.outcomes[f"{'sse' if reader.sse else 'lib'}:{end}"] += 1
        if end == "untyped":
            self.add(
                "untyped", f"{reader.api} raised {reader.error}: {reader.msg}", reader, records=[]
            )
            return
        if end == "http":
            kind = "http-500" if reader.error == "500" else "http-status"
            self.add(kind, f"answered {reader.error}: {reader.msg[:200]}", reader)
            return
        if reader.gap:
            self.add("wrong-text", reader.gap, reader)
            return
        if end == "none" or (end == "204" and not reader.pieces and reader.offset is None):
            self.check_none(reader, reader.offset)
            return
        candidates = self.candidates(reader)
        text = reader.text
        if not candidates and text:
            joined = self.spliced(reader) if reader.sse else ""
            if joined:
                self.add("spliced-resume", joined, reader)
                return
            texts = {
                i.id: _short(i.text[reader.start :])
                for i in self.by_stream.get((reader.sid, reader.dep), [])
            }
            self.add(
                "wrong-text",
                f"read {_short(text)} from offset {reader.start} (attempt "
                f"{reader.attempt}); the instances have {texts}",
                reader,
            )
            return
        if text:
            fitting = [i for i in candidates if self.chunking(reader, i) is None]
            if not fitting:
                self.add(
                    "chunking",
                    f"{self.chunking(reader, candidates[0])} (instance {candidates[0].id})",
                    reader,
                    instances=candidates[:1],
                )
                return
            candidates = fitting
        self.wait(reader, candidates)
        if len(reader.empty) >= 2:
            first, last = reader.empty[0], reader.empty[-1]
            self.add(
                "empty-200",
                f"{len(reader.empty)} reconnects with nothing more to read "
                f"got 200 and an empty body, over {last - first:.1f}s, instead of 204 (an "
                "EventSource reconnects again at once)",
                reader,
                at=first,
                instances=candidates,
            )
        for asked, at in reader.refusals:
            self.check_unavailable(reader, asked, at, candidates)
        if end in ("stop", "204"):
            whole = [i for i in candidates if i.text[reader.start :] == text and i.end == "done"]
            if whole:
                return
            if end == "204" and text and candidates and all(i.offline for i in candidates):
                # (A reader that got none of its text never saw its ids: for it the stream
                # does not exist elsewhere, and a 204 is judged as a None below.)
                left = min(len(i.text) - reader.start - len(text) for i in candidates)
                if left > 0:
                    self.add(
                        "degraded-resume",
                        f"a reconnect got a 204 with {left} characters "
                        "missing: the stream ran without resumability (its election "
                        "failed), yet its events had ids a reconnect resumes from",
                        reader,
                        instances=candidates,
                    )
                return
            if end == "204":
                # A 204 to a reconnect: "nothing more". Judged as a None for its cursor.
                self.check_none(reader, reader.start + len(text), candidates)
                return
            states = ", ".join(i.describe() for i in candidates) or "none"
            self.add(
                "false-end",
                f"ended normally with {len(text)} characters from offset "
                f"{reader.start}; the candidates: {states}",
                reader,
                instances=candidates,
            )
        elif end == "error" or end == "restart":
            self.check_claim(reader, candidates)
        elif end in ("stopped", "gave-up"):
            self.check_hang(reader, candidates)

    def spliced(self, reader: Reader) -> str:
        """If the reader's text is one instance's up to a piece's end, then another's (two
        producers of one id, resumed by offset after a reconnect): what happened, else ""."""
        text, start = reader.text, reader.start
        pool = self.by_stream.get((reader.sid, reader.dep), [])
        position = 0
        for piece in reader.pieces[:-1]:
            position += len(piece.text)
            head, rest = text[:position], text[position:]
            for first in pool:
                if first.text[start : start + position] != head:
                    continue
                at = start + position
                for second in pool:
                    if second is first or second.text[at : at + len(rest)] != rest:
                        continue
                    if first.offline or second.offline:
                        why = "one of them ran without resumability (its election failed)"
                    elif self.keys_lost(reader.sid, reader.dep, reader.t_end):
                        why = "Redis lost the stream's election key meanwhile"
                    else:
                        why = "nothing the run can see made a second producer"
                    return (
                        f"its first {position} characters came from {first.describe()}, the "
                        f"rest from {second.describe()}, resumed at {at} by offset after a "
                        f"reconnect: two producers of one id ({why})"
                    )
        return ""

    def chunking(self, reader: Reader, inst: Instance) -> str | None:
        position = reader.start
        bounds = inst.boundaries()
        for piece in reader.pieces:
            position += len(piece.text)
            if not piece.text or position not in bounds:
                return f"a chunk {_short(piece.text)} ends at {position}, not on a chunk boundary"
            if piece.end is not None and piece.end != position:
                return (
                    f"a chunk {_short(piece.text)} says it ends at {piece.end}, it ends at "
                    f"{position}"
                )
            if piece.named and piece.event != bounds[position]:
                return (
                    f"the chunk ending at {position} came as event {piece.event!r}; it was "
                    f"produced as {bounds[position]!r}"
                )
        return None

    def wait(self, reader: Reader, candidates: list[Instance]) -> None:
        """How long the reader waited for its end after its producer's end or death."""
        if reader.end not in ("stop", "204", "error", "restart", "none") or not candidates:
            return
        over = min(i.over() for i in candidates)
        if over == math.inf:
            return
        waited = reader.t_end - max(over, reader.t_call)
        if waited > self.longest[0]:
            self.longest = (waited, reader.rid)
        if waited > self.wait_bound:
            self.add(
                "slow-end",
                f"got its end ({reader.end} {reader.error}) {waited:.1f}s after "
                f"its producer's end or death",
                reader,
                instances=candidates,
            )

    def check_hang(self, reader: Reader, candidates: list[Instance]) -> None:
        pool = candidates or [
            i for i in self.by_stream.get((reader.sid, reader.dep), []) if i.t_start <= reader.t_end
        ]
        over = min((i.over() for i in pool), default=math.inf)
        waiting = reader.t_end - max(reader.t_call, over if over < math.inf else reader.t_call)
        if over == math.inf and pool and all(self.alive(i.proc, i.inc, reader.t_end) for i in pool):
            self.add(
                "hang",
                f"still waiting at the stop ({reader.end}), its producer never ended: "
                + ", ".join(i.describe() for i in pool),
                reader,
                instances=pool,
            )
            return
        if reader.end == "gave-up" or waiting > self.wait_bound:
            self.add(
                "hang",
                f"{reader.end} after waiting {waiting:.1f}s (in {reader.phase or 'read'}"
                f") for the end of " + (", ".join(i.describe() for i in pool) or "no instance"),
                reader,
                instances=pool,
            )

    def check_claim(self, reader: Reader, candidates: list[Instance]) -> None:
        error, at, sid = reader.error, reader.t_end, reader.sid
        text = reader.text
        if not text and not candidates:
            candidates = [
                i
                for i in self.by_stream.get((sid, reader.dep), [])
                if i.t_start <= at + _MARGIN
                and (reader.attempt is None or i.attempt == reader.attempt)
            ]
        said = f"{error} ({reader.msg[:160]})"
        if error == "StreamFailedError":
            if not any(i.end == "failed" and i.t_end <= at + _MARGIN for i in candidates):
                self.add(
                    "false-failed",
                    f"{said}, but no producer of it failed",
                    reader,
                    instances=candidates,
                )
        elif error == "StreamCancelledError":
            cancelled = any(i.end == "cancelled" for i in candidates)
            asked = any(t <= at + _MARGIN for t in self.cancels.get((sid, reader.dep), []))
            if not (cancelled or asked or self.stopping(at)):
                self.add(
                    "false-cancelled",
                    f"{said}, but nothing cancelled it",
                    reader,
                    instances=candidates,
                )
        elif error == "StreamRestartedError":
            attempt = reader.attempt or 1
            if not any(
                i.attempt > attempt and i.t_start <= at + _MARGIN
                for i in self.by_stream.get((sid, reader.dep), [])
            ):
                self.add("false-restarted", f"{said}, but no later attempt had started", reader)
        elif error == "ProducerLostError":
            self.check_lost(reader, said, candidates)
        elif error in ("ProducerUnavailableError",):
            self.unavailable += 1
            self.check_unavailable(reader, reader.t_call, at, candidates)
        elif error == "ProducerConflictError":
            started = [
                i
                for i in self.by_stream.get((sid, reader.dep), [])
                if not i.offline and i.t_start <= at + _MARGIN
            ]
            if len(started) < 2:
                self.add(
                    "false-conflict",
                    f"{said}, but only {len(started)} producer ran",
                    reader,
                    instances=started,
                )
        elif error == "StreamIncompleteError":
            self.check_incomplete(reader, said, candidates)
        elif error == "SlowReaderError":
            self.add("false-slow", f"{said}: no stream of the campaign is that long", reader)
        elif error == "BackendError":
            start = reader.t_call
            if not self.faults_in(sid, reader.procs, start, at) and not self.stopping(at):
                self.add("false-backend", f"{said}, but no fault touched it", reader)
        elif not self.stopping(at):
            self.add("false-closed", f"{said}, while the processes were not stopping", reader)

    def command_fault(self, sid: str, proc: str, at: float) -> bool:
        """Whether something may have made a command of `proc` about `sid` fail at `at`."""
        start = at - self.settings.command_timeout
        for fault in self.faults_in(sid, {proc}, start, at):
            if fault.outage or fault.kind in _COMMAND_FAULTS or fault.error:
                return True
            if fault.kind == "proxy-delay" and 4 * fault.delay >= self.settings.command_timeout:
                return True
        return self.stopping(at)

    def check_degrade(self, inst: Instance, at: float, line: str) -> None:
        if self.command_fault(inst.sid, inst.proc, at):
            return
        message = line.partition("resumable_stream: ")[2] or line
        self.add(
            "false-degrade",
            f"{inst.describe()} ran without resumability although no "
            f"outage touched it: {message[:300]}",
            stream=inst.sid,
            processes=[(inst.proc, inst.inc)],
            at=at,
        )

    def check_unavailable(
        self, reader: Reader, asked: float, at: float, candidates: list[Instance]
    ) -> None:
        """A "try again" while a producer held the text and nothing touched it: a warning."""
        holding = [i for i in candidates if i.t_start <= asked and self.holds_text(i, at)]
        if not holding or self.stopping(at):
            return
        settings = self.settings
        start = asked - (settings.resume_timeout + settings.liveness_timeout)
        procs = {*reader.procs, *(i.proc for i in holding)}
        if self.faults_in(reader.sid, procs, start, at):
            return
        processes = [(reader.proc, reader.inc), *((i.proc, i.inc) for i in holding)]
        detail = (
            f"told to try again ({reader.msg[:120] or '503'}) while "
            f"{', '.join(i.describe() for i in holding)} held the text and no fault touched it"
        )
        self.warnings.append(
            Violation(
                "unexplained-unavailable",
                detail,
                reader.rid,
                reader.sid,
                processes,
                [i.describe() for i in holding],
                at,
            )
        )

    def check_lost(self, reader: Reader, said: str, candidates: list[Instance]) -> None:
        at = reader.t_end
        settings = self.settings
        start = reader.t_call - (settings.resume_timeout + settings.liveness_timeout)
        if not candidates or self.keys_lost(reader.sid, reader.dep, at):
            return
        excuses = []
        for inst in candidates:
            if inst.offline or not self.alive(inst.proc, inst.inc, at):
                return
            for fault in self.faults_in(reader.sid, {inst.proc}, start, at):
                # A follower's silence starts at the producer's last message before the outage:
                # up to a heartbeat (a third of liveness_timeout) before it began.
                silence = fault.end - fault.start + settings.liveness_timeout / 3
                if fault.outage and (
                    silence >= settings.liveness_timeout or fault.kind == "kill-proc"
                ):
                    return
                if fault.kind == "proxy-delay" and 2 * fault.delay >= settings.liveness_timeout:
                    return
            excuses.append(inst.describe())
        self.add(
            "false-lost",
            f"{said}, but its producer {', '.join(excuses)} was alive and no "
            f"outage of liveness_timeout={settings.liveness_timeout}s touched it",
            reader,
            instances=candidates,
        )

    def holds_text(self, inst: Instance, at: float) -> bool:
        if inst.offline or not self.alive(inst.proc, inst.inc, at):
            return False
        if inst.dep == "dur":
            return True
        if inst.end is None:
            return True
        return at < inst.t_end + self.settings.linger - _MARGIN

    def check_incomplete(self, reader: Reader, said: str, candidates: list[Instance]) -> None:
        at = reader.t_end
        if reader.unresumable and all(i.offline for i in candidates):
            return  # its ids said so: its text was only ever its own producer's
        if self.keys_lost(reader.sid, reader.dep, at):
            return
        if any(not self.alive(i.proc, i.inc, at) for i in candidates):
            return
        holding = [i for i in candidates if self.holds_text(i, at)]
        if holding and any(i.dep == "mem" for i in holding):
            detail = f"its producer {', '.join(i.describe() for i in holding)} still had the text"
        elif holding:
            detail = "its text was stored and no key of it was lost"
        else:
            procs = {*reader.procs, *(i.proc for i in candidates)}
            if self.faults_in(reader.sid, procs, reader.t_call, at):
                return
            detail = "no fault could have lost a message"
        self.add("false-incomplete", f"{said}, but {detail}", reader, instances=candidates)

    def check_none(
        self, reader: Reader, cursor: int | None, candidates: list[Instance] | None = None
    ) -> None:
        start, end = reader.t_call, reader.t_end
        if reader.end == "204":
            start = reader.t_conn  # a 204 answers the last connection
        sid = reader.sid
        if self.keys_lost(sid, reader.dep, end):
            return
        pool = [i for i in self.by_stream.get((sid, reader.dep), []) if not i.offline]
        if reader.attempt is not None and reader.attempt > 1:
            pool = [i for i in pool if i.attempt == reader.attempt]
        before = [i for i in pool if i.t_start < start - _MARGIN]
        if not before or any(start - _MARGIN <= i.t_start <= end + _MARGIN for i in pool):
            return
        inst = max(before, key=lambda i: i.t_start)
        what = f"{'a 204' if reader.sse else 'None'} (cursor {cursor}) from {reader.api}"
        if inst.over() > end + _MARGIN:
            self.add(
                "false-none",
                f"{what} while {inst.describe()} was running",
                reader,
                instances=[inst],
            )
            return
        if inst.end in ("failed", "cancelled") and inst.t_end <= inst.died:
            self.add(
                "false-none",
                f"{what}: {inst.describe()} had ended {inst.end}",
                reader,
                instances=[inst],
            )
            return
        if inst.end is None or inst.died < inst.t_end:
            if end < inst.died + self.settings.lost_ttl - _MARGIN:
                self.add(
                    "false-none",
                    f"{what}: {inst.describe()} had died "
                    f"{end - inst.died:.1f}s before (lost_ttl={self.settings.lost_ttl})",
                    reader,
                    instances=[inst],
                )
            return
        length = len(inst.text)
        if cursor is None or cursor >= length:
            return
        left = f"{length - cursor} characters left"
        if inst.dep == "dur":
            self.add(
                "false-none",
                f"{what}: {inst.describe()} ended done and was stored, {left}",
                reader,
                instances=[inst],
            )
        elif (
            self.alive(inst.proc, inst.inc, end)
            and end <= inst.t_end + self.settings.linger - _MARGIN
        ):
            self.add(
                "false-none",
                f"{what}: {inst.describe()} ended done {end - inst.t_end:.1f}s "
                f"before and was lingering (linger={self.settings.linger}s), {left}",
                reader,
                instances=[inst],
            )

    def scan_logs(self) -> None:
        for path in sorted((self.folder / "logs").glob("*.stderr")):
            name, _, inc = path.stem.rpartition(".")
            for at, entry in _log_entries(path):
                head = entry[0]
                problem = ""
                if any(word in head for word in _ERROR_WORDS):
                    problem = "logged-error"
                elif any(line.startswith("Traceback") for line in entry):
                    last = entry[-1]
                    if "fails as planned" not in last:
                        problem = "logged-error"
                elif "Task exception was never retrieved" in head:
                    problem = "logged-error"
                if problem:
                    self.add(  # the entry itself goes in the records
                        problem,
                        f"{name}.{inc}: {head[:300]}",
                        processes=[(name, int(inc))],
                        at=at,
                        records=["\n".join(entry[-40:])],
                    )


def _log_entries(path: Path) -> list[tuple[float, list[str]]]:
    """The stderr of a process as log entries: a timestamped line and what follows it (a
    traceback); lines before any timestamp form entries of their own."""
    entries: list[tuple[float, list[str]]] = []
    last = 0.0
    for line in path.read_text(errors="replace").splitlines():
        stamp = _TIME.match(line)
        if stamp:
            last = float(stamp.group(1))
            entries.append((last, [line]))
        elif entries and (
            line.startswith((" ", "Traceback", "During", "The above"))
            or not line
            or not line[0].isalnum()
            or ":" in line.split(" ")[0]
        ):
            entries[-1][1].append(line)
        else:
            entries.append((last, [line]))
    return entries


def _sse_id(event_id: str) -> tuple[int, int | None]:
    attempt, dot, offset = event_id.partition(".")
    if not dot:
        attempt, offset = "1", event_id
    return int(attempt), int(offset) if offset.isdigit() else None


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def context_lines(
    folder: Path,
    violation: Violation,
    faults: list[FaultRecord],
    logs: dict[Path, list[tuple[float, list[str]]]],
) -> None:
    """Fill in the log lines and faults around a violation."""
    at = violation.at
    for proc, inc in violation.processes:
        path = folder / "logs" / f"{proc}.{inc}.stderr"
        if not path.exists():
            continue
        if path not in logs:
            logs[path] = _log_entries(path)
        near = [
            line for t, entry in logs[path] if at - 8.0 <= t <= at + 2.0
            for line in entry
        ][-25:]  # fmt: skip
        if near:
            violation.logs.append(f"--- {proc}.{inc} stderr around {at:.3f} ---")
            violation.logs.extend(near)
    for fault in faults:
        if fault.start <= at + 2.0 and fault.end >= at - 15.0:
            violation.faults.append(
                f"{fault.kind} [{fault.start:.3f}, {fault.end:.3f}] {fault.detail} "
                f"{fault.procs or fault.nodes}{' error: ' + fault.error if fault.error else ''}"
            )


def reader_records(
    records: dict[tuple[str, int], list[Record]], violation: Violation, limit: int = 40
) -> None:
    """The reader's own records, and its stream's instances' starts."""
    if not violation.reader:
        return
    rid = violation.reader.split("+")[0]
    found: list[tuple[float, str]] = []
    for (proc, inc), lines in records.items():
        for record in lines:
            if str(record.get("rid", "")).split("+")[0] == rid or (
                record["k"] in ("inst-start", "inst-end", "writer-refused", "cancel-start")
                and record.get("sid") == violation.stream
            ):
                text = json.dumps(record, ensure_ascii=False)[:400]
                found.append((record["t"], f"{proc}.{inc} {text}"))
    found.sort()
    violation.records = [line for _, line in found[-limit:]] + violation.records


def check(
    plan: Plan,
    folder: Path,
    faults: list[FaultRecord],
    crashes: list[dict[str, Any]],
    leaks: list[str],
    t_stop: float,
    wait_bound: float,
) -> Checked:
    checker = _Checker(plan, folder, faults, crashes, leaks, t_stop, wait_bound)
    checker.run()
    logs: dict[Path, list[tuple[float, list[str]]]] = {}
    for violation in [*checker.violations, *checker.warnings][:500]:
        context_lines(folder, violation, faults, logs)
        reader_records(checker.records, violation)
    readers = checker.readers
    return Checked(
        violations=checker.violations,
        streams=len({(i.sid, i.dep) for i in checker.instances.values()}),
        instances=len(checker.instances),
        readers=len(readers),
        library_readers=sum(1 for r in readers if not r.sse),
        sse_readers=sum(1 for r in readers if r.sse),
        outcomes=checker.outcomes,
        longest_wait=checker.longest[0],
        longest_wait_reader=checker.longest[1],
        unavailable=checker.unavailable,
        warnings=checker.warnings,
    )
