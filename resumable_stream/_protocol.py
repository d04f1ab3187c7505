"""What producers and followers say to each other: names, states, and one type per message.

Every message is one tag byte followed by a JSON array, so no user text can ever be mistaken for
a control message; each message type below has one `pack` and `parse` validates whatever comes
off the wire, so nothing elsewhere reads a message by position:

    Request    Q  follower -> the stream's request channel: send me the text from `resume_at`
    Cancel     C  anyone -> the stream's request channel: stop the stream
    Follow     F  follower -> the request channel: a durable reader is here, heartbeat it
    Replay     R  producer -> the follower's reply channel: a window of text from the offset
    Live       L  producer -> the stream's live channel: chunks as they are produced
    Heartbeat  H  producer -> the live channel, when idle: still alive, at `length`
    Started    S  producer -> the live channel, once: it started (for readers that wait)
    End        E  producer -> the live channel (or a reply channel): how the stream ended

Every message from a producer names it (`producer`, a random token per producer), so a follower
never merges the text of two producers that the backend let run under one id (a sentinel key
evicted by Redis under memory pressure, say).

`start` is the character offset of the first element of `chunks`; an element is a chunk's text,
or `[text, event, retry]` for a chunk yielded as an `Event`. Every element ends on a chunk
boundary, except the last one of a message whose `cont` is true: a chunk too large for one message
continues in the next. A replay is sent in windows of about `window` characters: the last
`Replay` piece of a window carries `upto`, the offset it reaches, and `more` if there is text
beyond; the follower then asks for the next window. A subscriber that falls behind is dropped
by Redis (`client-output-buffer-limit pubsub`), so no replay floods it all at once.
A request with `after_end` asks a finished stream for its tail; only a producer lingering after
the end answers it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from ._event import Event
from ._exceptions import (
    ProducerLostError,
    StreamCancelledError,
    StreamFailedError,
)

MAX_STREAM_ID_LENGTH: Final = 256

DONE: Final = "done"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
LOST: Final = "lost"  # the producer died: recorded by whoever found it gone
TERMINAL_STATES: Final = (DONE, FAILED, CANCELLED, LOST)
RUNNING: Final = "running"
# The sentinel key holds the INCR count while the stream runs, then its terminal state in capitals.
_SENTINEL_VALUES: Final = {state.upper(): state for state in TERMINAL_STATES}

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads

# What travels in a message for one chunk: its text, or [text, event name, retry] for an Event.
WireChunk = str | list[Any]


class Keys:
    """Key and channel names under one prefix; the version segment isolates protocol changes.

    Every name of a stream carries the stream's hash tag (`{<id>}`), so on a Redis Cluster all
    of a stream's keys and channels live in one slot: its state fails over as a unit, and
    whoever publishes to a stream also subscribes in that slot. An id with a brace in it would
    make a broken tag, so it is tagged by a digest of itself (the names still hold the id).
    """

    __slots__ = ("_base",)

    def __init__(self, key_prefix: str) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            # A brace would make every stream's names share one hash tag, hence one slot.
            raise ValueError(f"key_prefix must not contain braces, got {key_prefix!r}")
        self._base = f"{key_prefix}:v3:"

    def _tag(self, stream_id: str) -> str:
        if "{" in stream_id or "}" in stream_id:
            digest = hashlib.sha256(stream_id.encode("utf-8", "surrogatepass")).hexdigest()
            return f"{self._base}{{{digest[:24]}}}{stream_id}"
        return f"{self._base}{{{stream_id}}}"

    def sentinel(self, stream_id: str) -> str:
        return f"{self._tag(stream_id)}:sentinel"

    def request(self, stream_id: str) -> str:
        return f"{self._tag(stream_id)}:request"

    def live(self, stream_id: str) -> str:
        return f"{self._tag(stream_id)}:live"

    def text(self, stream_id: str) -> str:
        """A durable stream's log: its text, in entries of whole chunks."""
        return f"{self._tag(stream_id)}:text"

    def restarts(self, stream_id: str) -> str:
        """How many times the stream was started again (`ctx.writer(..., restart=True)`):
        absent for a stream never restarted, so its attempt is the first."""
        return f"{self._tag(stream_id)}:restarts"

    def alias(self, name: str) -> str:
        """A name that points to a stream (a chat's active stream, say): tagged by the name, so
        on a cluster it lives in the name's slot, whatever the stream's."""
        return f"{self._tag(name)}:alias"

    def reply(self, stream_id: str, context_id: str) -> str:
        """Where a producer answers the requests of one context's followers of the stream, on
        a sharded backend (a cluster): in the stream's slot."""
        return f"{self._tag(stream_id)}:reply:{context_id}"

    def inbox(self, context_id: str) -> str:
        """Where a producer answers the requests of one context's followers, whatever the
        stream, on a backend that is not sharded (one channel, subscribed once)."""
        return f"{self._base}inbox:{context_id}"


