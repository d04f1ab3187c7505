"""ASGI plumbing shared by the endpoints: request cursors, authorization, framing, replies."""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl

from . import _protocol as p
from ._buffer import Entry
from ._context import ResumableStreamContext
from ._event import Event
from ._exceptions import (
    BackendError,
    ProducerLostError,
    ResumableStreamError,
    SlowReaderError,
    StreamCancelledError,
    StreamFailedError,
    StreamIncompleteError,
    StreamRestartedError,
)
from .sse import encode_event

logger = logging.getLogger("resumable_stream")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

Authorize = Callable[[Scope, str], bool | Awaitable[bool]]
"""`authorize(scope, stream_id)`: may this request create, read or stop that stream?"""

Headers = Mapping[str, str] | Iterable[tuple[str, str]]
"""Extra response headers: a mapping (Starlette's form) or `(name, value)` pairs."""

RequestHeaders = Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]]
"""A request's headers as any framework holds them: a mapping (names in any case), `(name,
value)` pairs of `str`, or ASGI's pairs of `bytes`."""

Query = str | bytes | Mapping[str, str] | Iterable[tuple[str, str]]
"""A request's query: the raw query string (`str` or ASGI's `bytes`), or its parsed pairs."""

DEFAULT_KEEPALIVE_FRAME = b": keep-alive\n\n"

# Names are RFC 9110 tokens; values are what HTTP/1.1 servers (h11) send: visible Latin-1
# characters, with spaces and tabs only between them.
_HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")

_MAX_CURSOR_DIGITS = 18  # anything longer is not an offset this library could have sent
# The id of the frame that ends a stream badly: a reconnect that carries it has seen the end.
END_ID: Final = "end"


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a request resumes: the character offset (in the stream's `attempt`), or just
    after the stream's end frame."""

    offset: int
    seen_end: bool = False
    attempt: int = 1


def context_of(
    context: ResumableStreamContext | Callable[[Scope], ResumableStreamContext], scope: Scope
) -> ResumableStreamContext:
    return context if isinstance(context, ResumableStreamContext) else context(scope)


async def allowed(
    authorize: Callable[[Any, str], bool | Awaitable[bool]] | None, request: Any, stream_id: str
) -> bool:
    """`authorize(request, stream_id)`'s verdict (awaited if need be); only `True` allows."""
    if authorize is None:
        return True
    verdict = authorize(request, stream_id)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return verdict is True


def check_options(keepalive: float | None, retry: int | None) -> None:
    if keepalive is not None and not keepalive > 0:
        raise ValueError(f"keepalive must be > 0 seconds or None, got {keepalive!r}")
    if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int) or retry < 0):
        raise ValueError(f"retry must be a non-negative int (milliseconds), got {retry!r}")


def check_callables(**callables: object) -> None:
    for name, value in callables.items():
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, not {type(value).__name__}")


def check_frame(frame: object) -> bytes:
    """The keep-alive frame, checked: it is sent between events, so it must end as one does."""
    if not isinstance(frame, bytes):
        raise TypeError(f"keepalive_frame must be bytes (an SSE frame), not {type(frame).__name__}")
    if not frame.endswith((b"\n\n", b"\r\r", b"\r\n\r\n")):
        # Without its blank line it would run into the next event and corrupt it.
        raise ValueError(f"keepalive_frame must end with a blank line, got {frame!r}")
    return frame


def check_headers(headers: Headers | None) -> list[tuple[str, str]]:
    """Extra response headers as `(name, value)` pairs, checked while the response is built:
    a server refuses a bad one only once the stream runs, and the client then gets a 500."""
    if headers is None:
        return []
    items: Iterable[object] = headers.items() if isinstance(headers, Mapping) else headers
    checked = []
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(f"headers must be a mapping or (name, value) pairs, got {item!r}")
        name, value = item
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"header names and values must be str, got {name!r}: {value!r}")
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if not _HEADER_VALUE.fullmatch(value):
            raise ValueError(f"invalid value for header {name!r}: {value!r}")
        checked.append((name, value))
    return checked


def resume_cursor(scope: Scope) -> int | None:
    """The offset a request resumes from: its `Last-Event-ID` header, else `?resumeAt=`.

    Raises `ValueError` with a message fit for a 400 response if either is malformed.
    """
    cursor = request_cursor(scope)
    return None if cursor is None else cursor.offset


def request_cursor(scope: Scope, id_prefix: str = "") -> Cursor | None:
    """The ASGI request's cursor (see `parse_cursor`)."""
    return parse_cursor(scope.get("headers", ()), scope.get("query_string", b""), id_prefix)


def parse_cursor(headers: RequestHeaders, query: Query, id_prefix: str = "") -> Cursor | None:
    """The request's cursor: `Last-Event-ID`, else `?resumeAt=`; None if it has none.

    Both hold an event id this library sent: `<id_prefix><offset>`, or `<id_prefix>end` for
    the frame that ends a stream badly (the offset alone is accepted too); in a stream's later
    attempts (a writer's `restart=True`) the offset or `end` comes after `<attempt>.`, and in
    a stream that ran without resumability after `0.` (a reconnect with it learns that its
    text cannot be resumed).
    """
    raw = find_cursor(headers, query)
    if raw is None:
        return None
    name, value = raw
    if id_prefix and value.startswith(id_prefix):
        value = value[len(id_prefix) :]
    shown = value if len(value) <= 40 else value[:40] + "..."
    try:
        attempt, value = p.split_cursor(value)
    except ValueError:
        raise ValueError(
            f"{name} must be a character offset (the id of an event of this stream), got {shown!r}"
        ) from None
    if value == END_ID:
        return Cursor(0, seen_end=True, attempt=attempt)
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_CURSOR_DIGITS:
        raise ValueError(
            f"{name} must be a character offset (the id of an event of this stream), got {shown!r}"
        )
    return Cursor(int(value), attempt=attempt)


