"""A backend for the Vercel AI SDK's `useChat({ resume: true })`: its UI message stream protocol,
resumable on any worker.

The AI SDK's `DefaultChatTransport` (npm package `ai`, versions 5 to 7) speaks two requests:

- `POST {api}` with JSON `{id, messages, trigger, messageId?}`: the answer is Server-Sent Events,
  one `data: <JSON chunk>` per UI message chunk, then `data: [DONE]`, with the headers of
  `UI_MESSAGE_STREAM_HEADERS` (`x-vercel-ai-ui-message-stream: v1`...);
- `GET {api}/{chatId}/stream` to resume: 204 when the chat has no active stream (the client then
  does nothing), else the same answer, the message replayed from its `start` chunk and followed
  live. The client sends no position (its `resumeStreamIsReplay` is true by default).

`ChatStreams(context)` answers both, and a stop, as framework-neutral `PreparedResponse`s
(`resumable_stream.http`; `resumable_stream.starlette.PreparedStreamResponse` sends one from
Starlette or FastAPI):

    chats = ChatStreams(streams)
    answer = await chats.start(chat_id, lambda: llm(messages), request=request)  # the POST
    answer = await chats.resume(chat_id, query=query, headers=headers, request=request)  # GET
    answer = await chats.stop(chat_id, request=request)  # POST {api}/{chatId}/stop

`start` runs the model as a resumable stream under a fresh stream id and records it as the
chat's active stream in the context's backend (`ResumableStreamContext.set_alias`: a key with
the streams' TTL, so a resume on any worker finds it). The model is any async iterable of text
deltas (`str`), or of UI message chunks (`dict`s: tool calls, reasoning, data parts) mixed with
text; `ui_message_chunks` frames it as one message: `start` with a stable `messageId`, its
parts, then `finish`, or an `error` chunk with a generic `errorText` if it raised (the
exception goes to the log only). An output that starts with its own `start` chunk is a whole
message already (pydantic-ai's `VercelAIAdapter.run_stream()`), passed on as it is.

Beyond the AI SDK's own recipe:

- a resume that continues instead of replaying: a client that counts the chunks it received and
  sends the count (`?received=N`, or the `X-Received-Chunks` header) gets the chunks after them
  only, for a transport with `resumeStreamIsReplay: false`;
- any number of viewers follow one chat at once, each from the start;
- `authorize(request, chat_id)` is asked before anything is started, read or stopped (403);
- `stop` stops the model from any worker; every reader's message then ends cleanly: its open
  text and reasoning parts end, then an `abort` chunk, as the AI SDK's own `streamText` does.

Keep-alives are SSE comments (the client's parser rejects any `data:` that is not a chunk).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Any, Final

import anyio.lowlevel

from . import _protocol as p
from ._context import ResumableStream, ResumableStreamContext
from ._exceptions import (
    BackendError,
    ProducerLostError,
    ProducerUnavailableError,
    ResumableStreamError,
    StreamCancelledError,
)
from ._http import (
    DEFAULT_KEEPALIVE_FRAME,
    Headers,
    RequestHeaders,
    allowed,
    check_callables,
    check_frame,
    check_headers,
    check_options,
    error_info,
    header_value,
    query_pairs,
)
from .http import (
    Authorize,
    Disconnected,
    EventStreamBody,
    Frames,
    PreparedResponse,
    no_content,
    plain,
)

__all__ = [
    "ChatStreams",
    "ChunkFrames",
    "ModelOutput",
    "UIMessageChunk",
    "new_message_id",
    "ui_message_chunks",
]

logger = logging.getLogger("resumable_stream")

UIMessageChunk = Mapping[str, Any]
"""A UI message chunk: a JSON object with a `type` (`text-delta`, `tool-input-start`...)."""

ModelOutput = AsyncIterable[str | UIMessageChunk]
"""What a model gives: text deltas, UI message chunks, or both mixed."""

HEADERS: Final = (
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-vercel-ai-ui-message-stream", "v1"),
    ("x-accel-buffering", "no"),
)
"""The AI SDK's `UI_MESSAGE_STREAM_HEADERS`, without `connection` (HTTP/2 forbids it)."""

