"""Checks for options given at the edge, and the settings one context's streams share.

Bad options raise `ValueError` naming the option, when the object is built: never later, in
the middle of a stream.
"""

from __future__ import annotations

from dataclasses import dataclass


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """`value` if it is an int (not a bool) of at least `minimum`, else `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_seconds(name: str, value: object, *, zero: bool = False) -> float:
    """`value` if it is a positive number of seconds (or zero, with `zero`)."""
    # `not value >= 0` also refuses NaN; infinity is allowed ("never").
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not zero and not value > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return float(value)


def check_optional_seconds(name: str, value: object) -> float | None:
    return None if value is None else check_seconds(name, value)


def check_make_stream(make_stream: object) -> None:
    if not callable(make_stream):
        raise ValueError("make_stream must be a callable returning an async iterable of str")


def check_resume_at(resume_at: object) -> int:
    """The public API's offset: None (the start) or an int >= 0."""
    if resume_at is None:
        return 0
    if isinstance(resume_at, bool) or not isinstance(resume_at, int):
        raise ValueError(f"resume_at must be an int or None, not {type(resume_at).__name__}")
    if resume_at < 0:
        raise ValueError(f"resume_at must be >= 0, got {resume_at}")
    return resume_at


@dataclass(frozen=True, slots=True)
class Settings:
    """A context's options, shared by every producer and follower it runs."""

    ttl: int = 24 * 60 * 60
    resume_timeout: float = 2.0
    max_message_size: int = 1 << 20
    drain_timeout: float = 30.0
    linger: float = 30.0
    liveness_timeout: float = 3.0
    lost_ttl: int = 60
    max_backlog: int = 64 << 20
    durable: bool = False
    flush_interval: float = 0.02

    def __post_init__(self) -> None:
        check_int("ttl (seconds)", self.ttl)
        check_seconds("resume_timeout", self.resume_timeout)
        check_int("max_message_size", self.max_message_size)
        check_seconds("drain_timeout", self.drain_timeout, zero=True)
        check_seconds("linger", self.linger, zero=True)
        check_seconds("liveness_timeout", self.liveness_timeout)
        check_int("lost_ttl (seconds)", self.lost_ttl)
        check_int("max_backlog", self.max_backlog)
        if not isinstance(self.durable, bool):
            raise ValueError(f"durable must be True or False, got {self.durable!r}")
        check_seconds("flush_interval", self.flush_interval, zero=True)
        if self.flush_interval > 1:
            # Text waits this long before it is stored: what a producer's death may lose.
            raise ValueError(f"flush_interval must be at most 1 second, got {self.flush_interval}")

    @property
    def replay_window(self) -> int:
        """How much text a follower asks for at a time (characters)."""
        return 4 * self.max_message_size

    @property
    def heartbeat(self) -> float:
        """How often an idle producer with followers says it is alive (three per timeout)."""
        return self.liveness_timeout / 3
