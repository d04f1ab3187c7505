"""The real-process chaos campaign (`chaos.campaign`): its checker on made-up runs, and short
campaigns on each topology.

The checker tests write a run's records by hand (a producer's chunks, a reader's, a fault) and
assert that each kind of violation the model names is found, and that what the model allows is
not flagged.

The campaigns run `python -m chaos.campaign run` on a server and a Sentinel setup, about a
minute each (within the 3 minutes CI gives them), with fixed seeds (`CAMPAIGN_SEED_<TOPOLOGY>`
and `CAMPAIGN_DURATION` override them); the local 3+3 cluster's, with a fresh random seed
(printed, so that a failure replays), with `CAMPAIGN_CLUSTER=1` (see `_TOPOLOGIES`).
Nothing skips them: a machine without a Redis-protocol server, or a topology that cannot start
(exit status 2), fails the test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chaos.campaign._check import Violation, check
from chaos.campaign._plan import Chunk, Plan, Settings, StreamSpec, dump, load, make_plan
from chaos.campaign._topology import FaultRecord

from .machine import server_binary

ROOT = Path(__file__).resolve().parent.parent
T = 1_700_000_000.0  # the made-up runs' clock (as time.time())

SETTINGS = Settings(
    linger=10.0,
    liveness_timeout=2.0,
    resume_timeout=2.0,
    lost_ttl=15,
    command_timeout=2.0,
    flush_interval=0.02,
    drain_timeout=10.0,
)


def stream(sid: str = "s1", dep: str = "mem", kind: str = "generator") -> StreamSpec:
    return StreamSpec(sid, dep, kind, "W0", 1.0, (Chunk(0.1, "ab"), Chunk(0.1, "cd")), False, False)


class Run:
    """A made-up run: its plan, its records, its logs."""

    def __init__(self, folder: Path, *streams: StreamSpec) -> None:
        self.folder = folder
        (folder / "records").mkdir()
        (folder / "logs").mkdir()
        self.plan = Plan(
            seed=0,
            topology="server",
            duration=30.0,
            settings=SETTINGS,
            workers=("W0", "W1"),
            loops=("asyncio", "asyncio"),
            servers=("S0", "S1"),
            proxied=(),
            streams=streams or (stream(),),
            reads=(),
            cancels=(),
            sessions=(),
            faults=(),
        )
        self.faults: list[FaultRecord] = []

    def write(self, proc: str, kind: str, t: float, /, **fields: Any) -> None:
        path = self.folder / "records" / f"{proc}.0.jsonl"
        with path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"k": kind, "t": T + t, **fields}, ensure_ascii=False) + "\n")

    def log(self, proc: str, text: str) -> None:
        with (self.folder / "logs" / f"{proc}.0.stderr").open("a", encoding="utf-8") as file:
            file.write(text + "\n")

    def produce(
        self,
        chunks: list[str],
        how: str | None = "done",
        proc: str = "W0",
        inst: str = "W0.0.0",
        sid: str = "s1",
        dep: str = "mem",
        start: float = 1.0,
        end: float = 2.0,
        rid: str | None = None,
        attempt: int = 1,
    ) -> None:
        self.write(
            proc,
            "inst-start",
            start,
            inst=inst,
            sid=sid,
            dep=dep,
            kind="generator",
            attempt=attempt,
            rid=rid,
        )
        for chunk in chunks:
            self.write(proc, "inst-chunk", start, inst=inst, text=chunk, event=None)
        if how is not None:
            self.write(proc, "inst-end", end, inst=inst, how=how)

    def read(
        self,
        rid: str,
        offset: int | None,
        items: list[tuple[str, int | None]],
        end: str,
        at: float = 1.5,
        until: float = 2.5,
        error: str = "",
        msg: str = "",
        proc: str = "W1",
        sid: str = "s1",
        dep: str = "mem",
        api: str = "resume",
    ) -> None:
        self.write(
            proc,
            "read-start",
            at,
            rid=rid,
            sid=sid,
            dep=dep,
            api=api,
            offset=offset,
            mode="batch",
            attempt=None,
        )
        if end != "none" and not (end == "error" and not items):
            self.write(proc, "read-open", at, rid=rid, attempt=1)
        if items:
            self.write(
                proc,
                "read-chunks",
                at,
                rid=rid,
                items=[[text, offset_, None] for text, offset_ in items],
            )
        self.write(
            proc,
            "read-end",
            until,
            rid=rid,
            end=end,
            error=error,
            msg=msg,
            phase="read" if items else "call",
        )

    def session(
        self,
        rid: str,
        offset: int | None,
        events: list[tuple[str, str, str]],
        end: dict[str, Any],
        at: float = 1.5,
        until: float = 2.5,
    ) -> None:
        self.write(
            "C0",
            "sess-start",
            at,
            rid=rid,
            sid="s1",
            dep="mem",
            creates=offset is None,
            offset=offset,
        )
        self.write("C0", "sess-conn", at, rid=rid, server=0, cursor=None)
        if events:
            self.write("C0", "sess-events", at, rid=rid, items=[list(e) for e in events])
        self.write("C0", "sess-conn", until - 0.1, rid=rid, server=1, cursor="x")
        self.write("C0", "sess-end", until, rid=rid, **end)

    def fault(self, kind: str, start: float, end: float, **fields: Any) -> None:
        self.faults.append(FaultRecord(kind, "redis", T + start, T + end, **fields))

    def check(
        self, t_stop: float = 100.0, crashes: list[dict[str, Any]] | None = None
    ) -> list[Violation]:
        return check(
            self.plan, self.folder, self.faults, crashes or [], [], T + t_stop, 60.0
        ).violations

    def kinds(self, **kwargs: Any) -> list[str]:
        return [v.kind for v in self.check(**kwargs)]


def test_a_clean_run_has_no_violation(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"])
    run.read("r1", 1, [("bA0", 4), ("cdA0", 8)], "stop")
    run.read("r2", None, [("abA0", 4), ("cdA0", 8)], "stop")
    run.read("r3", 8, [], "stop")  # at its very end: nothing, then the end
    run.read("r4", 3, [("0", 4)], "detached")
    run.session("e1", 2, [("4", "message", "A0"), ("8", "message", "cdA0")], {"end": "204"})
    assert run.check() == []


def test_it_finds_a_wrong_text_and_two_producers_mixed(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"])
    run.produce(["abB0", "cdB0"], proc="W1", inst="W1.0.0", start=1.1)
    run.read("r1", 0, [("abA0", 4), ("cdB0", 8)], "stop")  # mixed
    run.read("r2", 0, [("abA0", 4), ("abA0", 8)], "stop")  # repeated
    assert run.kinds() == ["wrong-text", "wrong-text"]


def test_it_finds_chunks_cut_elsewhere(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"])
    run.read("r1", 0, [("abA0c", 5), ("dA0", 8)], "stop")
    assert run.kinds() == ["chunking"]


def test_it_finds_a_truncated_end_and_an_http_500(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"])
    run.read("r1", 0, [("abA0", 4)], "stop")
    run.session("e1", None, [], {"end": "http", "status": 500, "body": "Internal Server Error"})
    assert sorted(run.kinds()) == ["false-end", "http-500"]


def test_it_finds_none_while_running_or_lingering_unless_keys_were_lost(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"], how="done", end=5.0)
    run.read("r1", 0, [], "none", at=3.0, until=3.1)  # while it ran
    run.read("r2", 2, [], "none", at=6.0, until=6.1)  # lingering with the tail
    run.read("r3", 8, [], "none", at=6.0, until=6.1)  # at its end: fair
    run.read("r4", None, [], "none", at=6.0, until=6.1)  # a new reader of a finished stream
    run.read("r5", 2, [], "none", at=30.0, until=30.1)  # after linger: fair
    # A reconnect answered 204 with 4 characters left, while the producer lingered.
    run.session("e1", 0, [("4", "message", "abA0")], {"end": "204"}, at=5.5, until=6.0)
    assert sorted((v.kind, v.reader) for v in run.check()) == [
        ("false-none", "e1"),
        ("false-none", "r1"),
        ("false-none", "r2"),
    ]
    run.fault("kill", 2.0, 2.5, nodes=[1], outage=True, keys_lost=True)
    assert run.check() == []


def test_it_finds_a_live_producer_declared_lost(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"], how=None)
    run.read("r1", 0, [("abA0", 4)], "error", error="ProducerLostError", msg="died")
    run.session(
        "e1",
        0,
        [("4", "message", "abA0"), ("end", "error", "{}")],
        {"end": "error", "data": '{"code": "producer_lost"}'},
    )
    assert run.kinds() == ["false-lost", "false-lost"]
    # A killed subscriber connection or a short stall excuses nothing...
    run.fault("client-kill", 1.6, 1.6, procs=["W0"])
    run.fault("stall", 1.7, 1.9, nodes=[1], outage=True)
    assert run.kinds() == ["false-lost", "false-lost"]
    # ...a stall over liveness_timeout does; so does the producer's death.
    run.fault("stall", 1.0, 3.5, nodes=[1], outage=True)
    assert run.kinds() == []


def test_an_outage_that_makes_liveness_timeout_of_silence_excuses_lost(tmp_path: Path) -> None:
    """Seed 812321776 (server, 30 min): the producer's subscriber connection killed, then its
    link stalled for 2.5 s with liveness_timeout=3: its followers had last heard it up to a
    heartbeat (1 s) before, so they heard nothing for 3 s and found nobody subscribed."""
    run = Run(tmp_path)  # liveness_timeout 2: a heartbeat every 0.67 s
    run.produce(["abA0", "cdA0"], how=None)
    run.read("r1", 0, [("abA0", 4)], "error", error="ProducerLostError", msg="died", until=4.0)
    run.fault("client-kill", 1.6, 1.6, procs=["W0"])
    run.fault("proxy-stall", 1.6, 2.8, procs=["W0"], outage=True)  # 1.2 + 0.67 < 2
    assert run.kinds() == ["false-lost"]
    run.fault("proxy-stall", 3.0, 4.4, procs=["W0"], outage=True)  # 1.4 + 0.67 >= 2
    assert run.kinds() == []


def test_an_sse_readers_backend_error_is_excused_by_its_servers_faults(tmp_path: Path) -> None:
    """Seed 1717413405 (Sentinel, 30 min): a session resumed on S1, whose link then stalled,
    got `unavailable`: the fault touched the server that answered it, not the client."""
    run = Run(tmp_path)
    run.plan = replace(run.plan, servers=("S0", "S1"))
    run.produce(["abA0", "cdA0"])
    unavailable = {"end": "error", "data": '{"code": "unavailable", "message": "down"}'}
    run.session("e1", None, [("4", "message", "abA0")], unavailable)  # on S0, then S1
    run.fault("proxy-stall", 2.0, 2.4, procs=["W1"], outage=True)  # not one of them
    assert [(v.kind, v.reader) for v in run.check()] == [("false-backend", "e1")]
    run.fault("proxy-stall", 2.0, 2.4, procs=["S1"], outage=True)
    assert run.check() == []


def test_it_finds_false_claims_of_ends(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"])
    run.read("r1", 0, [("abA0", 4)], "error", error="StreamFailedError")
    run.read("r2", 0, [("abA0", 4)], "error", error="StreamCancelledError")
    run.read("r3", 0, [], "error", error="BackendError")
    run.read("r4", 0, [], "error", error="ProducerUnavailableError")  # always fair
    run.read(
        "r5", 0, [], "error", error="ResumableStreamError", msg="the stream context was closed"
    )
    assert [(v.kind, v.reader) for v in run.check()] == [
        ("false-failed", "r1"),
        ("false-cancelled", "r2"),
        ("false-backend", "r3"),
        ("false-closed", "r5"),
    ]


def test_it_finds_a_stream_run_without_resumability_while_redis_was_up(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"], start=5.0, end=6.0)
    run.log(
        "W0",
        f"{T + 5:.3f} WARNING resumable_stream: stream 's1' runs without resumability: "
        "the backend failed (Redis connection error: Connection closed by server.)",
    )
    run.fault("kill-replica", 1.0, 5.5, nodes=[2], slots=[])  # touches no stream
    run.fault("failover", 1.0, 2.0, nodes=[1], slots=None)  # planned: Redis answers
    assert run.kinds() == ["false-degrade"]
    run.fault("oom", 4.0, 5.5, nodes=[1])  # Redis refused it: fair
    assert run.kinds() == []


def test_it_finds_a_degraded_streams_ids_resumed_elsewhere(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"], start=1.0)  # elected
    run.produce(["abS0", "cdS0", "efS0"], proc="S1", inst="S1.0.0", start=1.2, rid="e1")
    run.log(
        "S1",
        f"{T + 1.2:.3f} WARNING resumable_stream: stream 's1' runs without "
        "resumability: the backend failed (Redis error: OOM)",
    )
    run.fault("oom", 1.0, 1.5, nodes=[1])  # Redis refused the election: a fair degrade
    # Cut after one event, resumed elsewhere: the elected producer's text from there.
    run.session("e1", None, [("4", "message", "abS0"), ("8", "message", "cdA0")], {"end": "204"})
    # Cut after two events, resumed elsewhere: 204, "nothing more".
    run.session("e2", None, [("4", "message", "abS0"), ("8", "message", "cdS0")], {"end": "204"})
    assert [(v.kind, v.reader) for v in run.check()] == [
        ("spliced-resume", "e1"),
        ("degraded-resume", "e2"),
    ]


def test_a_degraded_streams_ids_that_say_so_are_fair(tmp_path: Path) -> None:
    """Ids `0.<offset>` (the stream ran without resumability): a reconnect told `incomplete` is
    fair; a follower with a cursor of its own, which never saw the stream, may get a 204."""
    run = Run(tmp_path)
    run.produce(["abS0", "cdS0"], proc="S1", inst="S1.0.0", start=1.2, rid="e1")
    run.log(
        "S1",
        f"{T + 1.2:.3f} WARNING resumable_stream: stream 's1' runs without "
        "resumability: the backend failed (Redis error: OOM)",
    )
    run.fault("oom", 1.0, 1.5, nodes=[1])
    incomplete = {"end": "error", "data": '{"code": "incomplete", "message": "lost"}'}
    run.session("e1", None, [("0.4", "message", "abS0")], incomplete)
    run.session("e2", 4, [], {"end": "204"})  # a follower: nothing of it in Redis
    assert run.check() == []
    # The same ids cut short by a 204 still are a violation.
    run.session("e3", None, [("0.4", "message", "abS0")], {"end": "204"})
    assert [(v.kind, v.reader) for v in run.check()] == [("degraded-resume", "e3")]


def test_it_finds_reconnects_answered_200_with_nothing(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"])
    run.session("e1", 4, [("8", "message", "cdA0")], {"end": "204"})
    run.write("C0", "sess-start", 2.0, rid="e2", sid="s1", dep="mem", creates=False, offset=8)
    for t in (2.1, 2.2, 2.3):  # at its end: 200, no event, the body ends; again
        run.write("C0", "sess-conn", t, rid="e2", server=0, cursor="8")
        run.write("C0", "sess-eof", t + 0.01, rid="e2", cursor="8")
    run.write("C0", "sess-conn", 2.4, rid="e2", server=0, cursor="8")
    run.write("C0", "sess-end", 2.5, rid="e2", end="204", cursor="8")
    assert [(v.kind, v.reader) for v in run.check()] == [("empty-200", "e2")]


def test_it_finds_a_reader_that_never_got_its_end(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"], end=2.0)
    run.read("r1", 0, [("abA0", 4)], "stopped", until=100.0)
    run.read("r2", 0, [("abA0", 4), ("cdA0", 8)], "stop", until=90.0)
    assert [(v.kind, v.reader) for v in run.check()] == [("hang", "r1"), ("slow-end", "r2")]


def test_it_finds_errors_in_the_logs_and_untyped_exceptions(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.produce(["abA0", "cdA0"])
    run.log("W0", f"{T + 1:.3f} WARNING resumable_stream: stream 's1' failed")
    run.log("W0", "Traceback (most recent call last):")
    run.log("W0", '  File "x.py", line 1, in f')
    run.log("W0", "chaos.campaign._produce.PlannedFailure: stream s1 fails as planned")
    run.log("W1", f"{T + 2:.3f} ERROR resumable_stream: a helper task of stream 's1' failed")
    run.log("S0", "ERROR:    Exception in ASGI application")
    run.write("W1", "untyped", 2.0, what="cancel", sid="s1", error="RuntimeError", msg="boom")
    assert sorted(run.kinds()) == ["logged-error", "logged-error", "untyped"]


def test_the_plan_is_the_seeds(tmp_path: Path) -> None:
    for topology in ("server", "sentinel", "cluster"):
        plan = make_plan(7, topology, 60.0, 4)
        assert load(dump(plan)) == plan
        assert make_plan(7, topology, 60.0, 4) == plan
        assert make_plan(8, topology, 60.0, 4) != plan
        kinds = {f.kind for f in plan.faults}
        assert {"kill-proc", "client-kill"} <= kinds, kinds
    assert replace(plan, seed=8).prefix == "campaign8"


# Short campaigns on real processes


def _seed(topology: str, fixed: int | None) -> int:
    chosen = os.environ.get(f"CAMPAIGN_SEED_{topology.upper()}")
    if chosen:
        return int(chosen)
    if fixed is not None:
        return fixed
    seed = random.SystemRandom().randrange(1 << 31)
    print(f"fresh random seed for the {topology} campaign: {seed}")
    return seed


# Fixed seeds on the server and on Sentinel (CAMPAIGN_SEED_<TOPOLOGY> picks another). Fresh
# ones found what is not triaged yet (the server's seed 21149550, a degraded-resume; the
# cluster's 30-minute run, benchmarks/README.md "Chaos campaign"), which would fail CI now and
# then for what is known and open. The cluster's short campaign runs only when asked for
# (CAMPAIGN_CLUSTER=1, with a fresh seed).
_TOPOLOGIES: list[tuple[str, int | None]] = [("server", 1), ("sentinel", 2)]
if os.environ.get("CAMPAIGN_CLUSTER") == "1":
    _TOPOLOGIES.append(("cluster", None))


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("topology", "fixed"), _TOPOLOGIES)
def test_a_short_campaign(topology: str, fixed: int | None, tmp_path: Path) -> None:
    try:
        server_binary()
    except FileNotFoundError as exc:
        # Never a skip: CI's campaign would pass without having run (issue 22, item 3).
        pytest.fail(f"no Redis-protocol server for the campaign: {exc}")
    seed = _seed(topology, fixed)
    duration = os.environ.get("CAMPAIGN_DURATION", "35")
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "chaos.campaign", "run", "--topology", topology,
        "--duration", duration, "--seed", str(seed), "--report", str(report),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Its own process group: whatever happens here, the campaign and everything it started go.
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    began = time.monotonic()
    try:
        out, _ = process.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
        pytest.fail(f"the {topology} campaign (seed {seed}) did not end in time:\n{out}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    print(out)
    print(f"the {topology} campaign took {time.monotonic() - began:.0f} s")
    if process.returncode == 2:
        pytest.fail(f"the {topology} topology could not start (seed {seed}):\n{out}")
    if not report.exists():
        pytest.fail(f"the {topology} campaign (seed {seed}) wrote no report:\n{out}")
    data = json.loads(report.read_text())
    assert data["streams"] > 10, data
    assert data["readers"] > 20, data
    assert data["faults_total"] > 5, data
    assert process.returncode == 0, (
        f"the {topology} campaign with seed {seed} violated the model; replay it with "
        f"`{data['replay']}`:\n{out}"
    )