DONE_FRAME: Final = b"data: [DONE]\n\n"
ERROR_TEXT: Final = "An error occurred."  # what the AI SDK's own server sends by default
RECEIVED_PARAM: Final = "received"
RECEIVED_HEADER: Final = "x-received-chunks"

# What ui_message_chunks writes itself, unless the output is a whole message.
_FRAME_TYPES = frozenset({"start", "finish"})
_MAX_COUNT_DIGITS = 12
_SMALL_BATCH = 16
_COALESCE_TURNS = 4

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def new_message_id() -> str:
    """A fresh assistant message id, as the AI SDK's `generateId` makes them (16 characters)."""
    return secrets.token_urlsafe(12)


async def ui_message_chunks(
    output: ModelOutput, *, message_id: str | None = None
) -> AsyncGenerator[dict[str, Any], None]:
    """The UI message chunks of one assistant message made of `output`.

    `start` (with `message_id`, a fresh one if None), `start-step`, then each text delta in a
    text part (`text-start`, `text-delta`..., `text-end`) and each chunk (a mapping with a
    `type`, passed on as it is, after the end of an open text part), then `finish-step` and
    `finish`.

    An output whose first item is a `start` chunk is a whole message already (pydantic-ai's
    `VercelAIAdapter.run_stream()`, say): its chunks are passed on as they are, and
    `message_id` goes into its `start` if that has none, as the AI SDK's own server does.

    If `output` raises, the message ends with an `error` chunk whose `errorText` is generic;
    the exception is logged. `output` is closed (`aclose()`) however the message ends.
    """
    message_id = new_message_id() if message_id is None else message_id
    started = whole = False
    text_id: str | None = None
    parts = 0
    # One generator, no inner one: an inner generator left unfinished (a message that failed
    # or was stopped midway) is finalized late by asyncio, and trio warns about it.
    try:
        try:
            async for item in output:
                if not started:
                    started = True
                    if isinstance(item, Mapping) and item.get("type") == "start":
                        whole = True
                        first = _check_chunk(item)
                        if first.get("messageId") is None:
                            first["messageId"] = message_id
                        yield first
                        continue
                    yield {"type": "start", "messageId": message_id}
                    yield {"type": "start-step"}
                if whole:
                    yield _check_chunk(item)
                    continue
                if isinstance(item, str):
                    if not item:
                        continue
                    if text_id is None:
                        parts += 1
                        text_id = f"{message_id}-{parts}"
                        yield {"type": "text-start", "id": text_id}
                    yield {"type": "text-delta", "id": text_id, "delta": item}
                    continue
                chunk = _check_chunk(item)
                if chunk["type"] in _FRAME_TYPES:
                    raise ValueError(f"a {chunk['type']!r} chunk in the middle of a message")
                if text_id is not None:
                    yield {"type": "text-end", "id": text_id}
                    text_id = None
                yield chunk
        except Exception:
            # The details may hold secrets (a provider's key, a prompt): the log only.
            logger.exception("the model of message %r raised", message_id)
            if not started:
                yield {"type": "start", "messageId": message_id}
            yield {"type": "error", "errorText": ERROR_TEXT}
            return
        if whole:
            return
        if not started:
            yield {"type": "start", "messageId": message_id}
            yield {"type": "start-step"}
        if text_id is not None:
            yield {"type": "text-end", "id": text_id}
        yield {"type": "finish-step"}
        yield {"type": "finish", "finishReason": "stop"}
    finally:
        await _aclose(output)


