"""The campaign's command line.

    python -m chaos.campaign run --topology {server,sentinel,cluster} --duration SECONDS
        --seed N [--processes K] [--report FILE.json] [--keep DIR] [--wait-bound SECONDS]
    python -m chaos.campaign check DIR [--explain READER]

`run` runs one campaign, prints its report (streams, readers, faults of each kind, violations
with their context, the longest wait for an end, the command that replays it) and exits 1 if
the run violated the model, 2 if the campaign itself could not start (a topology, a process).
`--keep DIR` keeps the run's records and logs there (else they go with a temp dir); `check`
checks a kept run again, and `--explain` prints one reader's records and its stream's
producer instances.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ._check import Checked, check
from ._plan import TOPOLOGIES, Plan, load, make_plan
from ._records import read_records
from ._run import RunOutcome, SetupError, execute, restore

__all__ = ["main", "replay_command"]


def replay_command(plan: Plan) -> str:
    return shlex.join([
        "python", "-m", "chaos.campaign", "run", "--topology", plan.topology,
        "--duration", f"{plan.duration:g}", "--seed", str(plan.seed),
        "--processes", str(len(plan.workers)),
    ])  # fmt: skip


def report(plan: Plan, outcome: RunOutcome, checked: Checked, elapsed: float) -> dict[str, Any]:
    faults = Counter(f.kind for f in outcome.faults)
    failed = Counter(f.kind for f in outcome.faults if f.error)
    kinds = Counter(v.kind for v in checked.violations)
    return {
        "seed": plan.seed,
        "topology": plan.topology,
        "duration": plan.duration,
        "processes": len(plan.workers),
        "elapsed": round(elapsed, 1),
        "settings": asdict(plan.settings),
        "streams": checked.streams,
        "instances": checked.instances,
        "readers": checked.readers,
        "library_readers": checked.library_readers,
        "sse_readers": checked.sse_readers,
        "outcomes": dict(sorted(checked.outcomes.items())),
        "unavailable_answers": checked.unavailable,
        "faults": dict(sorted(faults.items())),
        "faults_total": sum(faults.values()),
        "faults_not_carried_out": dict(sorted(failed.items())),
        "violations_by_kind": dict(sorted(kinds.items())),
        "violations": [asdict(v) for v in checked.violations],
        "warnings": [asdict(v) for v in checked.warnings],
        "longest_wait": round(checked.longest_wait, 3),
        "longest_wait_reader": checked.longest_wait_reader,
        "processes_not_idle": outcome.not_idle,
        "notes": outcome.notes,
        "replay": replay_command(plan),
        "replay_note": (
            "the same seed gives the same plan and fault schedule; the exact interleavings "
            "of real processes on real sockets are not reproducible"
        ),
    }


def summary(data: dict[str, Any]) -> str:
    def counts(mapping: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in mapping.items()) or "none"

    lines = [
        f"campaign seed {data['seed']} on {data['topology']}, {data['duration']:g} s, "
        f"{data['processes']} workers + 2 SSE servers + 1 SSE client ({data['elapsed']} s)",
        f"  {data['streams']} streams ({data['instances']} producer instances), "
        f"{data['readers']} readers ({data['library_readers']} library, "
        f"{data['sse_readers']} SSE)",
        f"  faults ({data['faults_total']}): {counts(data['faults'])}",
        f"  reader ends: {counts(data['outcomes'])}",
        f"  'try again' answers (ProducerUnavailableError, 503): {data['unavailable_answers']}",
        f"  longest wait for an end after its producer's: {data['longest_wait']:.2f} s "
        f"({data['longest_wait_reader'] or '-'})",
    ]
    if data["faults_not_carried_out"]:
        lines.append(f"  faults not carried out: {counts(data['faults_not_carried_out'])}")
    for note in data["notes"]:
        lines.append(f"  note: {note}")
    lines.append(f"  violations: {counts(data['violations_by_kind'])}")
    warnings = Counter(w["kind"] for w in data["warnings"])
    lines.append(f"  warnings: {counts(dict(warnings))}")
    for violation in [*data["violations"][:50], *data["warnings"][:10]]:
        where = " ".join(x for x in (violation["reader"], violation["stream"]) if x)
        lines.append(f"  - {violation['kind']}: {where}: {violation['detail']}")
        for fault in violation["faults"][-6:]:
            lines.append(f"      fault: {fault}")
        for record in violation["records"][-12:]:
            lines.append(f"      record: {record[:300]}")
        for line in violation["logs"][-12:]:
            lines.append(f"      log: {line[:300]}")
    if len(data["violations"]) > 50:
        lines.append(f"  ... and {len(data['violations']) - 50} more (see the JSON report)")
    lines.append(f"replay: {data['replay']}")
    lines.append(f"  ({data['replay_note']})")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    plan = make_plan(args.seed, args.topology, args.duration, args.processes)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    log(
        f"seed {plan.seed}: {len(plan.streams)} streams, {len(plan.reads)} library reads, "
        f"{len(plan.sessions)} SSE sessions, {len(plan.faults)} faults planned"
    )
    if args.keep:
        folder = Path(args.keep)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        keep = True
    else:
        folder = Path(tempfile.mkdtemp(prefix="rs-campaign-"))
        keep = False
    try:
        try:
            outcome = execute(plan, folder, log)
        except SetupError as exc:
            print(f"the campaign could not start: {exc}", file=sys.stderr, flush=True)
            return 2
        log("checking")
        checked = check(
            plan,
            folder,
            outcome.faults,
            outcome.crashes,
            outcome.leaks,
            outcome.t_stop,
            args.wait_bound,
        )
        data = report(plan, outcome, checked, time.monotonic() - started)
        if args.report:
            Path(args.report).write_text(json.dumps(data, indent=1, ensure_ascii=False))
        print(summary(data), flush=True)
        return 1 if checked.violations else 0
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def _check(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    plan = load((folder / "plan.json").read_text(encoding="utf-8"))
    if args.explain:
        _explain(folder, args.explain)
        return 0
    outcome = restore(plan, folder)
    checked = check(
        plan,
        folder,
        outcome.faults,
        outcome.crashes,
        outcome.leaks,
        outcome.t_stop,
        args.wait_bound,
    )
    data = report(plan, outcome, checked, outcome.t_stop - outcome.t0)
    if args.report:
        Path(args.report).write_text(json.dumps(data, indent=1, ensure_ascii=False))
    print(summary(data))
    return 1 if checked.violations else 0


def _explain(folder: Path, rid: str) -> None:
    """A reader's records, and every record of its stream's producer instances."""
    mine = [
        r
        for _, _, r in read_records(folder / "records")
        if str(r.get("rid", "")).split("+")[0] == rid
    ]
    if not mine:
        print(f"no reader {rid}")
        return
    sid, dep = mine[0]["sid"], mine[0]["dep"]
    instances = set()
    for _proc, _inc, record in read_records(folder / "records"):
        if record["k"] == "inst-start" and (record["sid"], record["dep"]) == (sid, dep):
            instances.add(record["inst"])
    lines = []
    for proc, inc, record in read_records(folder / "records"):
        if (
            record in mine
            or record.get("inst") in instances
            or (record["k"].startswith("cancel") and record.get("sid") == sid)
        ):
            lines.append((record["t"], f"{proc}.{inc} {json.dumps(record, ensure_ascii=False)}"))
    for _, line in sorted(lines):
        print(line[:400])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.campaign", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one campaign and check it")
    run.add_argument("--topology", choices=TOPOLOGIES, required=True)
    run.add_argument("--duration", type=float, required=True, help="seconds of faults")
    run.add_argument("--seed", type=int, required=True)
    run.add_argument("--processes", type=int, default=4, help="worker processes (default 4)")
    run.add_argument("--report", help="write the report here as JSON")
    run.add_argument("--keep", help="keep the run's records and logs in this folder")
    run.add_argument(
        "--wait-bound",
        type=float,
        default=60.0,
        help="the longest a reader may wait for its end (default 60 s)",
    )
    again = commands.add_parser("check", help="check a kept run again")
    again.add_argument("folder")
    again.add_argument("--explain", help="print this reader's records and its producers'")
    again.add_argument("--wait-bound", type=float, default=60.0)
    again.add_argument("--report", help="write the report here as JSON")
    args = parser.parse_args(argv)
    return _run(args) if args.command == "run" else _check(args)


if __name__ == "__main__":
    sys.exit(main())