def validate_stream_id(stream_id: object) -> str:
    if not isinstance(stream_id, str):
        raise ValueError(f"stream_id must be a str, not {type(stream_id).__name__}")
    if not 0 < len(stream_id) <= MAX_STREAM_ID_LENGTH:
        raise ValueError(
            f"stream_id must be 1 to {MAX_STREAM_ID_LENGTH} characters long, got {len(stream_id)}"
        )
    try:
        stream_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("stream_id must be valid Unicode (it contains a lone surrogate)") from None
    return stream_id


def new_stream_id() -> str:
    """A fresh stream id nobody can guess (192 random bits, URL-safe).

    Stream ids are capabilities: whoever knows one can read the stream. To bind ids to their
    owner, prefix them (`f"{user_id}.{new_stream_id()}"`) and check the prefix in `authorize`.
    """
    return secrets.token_urlsafe(24)


def terminal_state(sentinel: str | None) -> str | None:
    """The terminal state a sentinel value records, or None while running or absent."""
    return None if sentinel is None else _SENTINEL_VALUES.get(sentinel)


def stream_state(sentinel: str | None) -> str | None:
    """The state a sentinel value records: a terminal state, `RUNNING`, or None if absent."""
    return None if sentinel is None else _SENTINEL_VALUES.get(sentinel, RUNNING)


def sentinel_value(state: str) -> str:
    return state.upper()


def split_pieces(
    chunks: list[Any], start: int, limit: int
) -> Iterator[tuple[int, list[Any], bool]]:
    """Group wire chunks into pieces of at most `limit` characters: (start, chunks, cont).

    A chunk longer than `limit` is cut; an event's name travels with its first part.
    """
    piece: list[Any] = []
    size = 0
    for chunk in chunks:
        length = len(chunk) if isinstance(chunk, str) else len(chunk[0])
        if size + length <= limit:
            piece.append(chunk)
            size += length
            continue
        if piece:
            yield start, piece, False
            start += size
            piece, size = [], 0
        if isinstance(chunk, str):
            text, label = chunk, None
        else:
            text, label = chunk[0], chunk[1:]
        while len(text) > limit:
            yield start, [text[:limit] if label is None else [text[:limit], *label]], True
            start += limit
            text, label = text[limit:], None
        piece, size = [text if label is None else [text, *label]], len(text)
    if piece:
        yield start, piece, False


def wire_length(chunks: list[WireChunk]) -> int:
    """The characters of the text that wire chunks hold."""
    return sum(len(chunk) if type(chunk) is str else len(chunk[0]) for chunk in chunks)


def retry_delays() -> Iterator[float]:
    """The waits between tries of a message that reached nobody (a producer not subscribed
    yet, or resubscribing after an outage): 2 ms, doubling, at most 100 ms."""
    delay = 0.002
    while True:
        yield delay
        delay = min(delay * 2, 0.1)


def new_producer_token(attempt: int = 1) -> str:
    """A producer's name on the wire: random, and for a stream's later attempts (a restarted
    writer) prefixed by the attempt (`2.<hex>`), so that a follower tells "a newer attempt"
    from "two producers at once" with no field of its own (the first attempt's tokens are as
    they always were)."""
    token = secrets.token_hex(8)
    return token if attempt == 1 else f"{attempt}.{token}"


def attempt_of(token: str) -> int:
    """The attempt of the producer that `token` names (see `new_producer_token`)."""
    attempt, dot, _ = token.partition(".")
    if not dot:
        return 1
    try:
        return max(1, int(attempt))
    except ValueError:
        return 1


# The "attempt" in the SSE ids of a stream that ran without resumability (its election failed:
# `on_backend_error="degrade"`): no attempt has it, so a reconnect with such an id is told that
# its text cannot be resumed, instead of being served by offset whatever else Redis holds under
# the id (nothing: a 204 that cuts the text short; another producer's text: a splice).
UNRESUMABLE = 0