def _check_chunk(item: object) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise TypeError(f"a model yields str or UI message chunks (dicts), not {type(item)!r}")
    if not isinstance(item.get("type"), str):
        raise TypeError(f"a UI message chunk needs a str 'type', got {item!r}")
    return dict(item)


class ChatStreams:
    """The AI SDK chat endpoints' answers on `context`, for any framework.

    `authorize(request, chat_id)` (sync or async; only `True` allows) is asked before a stream is
    started, resumed or stopped. `keepalive` (seconds) is the idle time after which
    `keepalive_frame` (a comment) is sent; `headers` (a mapping or pairs) go on every streamed
    answer. Every argument is checked here, never once a request is answered.
    """

    def __init__(
        self,
        context: ResumableStreamContext,
        *,
        authorize: Authorize | None = None,
        keepalive: float | None = 15.0,
        keepalive_frame: bytes = DEFAULT_KEEPALIVE_FRAME,
        headers: Headers | None = None,
    ) -> None:
        check_options(keepalive, None)
        check_callables(authorize=authorize)
        if context.compat is not None:
            # Each chunk is one JSON message, and the reference's protocol keeps no chunk
            # boundaries (a follower may get several chunks as one message).
            raise ValueError(
                "ChatStreams needs a context of this library's own protocol, not "
                f"compat={context.compat!r}"
            )
        self.context = context
        self.authorize = authorize
        self.keepalive = keepalive
        self.keepalive_frame = check_frame(keepalive_frame)
        self.headers = [*HEADERS, *check_headers(headers)]

    async def start(
        self,
        chat_id: object,
        model: Callable[[], ModelOutput],
        *,
        request: Any = None,
        message_id: str | None = None,
        disconnected: Disconnected | None = None,
    ) -> PreparedResponse:
        """The answer to the POST: run `model()` as a resumable stream (its producer outlives
        this request), make it the chat's active stream, and send it from its `start`.

        400 for a malformed chat id, 403 if `authorize` says no. `disconnected`, for a
        framework that does not cancel a response whose client went away (Falcon), ends the
        body once it returns, as in `EventStream.prepare`.
        """
        checked = await self._check(chat_id, request)
        if isinstance(checked, PreparedResponse):
            return checked
        message_id = new_message_id() if message_id is None else message_id
        stream_id = p.new_stream_id()
        context = self.context
        try:
            # Recorded before the stream starts: a resume from now on finds it, on any worker.
            await context.set_alias(checked, stream_id)
        except BackendError as exc:
            logger.warning(
                "chat %r will not be resumable: the backend failed (%s)",
                checked,
                exc,
                extra={"stream_id": stream_id, "chat_id": checked},
            )

        def make_stream() -> AsyncIterator[str]:
            return _message_text(model, message_id)

        try:
            stream = await context.resumable_stream(stream_id, make_stream)
        except BackendError as exc:
            logger.warning(
                "could not start the stream of chat %r: %s",
                checked,
                exc,
                extra={"stream_id": stream_id, "chat_id": checked},
            )
            return plain(503, "the stream store is unavailable; try again")
        assert stream is not None  # a fresh id: this request produces it
        return self._streaming(stream, 0, disconnected)

    async def resume(
        self,
        chat_id: object,
        *,
        headers: RequestHeaders = (),
        query: str | bytes | Mapping[str, str] = "",
        request: Any = None,
        disconnected: Disconnected | None = None,
    ) -> PreparedResponse:
        """The answer to `GET {api}/{chatId}/stream`: 204 if the chat has no active stream (or it
        ended), else its message from the `start` chunk, then live.

        With a count of chunks already received (`?received=N` or `X-Received-Chunks: N`), the
        chunks after them only, even from a stream that just ended (while its producer
        lingers), so a client cut off near the end gets its tail. 400 for a malformed chat id or
        count, 403 if `authorize` says no, 503 if the store or the producer does not answer.
        """
        checked = await self._check(chat_id, request)
        if isinstance(checked, PreparedResponse):
            return checked
        try:
            received = _received(headers, query)
        except ValueError as exc:
            return plain(400, str(exc))
        context = self.context
        stream_id: str | None = None
        try:
            stream_id = await context.resolve_alias(checked)
            if stream_id is None:
                return no_content()
            # A replay reads from the start with no cursor: a stream that ended is then no
            # longer resumable (204), as the client expects after a message. A count is a
            # cursor: the lingering producer still sends the tail of an ended stream. Either
            # way the reader reads from the start, as chunks are counted from there.
            stream = await context.resume_existing_stream(
                stream_id, None if received is None else 0
            )
        except StreamCancelledError:
            return no_content()  # stopped: nothing more for anybody
        except ProducerLostError as exc:  # a ProducerUnavailableError, but it will not answer
            return PreparedResponse(200, list(self.headers), _error_frames(exc))
        except ProducerUnavailableError:
            return plain(503, "the stream's producer did not answer; try again")
        except BackendError as exc:
            # The stream's id, once the chat's alias was read (None if that failed).
            logger.warning(
                "could not resume chat %r: %s",
                checked,
                exc,
                extra={"stream_id": stream_id, "chat_id": checked},
            )
            return plain(503, "the stream store is unavailable; try again")
        except ResumableStreamError as exc:
            # It failed or its producer died: the client learns it, as a live reader would.
            return PreparedResponse(200, list(self.headers), _error_frames(exc))
        if stream is None:
            return no_content()
        return self._streaming(stream, received or 0, disconnected)

    async def stop(self, chat_id: object, *, request: Any = None) -> PreparedResponse:
        """The answer to a stop: stop the chat's active stream from any worker; its readers'
        messages end with an `abort` chunk. 204 (whether or not anything ran), 400 for a
        malformed chat id, 403 if `authorize` says no, 503 if the store is unavailable."""
        checked = await self._check(chat_id, request)
        if isinstance(checked, PreparedResponse):
            return checked
        stream_id: str | None = None
        try:
            stream_id = await self.context.resolve_alias(checked)
            if stream_id is not None:
                await self.context.cancel_stream(stream_id)
        except BackendError as exc:
            logger.warning(
                "could not stop chat %r: %s",
                checked,
                exc,
                extra={"stream_id": stream_id, "chat_id": checked},
            )
            return plain(503, "the stream store is unavailable; try again")
        return no_content()

    async def _check(self, chat_id: object, request: Any) -> str | PreparedResponse:
        try:
            checked = p.validate_stream_id(chat_id)
        except ValueError as exc:
            return plain(400, f"chat id: {exc}")
        if not await allowed(self.authorize, request, checked):
            return plain(403, "not allowed")
        return checked

    def _streaming(
        self, stream: ResumableStream, skip: int, disconnected: Disconnected | None
    ) -> PreparedResponse:
        frames = ChunkFrames(stream, skip)
        body = EventStreamBody(frames, self.keepalive, self.keepalive_frame, disconnected)
        return PreparedResponse(200, list(self.headers), body=body)


