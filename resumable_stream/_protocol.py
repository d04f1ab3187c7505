"""Names, validation and message framing shared by producers and followers.

Every message is one tag byte followed by a JSON array, so no user text can ever be mistaken for
a control message:

    Q [listener, inbox, resume_at, after_end]     follower -> request channel of a stream
    C []                                          anyone -> request channel: stop the stream
    R [listener, start, chunks, cont, upto|null]  producer -> inbox of the follower's context
    L [start, chunks, cont]                       producer -> live channel of a stream
    H [length]                                    producer -> live channel, when idle: alive
    E [listener|null, length, state, detail]      producer -> live channel, or an inbox

`start` is the character offset of the first element of `chunks`; an element is a chunk's text,
or `[text, event, retry]` for a chunk yielded as an `Event`. Every element ends on a chunk
boundary, except the last one of a message whose `cont` is true: a chunk too large for one message
continues in the next. The last `R` piece of a replay carries `upto`, the offset the replay covers.
A request with `after_end` asks a finished stream for its tail; only a producer lingering after
the end answers it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any, Final

MAX_STREAM_ID_LENGTH: Final = 256

DONE: Final = "done"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
LOST: Final = "lost"  # the producer died: recorded by whoever found it gone
TERMINAL_STATES: Final = (DONE, FAILED, CANCELLED, LOST)
# The sentinel key holds the INCR count while the stream runs, then its terminal state in capitals.
_SENTINEL_VALUES: Final = {state.upper(): state for state in TERMINAL_STATES}

REQUEST: Final = b"Q"
REPLAY: Final = b"R"
LIVE: Final = b"L"
END: Final = b"E"
HEARTBEAT: Final = b"H"
CANCEL: Final = b"C"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads


class Keys:
    """Key and channel names under one prefix; the version segment isolates protocol changes."""

    __slots__ = ("_base",)

    def __init__(self, key_prefix: str) -> None:
        self._base = f"{key_prefix}:v1:"

    def sentinel(self, stream_id: str) -> str:
        return f"{self._base}sentinel:{stream_id}"

    def request(self, stream_id: str) -> str:
        return f"{self._base}request:{stream_id}"

    def live(self, stream_id: str) -> str:
        return f"{self._base}live:{stream_id}"

    def inbox(self, context_id: str) -> str:
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


def validate_resume_at(resume_at: object) -> int:
    if resume_at is None:
        return 0
    if isinstance(resume_at, bool) or not isinstance(resume_at, int):
        raise ValueError(f"resume_at must be an int or None, not {type(resume_at).__name__}")
    if resume_at < 0:
        raise ValueError(f"resume_at must be >= 0, got {resume_at}")
    return resume_at


def terminal_state(sentinel: str | None) -> str | None:
    """The terminal state a sentinel value records, or None while running or absent."""
    return None if sentinel is None else _SENTINEL_VALUES.get(sentinel)


def sentinel_value(state: str) -> str:
    return state.upper()


def pack(tag: bytes, payload: list[Any]) -> bytes:
    return tag + _dumps(payload).encode("utf-8", "surrogatepass")


def unpack(message: bytes) -> tuple[bytes, list[Any]]:
    """Split a message into its tag and payload; raises ValueError if it is not one of ours."""
    payload = _loads(message[1:].decode("utf-8", "surrogatepass"))
    if not isinstance(payload, list):
        raise ValueError("malformed message")
    return message[:1], payload


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