def attempt_prefix(attempt: int) -> str:
    """What goes before an offset in a cursor of `attempt` (nothing for the first): an SSE id
    `2.15` is offset 15 of the second attempt."""
    return "" if attempt == 1 else f"{attempt}."


def split_cursor(value: str) -> tuple[int, str]:
    """(attempt, the offset's text) of a cursor written as `attempt_prefix(n) + offset`; the
    attempt is `UNRESUMABLE` for an id of a stream that ran without resumability."""
    attempt, dot, offset = value.partition(".")
    if not dot:
        return 1, value
    # The first attempt is written without one: `1.5` is no cursor this library sent.
    if not (attempt.isascii() and attempt.isdigit()) or len(attempt) > 9 or int(attempt) == 1:
        raise ValueError(f"not an attempt: {attempt[:20]!r}")
    return int(attempt), offset


def end_error(stream_id: str, state: str, detail: str | None) -> Exception | None:
    """The exception a reader raises for a stream that ended in `state`, or None if done."""
    if state == FAILED:
        cause = f": its generator raised {detail}" if detail else ""
        return StreamFailedError(f"stream {stream_id!r} failed{cause}")
    if state == CANCELLED:
        return StreamCancelledError(f"stream {stream_id!r} was cancelled")
    if state == LOST:
        return ProducerLostError(f"the producer of stream {stream_id!r} died before its end")
    return None


# Chunks on the wire


def wire_event(event: Event, data: str | None = None) -> list[Any]:
    """An `Event` as a wire chunk, optionally with only part of its data."""
    return [event.data if data is None else data, event.event, event.retry]


_ONLY_TEXT: Final = frozenset({str})


def _check_chunks(chunks: object) -> list[WireChunk]:
    if not isinstance(chunks, list):
        raise ValueError("malformed chunks")
    if set(map(type, chunks)) <= _ONLY_TEXT:
        return chunks  # the common case, checked at C speed (a replay holds many chunks)
    for chunk in chunks:
        if type(chunk) is str:
            continue
        if not (
            isinstance(chunk, list)
            and len(chunk) == 3
            and isinstance(chunk[0], str)
            and (chunk[1] is None or isinstance(chunk[1], str))
            and (chunk[2] is None or (type(chunk[2]) is int and chunk[2] >= 0))
        ):
            raise ValueError("malformed chunk")
    return chunks


# Messages


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("malformed message")
    return value


def _offset(value: object) -> int:
    if type(value) is not int or value < 0:  # not a bool either
        raise ValueError("malformed message")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("malformed message")
    return value


class _Message:
    __slots__ = ()
    TAG: ClassVar[bytes]

    def fields(self) -> list[Any]:
        raise NotImplementedError

    def pack(self) -> bytes:
        return self.TAG + _dumps(self.fields()).encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class Request(_Message):
    """Send `listener` the text from `resume_at` on `reply_to` (about `window` characters of
    it: whole chunks up to the first that reaches that far), then the live chunks.

    `traceparent` (W3C trace context) is the follower's resume span, so that the producer's
    serving of it joins the follower's trace. It is the one optional field: sent only by a
    follower with a span to propagate, so a request without it (from a follower that traces
    nothing, or from an older version) has the five fields it always had.
    """

    TAG: ClassVar[bytes] = b"Q"
    listener: str
    reply_to: str
    resume_at: int
    after_end: bool
    window: int
    traceparent: str | None = None

    def fields(self) -> list[Any]:
        fields = [self.listener, self.reply_to, self.resume_at, self.after_end, self.window]
        if self.traceparent is not None:
            fields.append(self.traceparent)
        return fields

    @classmethod
    def parse(cls, fields: list[Any]) -> Request:
        listener, reply_to, resume_at, after_end, window, *rest = fields
        if _offset(window) < 1 or len(rest) > 1:
            raise ValueError("malformed message")
        traceparent = _str(rest[0]) if rest else None
        return cls(
            _str(listener),
            _str(reply_to),
            _offset(resume_at),
            _flag(after_end),
            window,
            traceparent,
        )


@dataclass(frozen=True, slots=True)
class Cancel(_Message):
    """Stop the stream."""

    TAG: ClassVar[bytes] = b"C"

    def fields(self) -> list[Any]:
        return []

    @classmethod
    def parse(cls, fields: list[Any]) -> Cancel:
        if fields:
            raise ValueError("malformed message")
        return cls()