async def _message_text(model: Callable[[], ModelOutput], message_id: str) -> AsyncIterator[str]:
    """The message's chunks as JSON, one stream chunk each (readers count and frame them one by
    one). Whatever goes wrong, a model that raises at once or a chunk that is not JSON, ends
    the message with an error chunk: the stream itself ends well, so a reload resumes nothing."""

    async def output() -> AsyncIterator[str | UIMessageChunk]:
        source = model()  # called here, inside ui_message_chunks' error handling
        try:
            async for item in source:
                yield item
        finally:
            await _aclose(source)

    chunks = ui_message_chunks(output(), message_id=message_id)
    try:
        async for chunk in chunks:
            try:
                text = _dumps(chunk)
            except (TypeError, ValueError):
                logger.exception("a chunk of message %r is not JSON", message_id)
                yield _dumps({"type": "error", "errorText": ERROR_TEXT})
                return
            yield text
    finally:
        await chunks.aclose()


async def _aclose(iterable: object) -> None:
    """Close an async generator (or anything with `aclose`) that is left unfinished."""
    aclose = getattr(iterable, "aclose", None)
    if aclose is not None:
        await aclose()


def _received(headers: RequestHeaders, query: str | bytes | Mapping[str, str]) -> int | None:
    value = header_value(headers, RECEIVED_HEADER)
    name = "X-Received-Chunks"
    if value is None:
        values = [v for k, v in query_pairs(query) if k == RECEIVED_PARAM]
        if len(values) > 1:
            raise ValueError(f"give {RECEIVED_PARAM} at most once")
        if not values:
            return None
        value, name = values[0], RECEIVED_PARAM
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_COUNT_DIGITS:
        raise ValueError(f"{name} must be a count of chunks, got {value[:40]!r}")
    return int(value)


