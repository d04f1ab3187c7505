"""Streamed responses that survive dropped connections and serve extra viewers."""

from ._backend import Backend, Connection, MemoryBackend
from ._context import ContextStats, ResumableStreamContext, create_resumable_stream_context
from ._event import Event
from ._exceptions import (
    BackendError,
    ProducerConflictError,
    ProducerLostError,
    ProducerUnavailableError,
    ResumableStreamError,
    SlowReaderError,
    StreamCancelledError,
    StreamExistsError,
    StreamFailedError,
    StreamIncompleteError,
    StreamNotCancellableError,
    StreamRestartedError,
)
from ._protocol import new_stream_id
from ._reader import ResumableStream
from ._sync import (
    SyncResumableStream,
    SyncResumableStreamContext,
    SyncStreamWriter,
    create_sync_context,
)
from ._version import __version__ as __version__
from ._writer import StreamWriter

__all__ = [
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
