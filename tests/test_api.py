"""The public surface, pinned."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import resumable_stream as rs


def test_public_names_are_pinned() -> None:
    assert rs.__all__ == sorted(rs.__all__)
    assert rs.__all__ == [
        "Backend",
        "BackendError",
        "Connection",
        "ContextStats",
        "Event",
        "MemoryBackend",
        "ProducerConflictError",
        "ProducerLostError",
        "ProducerUnavailableError",
        "ResumableStream",
        "ResumableStreamContext",
        "ResumableStreamError",
        "SlowReaderError",
        "StreamCancelledError",
        "StreamExistsError",
        "StreamFailedError",
        "StreamIncompleteError",
        "StreamNotCancellableError",
        "StreamRestartedError",
        "StreamWriter",
        "SyncResumableStream",
        "SyncResumableStreamContext",
        "SyncStreamWriter",
        "create_resumable_stream_context",
        "create_sync_context",
        "new_stream_id",
    ]
    for name in rs.__all__:
        assert getattr(rs, name).__module__.startswith("resumable_stream")


def test_every_error_derives_from_the_base_class() -> None:
    for error in (
        rs.BackendError,
        rs.ProducerUnavailableError,
        rs.StreamCancelledError,
        rs.StreamFailedError,
        rs.StreamIncompleteError,
    ):
        assert issubclass(error, rs.ResumableStreamError)
    assert issubclass(rs.ProducerUnavailableError, TimeoutError)
    assert issubclass(rs.BackendError, ConnectionError)


def test_importing_needs_only_anyio() -> None:
    code = (
        "import sys, resumable_stream; "
        "print(sorted(m for m in ('redis', 'fakeredis', 'httpx', 'starlette') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_context_is_in_memory_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with caplog.at_level(logging.WARNING, logger="resumable_stream"):
        ctx = rs.create_resumable_stream_context()
    assert isinstance(ctx._backend, rs.MemoryBackend)
    assert "resumable only inside this process" in caplog.text


def test_redis_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from resumable_stream.redis import RedisBackend

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    ctx = rs.create_resumable_stream_context(key_prefix="app")
    assert isinstance(ctx._backend, RedisBackend)
    assert isinstance(rs.create_resumable_stream_context("redis://h:1/0")._backend, RedisBackend)


@pytest.mark.parametrize(
    "options",
    [
        {"key_prefix": ""},
        {"ttl": 0},
        {"ttl": 1.5},
        {"resume_timeout": 0},
        {"max_message_size": 0},
        {"drain_timeout": -1},
        {"redis": "redis://h", "backend": rs.MemoryBackend()},
    ],
    ids=repr,
)
def test_invalid_options_raise_value_error(options: dict[str, object]) -> None:
    options.setdefault("backend", rs.MemoryBackend())
    with pytest.raises(ValueError, match=r"must|either"):
        rs.create_resumable_stream_context(**options)  # type: ignore[arg-type]


def test_the_console_script_runs_the_command_line() -> None:
    from importlib.metadata import entry_points

    from resumable_stream.__main__ import main

    [script] = entry_points(group="console_scripts", name="resumable-stream")
    assert script.load() is main
