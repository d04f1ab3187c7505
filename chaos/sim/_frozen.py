"""Plans written down: a seed's plan frozen in a file, so that a test replays the very workload
that found a defect whatever becomes of the plans that seeds make later (`_plan.py` grows new
kinds of calls and faults, and every seed then makes another plan)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ._plan import CallPlan, ContextPlan, FaultPlan, Plan, ProcessPlan, Step, StreamPlan
from ._redis import LinkProfile

__all__ = ["load_plan", "save_plan"]


def save_plan(plan: Plan, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(plan), indent=1, ensure_ascii=False) + "\n")


def load_plan(path: Path) -> Plan:
    data: dict[str, Any] = json.loads(path.read_text())
    return Plan(
        seed=data["seed"],
        profile=data["profile"],
        processes=tuple(
            ProcessPlan(p["name"], ContextPlan(**p["context"]), LinkProfile(**p["link"]))
            for p in data["processes"]
        ),
        streams=tuple(
            StreamPlan(s["id"], tuple(Step(**step) for step in s["steps"]), s["fails"])
            for s in data["streams"]
        ),
        calls=tuple(CallPlan(**c) for c in data["calls"]),
        faults=tuple(FaultPlan(**f) for f in data["faults"]),
        settle=data["settle"],
    )
