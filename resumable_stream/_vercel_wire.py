"""The wire protocol of npm `resumable-stream` 2.x, which `compat="vercel"` speaks: names,
messages, sentinel values, and the JavaScript semantics the reference applies to them.

Nothing here does I/O. The reference's names, under `P = <key_prefix>:rs`:

    P:sentinel:<id>       an INCR count (or "1") while the stream runs, then "DONE"
    P:request:<id>        followers -> producer: {"listenerId": l, "skipCharacters": n}
    P:chunk:<listener>    producer -> one follower: raw text, then the DONE message

and the Python-only ones beside them, which the reference never reads or subscribes to:

    P:outcome:<id>        how a Python producer's stream ended (JSON), for Python readers
    P:cancel:<id>         cancellation (any payload), so that nothing but a request ever goes
                          on the request channel: anything else there kills a Node producer
    P:tail:<id>           a finished stream's tail, asked of a Python producer that lingers
    P:alias:<name>        `set_alias`

Offsets on the wire count UTF-16 code units (JavaScript's `String.prototype.slice`), and so do
the public offsets of a compat context: one number names one position to a browser, a Next.js
route and a Python route. A position between the two halves of a surrogate pair gives, as the
reference's clients do, U+FFFD for the lone low half (one unit for one unit, so every later
offset is unchanged).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from . import _protocol as p

__all__ = [
    "DONE_BYTES",
    "DONE_MESSAGE",
    "DONE_VALUE",
    "Outcome",
    "Request",
    "VercelNames",
    "cut16",
    "drop_unit",
    "encode_request",
    "messages",
    "parse_request",
    "running",
    "skip16",
    "slice_start",
    "utf16_len",
    "validate_stream_id",
    "well_formed",
]

# runtime.js: compared with `===` against every whole message a follower receives.
DONE_MESSAGE: Final = "\n\n\nDONE_SENTINEL_hasdfasudfyge374%$%^$EDSATRTYFtydryrte\n"
DONE_BYTES: Final = DONE_MESSAGE.encode()
# The sentinel's one terminal value: any other string makes the reference's readers wait 1 s
# and fail (`resumeExistingStream`), say `true` (`hasExistingStream`), or never close.
DONE_VALUE: Final = "DONE"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_SURROGATE = re.compile("[\ud800-\udfff]")


class VercelNames:
    """The reference's key and channel names under one prefix, and ours beside them."""

    __slots__ = (
        "alias_prefix",
        "base",
        "cancel_prefix",
        "chunk_prefix",
        "outcome_prefix",
        "request_prefix",
        "sentinel_prefix",
        "tail_prefix",
    )

    def __init__(self, key_prefix: str) -> None:
        # runtime.js: `${options.keyPrefix || "resumable-stream"}:rs`
        self.base = f"{key_prefix or 'resumable-stream'}:rs"
        self.sentinel_prefix = f"{self.base}:sentinel:"
        self.request_prefix = f"{self.base}:request:"
        self.chunk_prefix = f"{self.base}:chunk:"
        self.outcome_prefix = f"{self.base}:outcome:"
        self.cancel_prefix = f"{self.base}:cancel:"
        self.tail_prefix = f"{self.base}:tail:"
        self.alias_prefix = f"{self.base}:alias:"

    def sentinel(self, stream_id: str) -> str:
        return self.sentinel_prefix + stream_id

    def request(self, stream_id: str) -> str:
        return self.request_prefix + stream_id

    def chunk(self, listener: str) -> str:
        return self.chunk_prefix + listener

    def outcome(self, stream_id: str) -> str:
        return self.outcome_prefix + stream_id

    def cancel(self, stream_id: str) -> str:
        return self.cancel_prefix + stream_id

    def tail(self, stream_id: str) -> str:
        return self.tail_prefix + stream_id

    def alias(self, name: str) -> str:
        return self.alias_prefix + name

    def producer_channels(self, stream_id: str) -> tuple[str, str, str]:
        """What a producer subscribes to, in one command."""
        return self.request(stream_id), self.cancel(stream_id), self.tail(stream_id)


def validate_stream_id(stream_id: object) -> str:
    """A compat stream id: any non-empty `str` that encodes to UTF-8 (the reference has no
    length limit, so neither does this mode)."""
    if not isinstance(stream_id, str):
        raise ValueError(f"stream_id must be a str, not {type(stream_id).__name__}")
    if not stream_id:
        raise ValueError("stream_id must not be empty")
    try:
        stream_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("stream_id must be valid Unicode (it contains a lone surrogate)") from None
    return stream_id


def running(sentinel: str | None) -> bool:
    """Whether a sentinel value says the stream runs (a count, or anything but "DONE")."""
    return sentinel is not None and sentinel != DONE_VALUE


# UTF-16


def utf16_len(text: str) -> int:
    """The length of `text` in UTF-16 code units (JavaScript's `length`)."""
    if text.isascii():
        return len(text)
    if max(text) <= "\uffff":
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def cut16(text: str, units: int) -> str:
    """`text` from UTF-16 unit `units` on, as JavaScript's `slice` and the reference's clients
    give it: a cut between the halves of a pair starts with U+FFFD (for the lone low half)."""
    if units <= 0:
        return text
    if text.isascii() or max(text) <= "\uffff":
        return text[units:]
    data = text.encode("utf-16-le", "surrogatepass")[2 * units :]
    if len(data) >= 2 and 0xDC <= data[1] <= 0xDF:
        data = b"\xfd\xff" + data[2:]
    return data.decode("utf-16-le", "surrogatepass")


