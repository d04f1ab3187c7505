"""The backend's own tasks, which outlive a cancellation of the block that runs the context.

A context's cleanup (its producers' ends, their unsubscriptions) writes to Redis through the
connection's tasks: the task that sends the commands, the subscriber's reader and sender. Were
they cancelled with the block that runs the context (a task group cancelled around it, a
server shutting down), that cleanup could only wait for its deadline, write nothing, and take
that long. So each runs in a shielded scope of its own, and the connection stops them itself,
once the context is done with it (`stop`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

__all__ = ["Tasks"]


class Tasks:
    def __init__(self) -> None:
        self._tg: TaskGroup | None = None
        self._scopes: dict[anyio.CancelScope, None] = {}  # an ordered set
        self._stopped = False

    def start(self, tg: TaskGroup) -> None:
        """Run the tasks spawned from now on in `tg`."""
        self._tg = tg

    def spawn(self, task: Callable[..., Awaitable[None]], *args: object) -> None:
        if self._tg is not None and not self._stopped:
            self._tg.start_soon(self._run, task, *args)

    async def _run(self, task: Callable[..., Awaitable[None]], *args: object) -> None:
        with anyio.CancelScope(shield=True) as scope:
            if self._stopped:
                return
            self._scopes[scope] = None
            try:
                await task(*args)
            finally:
                del self._scopes[scope]

    def stop(self) -> None:
        """Stop every task (the connection is closing), and start none from now on."""
        self._stopped = True
        for scope in list(self._scopes):
            scope.cancel()