@dataclass(frozen=True, slots=True)
class Replay(_Message):
    """A piece of the text a follower asked for; the last piece of a window carries `upto`,
    the offset the window reaches, and `more` if the producer has text beyond it."""

    TAG: ClassVar[bytes] = b"R"
    listener: str
    producer: str
    start: int
    chunks: list[WireChunk]
    cont: bool
    upto: int | None
    more: bool = False

    def fields(self) -> list[Any]:
        return [
            *(self.listener, self.producer, self.start, self.chunks),
            *(self.cont, self.upto, self.more),
        ]

    @classmethod
    def parse(cls, fields: list[Any]) -> Replay:
        listener, producer, start, chunks, cont, upto, more = fields
        return cls(
            _str(listener),
            _str(producer),
            _offset(start),
            _check_chunks(chunks),
            _flag(cont),
            None if upto is None else _offset(upto),
            _flag(more),
        )


@dataclass(frozen=True, slots=True)
class Live(_Message):
    """Chunks as they are produced, while somebody follows."""

    TAG: ClassVar[bytes] = b"L"
    producer: str
    start: int
    chunks: list[WireChunk]
    cont: bool

    def fields(self) -> list[Any]:
        return [self.producer, self.start, self.chunks, self.cont]

    @classmethod
    def parse(cls, fields: list[Any]) -> Live:
        producer, start, chunks, cont = fields
        return cls(_str(producer), _offset(start), _check_chunks(chunks), _flag(cont))


@dataclass(frozen=True, slots=True)
class Heartbeat(_Message):
    """The producer is alive and its text is `length` characters long."""

    TAG: ClassVar[bytes] = b"H"
    producer: str
    length: int

    def fields(self) -> list[Any]:
        return [self.producer, self.length]

    @classmethod
    def parse(cls, fields: list[Any]) -> Heartbeat:
        producer, length = fields
        return cls(_str(producer), _offset(length))


@dataclass(frozen=True, slots=True)
class Follow(_Message):
    """A follower reads this stream (a durable one's, from the log, asking the producer
    nothing): heartbeat it while idle, so that silence means what it means to any follower."""

    TAG: ClassVar[bytes] = b"F"

    def fields(self) -> list[Any]:
        return []

    @classmethod
    def parse(cls, fields: list[Any]) -> Follow:
        if fields:
            raise ValueError("malformed message")
        return cls()


@dataclass(frozen=True, slots=True)
class Started(_Message):
    """A producer started: for readers that wait for a stream that did not exist yet."""

    TAG: ClassVar[bytes] = b"S"
    producer: str

    def fields(self) -> list[Any]:
        return [self.producer]

    @classmethod
    def parse(cls, fields: list[Any]) -> Started:
        (producer,) = fields
        return cls(_str(producer))


@dataclass(frozen=True, slots=True)
class End(_Message):
    """The stream ended in `state` at `length` characters; `detail` names a failure's type.

    On the live channel `listener` is None; an answer to one request names its listener.
    """

    TAG: ClassVar[bytes] = b"E"
    listener: str | None
    producer: str
    length: int
    state: str
    detail: str | None

    def fields(self) -> list[Any]:
        return [self.listener, self.producer, self.length, self.state, self.detail]

    @classmethod
    def parse(cls, fields: list[Any]) -> End:
        listener, producer, length, state, detail = fields
        if state not in TERMINAL_STATES:
            raise ValueError("malformed message")
        return cls(
            None if listener is None else _str(listener),
            _str(producer),
            _offset(length),
            state,
            None if detail is None else _str(detail),
        )


Message = Request | Cancel | Follow | Replay | Live | Heartbeat | Started | End

_TYPES: Final[dict[bytes, Any]] = {
    kind.TAG: kind for kind in (Request, Cancel, Follow, Replay, Live, Heartbeat, Started, End)
}


def parse(message: bytes) -> Message:
    """The message `message` packs; raises ValueError if it is not one of ours."""
    kind = _TYPES.get(message[:1])
    if kind is None:
        raise ValueError("not a message of this protocol")
    try:
        fields = _loads(message[1:].decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError("malformed message") from exc
    if not isinstance(fields, list):
        raise ValueError("malformed message")
    try:
        return kind.parse(fields)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:  # TypeError: the wrong number of fields
        raise ValueError("malformed message") from exc
