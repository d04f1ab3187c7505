"""A one-shot event for the Redis backend, which runs on asyncio only (as redis-py does)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


class Done:
    """Set once; awaited by the one task that asked for the result.

    A bare future rather than `anyio.Event`: each command and subscription makes one, and
    waiting for one that is set already costs no loop turn (a resume's INCR waits for two
    results in a row). A waiter that is cancelled cancels the future; `set` then does nothing.
    """

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def is_set(self) -> bool:
        return self._future.done()

    def wait(self) -> Awaitable[None]:
        return self._future
