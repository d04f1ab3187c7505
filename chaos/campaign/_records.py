"""What every process of a campaign records, and how the checker reads it back.

Each process incarnation appends JSON lines to `<records>/<name>.<incarnation>.jsonl`, one
object per event, written and flushed before the event is acted on (a producer records a chunk
before it hands it to the engine), so a SIGKILL loses nothing that happened. Every line has
`k` (its kind) and `t` (`time.time()` when it was written); the kinds:

- producers: `inst-start` (inst, sid, dep, kind, attempt, rid: the read or session whose call
  elected it, if any), `inst-chunk` (inst, text, event), `inst-end` (inst, how: done | failed |
  cancelled; a later one replaces an earlier one), `writer-refused` (sid, error, msg);
- library readers: `read-start` (rid, sid, dep, api, offset, mode), `read-open` (rid, attempt),
  `read-chunks` (rid, items: [text, end offset or null, event name or null]), `read-end` (rid,
  end: stop | none | error | untyped | detached | stopped, error, msg, phase);
- SSE sessions: `sess-start` (rid, sid, dep, creates, offset), `sess-conn` (rid, server,
  cursor), `sess-events` (rid, items: [id, event, data]), `sess-status` (rid, status, body),
  `sess-drop` (rid, error), `sess-end` (rid, end: 204 | error | http | gave-up | stopped, ...);
- cancels: `cancel` (sid, result), and `untyped` for anything unexpected a task raised.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["Record", "Recorder", "read_records"]

Record = dict[str, Any]


class Recorder:
    """Appends JSON lines to one file, each written through at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, kind: str, /, **fields: Any) -> None:
        line = json.dumps({"k": kind, "t": time.time(), **fields}, ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(folder: Path) -> Iterator[tuple[str, int, Record]]:
    """(process, incarnation, record) for every line of every file in `folder`. A last line
    cut short by a SIGKILL is skipped."""

    def order(path: Path) -> tuple[str, int]:
        name, _, incarnation = path.stem.rpartition(".")
        return name, int(incarnation)

    for path in sorted(folder.glob("*.jsonl"), key=order):
        name, incarnation = order(path)
        with path.open(encoding="utf-8") as file:
            for line in file:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                yield name, incarnation, record