class ChunkFrames(Frames):
    """A reader's chunks as UI message stream frames (`data: <chunk>`), after the first `skip`;
    `data: [DONE]` after the last. A stream stopped midway ends its open parts and sends
    `abort`; one that ended badly otherwise sends an `error` chunk (a generic text)."""

    __slots__ = ("_done", "_open", "_skip")

    def __init__(self, reader: ResumableStream, skip: int) -> None:
        super().__init__(reader, True, "", None)
        self._skip = skip
        self._done = False
        # The parts a stop leaves open, in order: (end chunk type, part id).
        self._open: dict[str, str] = {}

    def ready(self) -> bytes | None:
        entries = self.reader.take_ready()
        return self._encode_chunks(entries) if entries else None

    async def wait(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            entries = await self.reader.next_batch()
        except StopAsyncIteration:
            self._done = True
            return DONE_FRAME
        except StreamCancelledError:
            self._done = True
            closing = [{"type": kind, "id": part} for part, kind in self._open.items()]
            closing.append({"type": "abort", "reason": "stopped"})
            return b"".join(_frame(_dumps(c)) for c in closing) + DONE_FRAME
        except ResumableStreamError as exc:
            self._done = True
            return _error_frames(exc)
        # A model handing over one chunk per loop turn would cost one send per chunk; a few
        # more turns let the next chunks join this send (as the SSE layer's frames do).
        for _ in range(_COALESCE_TURNS):
            if len(entries) >= _SMALL_BATCH:
                break
            await anyio.lowlevel.checkpoint()
            more = self.reader.take_ready()
            if not more:
                break
            entries += more
        return self._encode_chunks(entries)

    def _encode_chunks(self, entries: list[tuple[Any, int]]) -> bytes:
        frames = []
        for item, _ in entries:
            text = item if isinstance(item, str) else item.data
            self._track(text)
            if self._skip:
                self._skip -= 1
                continue
            frames.append(_frame(text))
        return b"".join(frames)

    def _track(self, text: str) -> None:
        # Only the part boundaries matter, and they are rare next to deltas: a cheap look
        # before any parsing.
        if "-start" not in text and "-end" not in text:
            return
        chunk = json.loads(text)
        kind, part = chunk.get("type"), chunk.get("id")
        if not isinstance(part, str):
            return
        if kind in ("text-start", "reasoning-start"):
            self._open[part] = kind.replace("-start", "-end")
        elif kind in ("text-end", "reasoning-end"):
            self._open.pop(part, None)


def _frame(text: str) -> bytes:
    # JSON escapes CR and LF, so a chunk is always one `data:` line.
    return f"data: {text}\n\n".encode("utf-8", "replace")


def _error_frames(exc: ResumableStreamError) -> bytes:
    code, _ = error_info(exc)
    logger.info("chat stream ended with %s: %s", code, exc)
    return _frame(_dumps({"type": "error", "errorText": ERROR_TEXT})) + DONE_FRAME
