"""Redis errors translated at the boundary, and the deadline every Redis operation gets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import redis.exceptions
from redis.backoff import AbstractBackoff

from .._exceptions import BackendError

RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@contextmanager
def map_exceptions() -> Iterator[None]:
    """Translate redis-py errors into ours: no `redis.*` exception leaks out."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise BackendError(f"Redis error: {exc}") from exc
    except OSError as exc:
        raise BackendError(f"Redis connection error: {exc}") from exc


@contextmanager
def broken_connection() -> Iterator[None]:
    # redis-py's PubSub, used while its connection is being torn down (after a read was
    # cancelled, say), fails with AttributeError or RuntimeError rather than a RedisError.
    try:
        yield
    except (AttributeError, RuntimeError) as exc:
        raise BackendError(f"the Redis subscriber connection is broken: {exc!r}") from exc


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Bound a Redis operation by `command_timeout`; a stall becomes a `BackendError`."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError as exc:
        raise BackendError(
            f"Redis did not answer {what} within {seconds}s (command_timeout)"
        ) from exc


def text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def delay_after(failures: int) -> float:
    return RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]


class NoBackoff(AbstractBackoff):
    """No wait between attempts (redis-py's own `NoBackoff` is unannotated before 6.0)."""

    def compute(self, failures: int) -> float:
        return 0.0