def skip16(text: str, units: int) -> tuple[str, int]:
    """`text` without its first `units` UTF-16 units (`cut16`), and how many units are still
    to be skipped after it: what drops an offset's worth of a run of texts."""
    if units <= 0:
        return text, 0
    length = utf16_len(text)
    if length <= units:
        return "", units - length
    return cut16(text, units), 0


def drop_unit(text: str) -> str:
    """`text` without its first UTF-16 unit (`cut16(text, 1)`): an astral first character
    leaves its low half, which is U+FFFD."""
    if not text:
        return text
    return "\ufffd" + text[1:] if text[0] > "\uffff" else text[1:]


def well_formed(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD, as Node's UTF-8 encoder sends it:
    one unit for one unit, so offsets are kept, and every reader (the producer's own too) reads
    what a Node reader reads."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def messages(text: str, limit: int) -> Iterator[str]:
    """`text` as the messages that carry it: pieces of at most `limit` characters (a Python
    character is a code point, so no piece splits a pair), none equal to the DONE message (a
    reference follower would take it for the end: it goes as two). An empty text is one empty
    message (the reference's followers take the first message, empty or not, as the answer)."""
    if len(text) <= limit:
        if text == DONE_MESSAGE:
            yield text[:1]
            yield text[1:]
        else:
            yield text
        return
    for start in range(0, len(text), limit):
        piece = text[start : start + limit]
        if piece == DONE_MESSAGE:
            yield piece[:1]
            yield piece[1:]
        else:
            yield piece


# Requests


def encode_request(listener: str, skip: int | None) -> bytes:
    """What a reference follower publishes: `JSON.stringify({listenerId, skipCharacters})`,
    the key left out when undefined."""
    if skip is None:
        return _dumps({"listenerId": listener}).encode()
    return _dumps({"listenerId": listener, "skipCharacters": skip}).encode()


@dataclass(frozen=True, slots=True)
class Request:
    listener: str
    skip: Any  # the JSON value of `skipCharacters`, as the reference reads it (or None)


def parse_request(data: bytes) -> Request | None:
    """A request as the reference producer reads it (`JSON.parse`, then `.listenerId` and
    `.skipCharacters`; other fields ignored); None if it is not one (logged and dropped by the
    producer, where a Node producer would crash)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    listener = value.get("listenerId")
    if not isinstance(listener, str):
        return None
    return Request(listener, value.get("skipCharacters"))


# `chunks.join("").slice(parsedMessage.skipCharacters || 0)`: JavaScript's coercions.

_JS_SPACE = " \t\n\v\f\r\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
_JS_SPACE += "\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_DECIMAL = re.compile(r"[+-]?(?:Infinity|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)")
_RADIX = re.compile(r"0(?:[xX][0-9a-fA-F]+|[oO][0-7]+|[bB][01]+)")


def _string_to_number(text: str) -> float:
    text = text.strip(_JS_SPACE)
    if not text:
        return 0.0
    if _DECIMAL.fullmatch(text):
        return float(text.replace("Infinity", "inf"))
    if _RADIX.fullmatch(text):
        return float(int(text, 0))
    return math.nan


def _to_string(value: Any) -> str:
    """`String(value)` for what JSON holds, as far as `ToNumber` of it depends on it."""
    if value is None:
        return ""  # inside an array: `[null].join()` is ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join(_to_string(item) for item in value)
    if isinstance(value, dict):
        return "[object Object]"
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return repr(value)  # reads back as the same number (the exact text does not matter)


def _to_number(value: Any) -> float:
    if value is None:
        return 0.0
    if value is True or value is False:
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return _string_to_number(value)
    if isinstance(value, list):
        return _string_to_number(_to_string(value))
    return math.nan  # an object


def slice_start(skip: Any, length: int) -> int:
    """Where `text.slice(skip || 0)` starts in a text of `length` units, before clamping to
    the end: negative counts from the end; past the end is returned as is (capped), since
    the producer then drops that many units of the live text rather than duplicate it."""
    if not skip:  # JavaScript's falsy values: null, false, 0, "" (NaN cannot come from JSON)
        return 0
    number = _to_number(skip)
    if math.isnan(number):
        return 0
    if number == -math.inf:
        return 0
    if number == math.inf:
        return sys.maxsize
    relative = int(number)  # ToIntegerOrInfinity truncates toward zero
    if relative < 0:
        return max(length + relative, 0)
    return min(relative, sys.maxsize)


# How a Python producer's stream ended, for Python readers (Node never reads it).


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # p.DONE, p.FAILED, p.CANCELLED or p.LOST
    length: int  # UTF-16 units
    detail: str | None  # a failure's exception type
    producer: str  # the producer's token ("" when a follower recorded it lost)

    def pack(self) -> str:
        fields = {"state": self.state, "length": self.length, "detail": self.detail}
        fields["producer"] = self.producer
        return str(_dumps(fields))

    @classmethod
    def parse(cls, value: str | None) -> Outcome | None:
        """The outcome a key holds; None if absent or malformed (read as no outcome)."""
        if value is None:
            return None
        try:
            fields = json.loads(value)
            state, length = fields["state"], fields["length"]
            detail, producer = fields.get("detail"), fields.get("producer", "")
        except (ValueError, TypeError, KeyError, RecursionError):
            return None
        if state not in p.TERMINAL_STATES or type(length) is not int or length < 0:
            return None
        if not (detail is None or isinstance(detail, str)) or not isinstance(producer, str):
            return None
        return cls(state, length, detail, producer)