def cursor_value(scope: Scope) -> tuple[str, str] | None:
    """(where it came from, the raw value) of the ASGI request's cursor, unparsed."""
    return find_cursor(scope.get("headers", ()), scope.get("query_string", b""))


def find_cursor(headers: RequestHeaders, query: Query) -> tuple[str, str] | None:
    """(where it came from, the raw value) of a request's cursor, unparsed: the first non-empty
    `Last-Event-ID` header, else the one `resumeAt` query parameter (ValueError if several)."""
    value = header_value(headers, "last-event-id")
    if value:
        return "Last-Event-ID", value
    values = [value for name, value in query_pairs(query) if name == "resumeAt"]
    if len(values) > 1:
        raise ValueError("give resumeAt at most once")
    return ("resumeAt", values[0]) if values else None


def header_value(headers: RequestHeaders, name: str) -> str | None:
    """The first non-empty value of header `name` (lower case), bytes read as Latin-1 (as
    HTTP/1.1 servers hand them over); None if there is none."""
    encoded = name.encode("latin-1")
    items: Iterable[tuple[str | bytes, str | bytes]]
    items = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in items:
        if not value:
            continue
        if isinstance(key, bytes):
            if key.lower() != encoded:
                continue
        elif key.lower() != name:
            continue
        return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def query_pairs(query: Query) -> list[tuple[str, str]]:
    """The query's (name, value) pairs: a raw query string is parsed as `parse_qsl` does (blank
    values kept; raw bytes read as Latin-1, percent-escapes as UTF-8)."""
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    if isinstance(query, str):
        return parse_qsl(query, keep_blank_values=True)
    if isinstance(query, Mapping):
        return [(str(name), str(value)) for name, value in query.items()]
    return [(str(name), str(value)) for name, value in query]


def last_path_segment(scope: Scope) -> str:
    path: str = scope.get("path", "")
    return path.rstrip("/").rpartition("/")[2]


def sse_body(entries: list[Entry], id_prefix: str = "") -> bytes:
    parts = []
    for item, end in entries:
        if type(item) is str:
            if "\n" in item or "\r" in item:
                parts.append(encode_event(item, id=f"{id_prefix}{end}"))
            else:
                parts.append(f"id: {id_prefix}{end}\ndata: {item}\n\n")
        else:
            assert isinstance(item, Event)
            event_id = f"{id_prefix}{end}"
            parts.append(encode_event(item.data, event=item.event, id=event_id, retry=item.retry))
    # A lone surrogate cannot be sent as UTF-8; "?" keeps the character count, hence the offsets.
    return "".join(parts).encode("utf-8", "replace")


def raw_body(entries: list[Entry]) -> bytes:
    return "".join(
        [item if type(item) is str else item.data for item, _ in entries]  # type: ignore[union-attr]
    ).encode("utf-8", "replace")


_ERROR_CODES: tuple[tuple[type[ResumableStreamError], str, str], ...] = (
    (StreamFailedError, "failed", "the stream failed"),
    (StreamCancelledError, "cancelled", "the stream was cancelled"),
    (ProducerLostError, "producer_lost", "the stream's producer stopped before the end"),
    (StreamIncompleteError, "incomplete", "part of the stream was lost; resume to retry"),
    (SlowReaderError, "too_slow", "this reader fell too far behind; resume to catch up"),
    (BackendError, "unavailable", "the stream store is unavailable"),
)


def error_info(exc: ResumableStreamError) -> tuple[str, str]:
    """A stable code and a safe message; the exception's own text stays in the log."""
    for kind, code, message in _ERROR_CODES:
        if isinstance(exc, kind):
            return code, message
    return "error", "the stream ended with an error"


def error_frame(exc: ResumableStreamError, id_prefix: str = "", attempt: int = 1) -> bytes:
    """The frame that ends a stream badly. Its own id makes the reconnect that follows it (an
    `EventSource` always reconnects) answer 204, which stops the client.

    A restart (a newer attempt replaced the one being read) is `restart_frame` instead."""
    if isinstance(exc, StreamRestartedError):
        return restart_frame(exc, id_prefix)
    id_prefix += p.attempt_prefix(attempt)
    code, message = error_info(exc)
    logger.info("stream ended with %s: %s", code, exc)
    data = json.dumps({"code": code, "message": message})
    return encode_event(data, event="error", id=f"{id_prefix}{END_ID}").encode()


def restart_frame(exc: StreamRestartedError, id_prefix: str = "") -> bytes:
    """The frame that tells a reader that the stream was started again: `event: restart`,
    `data: {"attempt": n}`, and the id of the new attempt's start, so that the reconnect that
    follows (an `EventSource` reconnects by itself) reads the new attempt from there."""
    logger.info("stream restarted: %s", exc)
    data = json.dumps({"attempt": exc.attempt})
    start = f"{id_prefix}{p.attempt_prefix(exc.attempt)}0"
    return encode_event(data, event="restart", id=start).encode()


async def body(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


class WholeResponse(Protocol):
    """An answer that is not streamed (`http.PreparedResponse` is one): this module is below
    `http`, which uses it, so it names the shape, not the class."""

    status: int
    headers: list[tuple[str, str]]
    content: bytes


async def send_whole(response: WholeResponse, send: Send) -> None:
    """An answer that is not streamed: status, headers and the whole body."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.content})


async def plain(
    send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": text.encode("utf-8", "replace")})
