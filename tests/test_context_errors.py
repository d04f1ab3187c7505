"""An exception raised inside `async with ctx:` comes out as itself, not in an exception group,
on every backend; several failures at once stay a group."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

import resumable_stream as rs
from resumable_stream._backend import MessageHandler, ReconnectHandler

from .conftest import Workers

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio


def fail(error: type[Exception]) -> None:
    raise error("raised in the block")


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


@pytest.mark.parametrize("error", [ValueError, rs.BackendError, KeyError], ids=lambda e: e.__name__)
async def test_an_exception_in_the_block_comes_out_as_itself(
    workers: Workers, error: type[Exception]
) -> None:
    # `except BackendError:` around the block must match: it never did, as the context's
    # task group (and on Redis the connection's as well) wrapped it in a group.
    with pytest.raises(error) as caught:
        async with workers.context():
            fail(error)
    assert caught.traceback[-1].name == "fail"  # its own traceback, down to where it was raised


async def test_its_cause_and_context_are_kept(workers: Workers) -> None:
    async def block() -> None:
        async with workers.context():
            try:
                fail(KeyError)
            except KeyError as exc:
                raise rs.BackendError("lookup failed") from exc

    with pytest.raises(rs.BackendError) as caught:
        await block()
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.__context__ is caught.value.__cause__  # not the group it came out of


async def test_a_backend_connection_lets_the_exception_out_as_itself(workers: Workers) -> None:
    with pytest.raises(ValueError, match="raised in the block"):
        async with workers.backends[1].connect(lambda channel, message: None):
            fail(ValueError)


class FailsWhileClosing:
    """A backend whose connection fails as it closes: a second failure, at the same time."""

    def __init__(self) -> None:
        self._backend = rs.MemoryBackend()

    @asynccontextmanager
    async def connect(
        self, on_message: MessageHandler, on_reconnect: ReconnectHandler | None = None
    ) -> AsyncIterator[rs.Connection]:
        connect = self._backend.connect(on_message, on_reconnect)
        async with connect as connection, anyio.create_task_group() as tg:
            tg.start_soon(self._fail_when_cancelled)
            try:
                yield connection
            finally:
                tg.cancel_scope.cancel()

    async def _fail_when_cancelled(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            raise rs.BackendError("the connection failed while closing")


# Not about a backend: asyncio and trio are enough.
in_memory = pytest.mark.parametrize("flavor", ["memory", "memory-trio"], indirect=True)


@in_memory
async def test_a_failure_on_its_own_comes_out_as_itself() -> None:
    with pytest.raises(rs.BackendError, match="while closing"):
        async with rs.ResumableStreamContext(backend=FailsWhileClosing()):
            pass


@in_memory
async def test_several_failures_at_once_stay_a_group() -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        async with rs.ResumableStreamContext(backend=FailsWhileClosing()):
            fail(ValueError)
    assert sorted(type(exc).__name__ for exc in leaves(caught.value)) == [
        "BackendError",
        "ValueError",
    ]
