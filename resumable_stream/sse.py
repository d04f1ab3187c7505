"""A sans-IO codec for Server-Sent Events (WHATWG HTML §9.2).

`SSEDecoder` turns the bytes of a `text/event-stream` body into the events a browser's
`EventSource` would dispatch, and `encode_event` / `encode_comment` produce text that every
conforming client decodes back into what was given, but for line ends: the format has only LF
inside `data`, so a CR or CRLF there arrives as LF (and CR and LF are dropped from `event` and
`id`). Nothing here does I/O, so the same code serves an ASGI app, a proxy and a client.

The decoder follows the spec's parsing rules to the letter, including those that common parsers
get wrong: the body is UTF-8 whatever its `charset` says, exactly one leading BOM is dropped, a CR
and an LF that arrive in separate reads are one line end, a block without `data` dispatches
nothing, an `id` holding NUL is ignored and `retry` accepts ASCII digits only.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent", "encode_comment", "encode_event"]

# The only three line ends of the format. `str.splitlines` is not usable: it also splits on
# VT, FF, FS, NEL, U+2028 and friends, which are ordinary content in an event stream.
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event as a client dispatches it (WHATWG HTML §9.2.6)."""

    data: str = ""
    event: str = "message"
    id: str = ""
    """The last event ID in effect when the event was dispatched (it persists across events)."""
    retry: int | None = None
    """The reconnection time in milliseconds in effect, or `None` if the stream never set one."""


class SSEDecoder:
    """Incremental decoder: feed bytes as they arrive, get the events dispatched so far.

    One decoder follows one `EventSource`: after `close()` it is ready for the body of the next
    connection, and it keeps the last event ID and the reconnection time across it, as a browser
    does.
    """

    def __init__(self) -> None:
        self._last_event_id = ""  # the event source's "last event ID string"
        self._retry: int | None = None
        self._begin_stream()

    def _begin_stream(self) -> None:
        # "utf-8-sig" drops one BOM at the very start and holds back up to two bytes until it can
        # tell whether they begin one, so a BOM split across reads is still dropped.
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._line: list[str] = []  # the start of an unfinished line; never holds a line end
        self._skip_lf = False  # the text so far ended with a CR, so a leading LF ends no line
        self._data: list[str] = []  # the data buffer, one item per `data` line
        self._event = ""
        # The spec starts this buffer empty on every connection; browsers seed it with the last
        # ID instead, or the first event of a resumed stream that carries no `id` would erase
        # the resume point. We do as browsers do.
        self._id_buffer = self._last_event_id

    @property
    def last_event_id(self) -> str:
        """The ID a reconnection should send as `Last-Event-ID` (if not empty).

        It is updated at each blank line, even one that dispatches no event (`id: 5` followed by
        a blank line sets it). An `id` field in a block the stream never finished does not count:
        that block's event was not delivered, so resuming after it would skip it.
        """
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The reconnection time in milliseconds most recently set by a valid `retry` field."""
        return self._retry

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """Decode the next bytes of the stream; return the events they completed, in order."""
        text = self._decoder.decode(data)
        if not text:
            return []
        if self._skip_lf and text[0] == "\n":
            text = text[1:]
        # A CR at the end ends its line now: waiting for the next read could wait forever.
        # Only the decision about an LF that may follow is carried over.
        self._skip_lf = text.endswith("\r")
        lines = _LINE_END.split(text)
        tail = lines.pop()
        events: list[ServerSentEvent] = []
        if lines:
            if self._line:
                # Joined once, when the line ends, so a long line fed in pieces costs linear time.
                self._line.append(lines[0])
                lines[0] = "".join(self._line)
                self._line.clear()
            for line in lines:
                if line:
                    self._process_field(line)
                elif (event := self._dispatch()) is not None:
                    events.append(event)
        if tail:
            self._line.append(tail)
        return events

    def close(self) -> list[ServerSentEvent]:
        """End the stream and get ready for the next one; always returns `[]`.

        "Once the end of the file is reached, any pending data must be discarded": an event
        without its blank line, or a line without its line end, is never dispatched. A CR at the
        very end has already ended its line in `feed`.
        """
        self._begin_stream()
        return []

    def _process_field(self, line: str) -> None:
        if line[0] == ":":
            return  # a comment, usually a keep-alive
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            # Not `int(value)` alone: it also takes "+3", " 3", "1_000" and non-ASCII digits.
            self._retry = int(value)

    def _dispatch(self) -> ServerSentEvent | None:
        self._last_event_id = self._id_buffer
        if not self._data:
            self._event = ""
            return None
        # Joining with LF is the spec's "append value and LF, then strip one trailing LF".
        event = ServerSentEvent(
            "\n".join(self._data), self._event or "message", self._last_event_id, self._retry
        )
        self._data = []
        self._event = ""
        return event


def encode_event(
    data: str = "",
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> str:
    """Encode one event as text ending with a blank line.

    `data` becomes one `data:` line per line; CRLF, CR and LF all end a line, so a CR reaches the
    client as LF. Empty `data` still makes a `data:` line, since a block without one dispatches
    nothing. CR and LF are removed from `event` and `id`. An `id` containing NUL raises
    `ValueError` (the client would ignore the field), as does a negative `retry`.
    """
    if not isinstance(data, str):
        raise TypeError(f"data must be a str, not {type(data).__name__}")
    lines = [] if comment is None else _comment_lines(comment)
    if event is not None:
        lines.append(f"event: {_one_line(event)}")
    if id is not None:
        if isinstance(id, bool) or not isinstance(id, (str, int)):
            raise TypeError(f"id must be a str or an int, not {type(id).__name__}")
        id = _one_line(str(id))
        if "\0" in id:
            raise ValueError("an id containing NUL would be ignored by the client")
        lines.append(f"id: {id}")
    if retry is not None:
        if isinstance(retry, bool) or not isinstance(retry, int):
            raise TypeError(f"retry must be an int, not {type(retry).__name__}")
        if retry < 0:
            raise ValueError(f"retry must not be negative, got {retry}")
        lines.append(f"retry: {retry}")
    lines.extend(f"data: {line}" for line in _LINE_END.split(data))
    lines.append("\n")
    return "\n".join(lines)


def encode_comment(text: str = "") -> str:
    """Encode a comment (a keep-alive, say) as a complete frame ending with a blank line.

    Each line of `text` becomes a `: ` line. The client ignores all of it; the blank line keeps
    the frame self-contained, and dispatches nothing since the encoder never leaves data pending.
    """
    return "\n".join([*_comment_lines(text), "\n"])


def _comment_lines(text: str) -> list[str]:
    return [f": {line}" if line else ":" for line in _LINE_END.split(text)]


def _one_line(value: str) -> str:
    return value.replace("\r", "").replace("\n", "")
