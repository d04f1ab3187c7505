"""A long-running task behind a platform timeout: `uvicorn examples.task_app:app`.

    curl -N -X POST localhost:8000/tasks/report -d '{"month": "2026-11"}'
    python -c 'import anyio; from resumable_stream.client import run_task; \\
        print(anyio.run(run_task, "http://127.0.0.1:8000/tasks/report", {"month": "2026-11"}))'

The task runs as a resumable stream: `wait` events while it works, then `settle` with its
result. A client that drops reconnects with `X-Task-Id` and `Last-Event-ID` (any worker, with
`REDIS_URL`) and still gets the result; `POST /stop/<task id>` stops it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.routing import Route

from resumable_stream import create_resumable_stream_context
from resumable_stream.asgi import Scope, StopStreamApp
from resumable_stream.tasks import TaskApp, TaskError, TaskRequest


async def report(task_input: Any, request: TaskRequest) -> dict[str, Any]:
    """A stand-in for slow work: one second per step, longer than some proxies' idle limit."""
    month = (task_input or {}).get("month")
    if not isinstance(month, str):
        raise TaskError("give the month as {'month': 'YYYY-MM'}", "BAD_INPUT")
    for _ in range(3):
        await anyio.sleep(1)
    return {"month": month, "total": 42, "task": request.task_id}


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
    async with create_resumable_stream_context() as streams:  # REDIS_URL, else in memory
        yield {"streams": streams}


def streams_of(scope: Scope) -> Any:
    return scope["state"]["streams"]


app = Starlette(
    routes=[
        Route("/tasks/report", TaskApp(streams_of, report), methods=["GET", "POST"]),
        Route("/stop/{task_id}", StopStreamApp(streams_of), methods=["POST"]),
    ],
    lifespan=lifespan,
)
