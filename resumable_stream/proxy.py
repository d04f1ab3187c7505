"""Relay an upstream Server-Sent Events stream (an OpenAI-compatible `stream=true` API, say).

`relay(response)` turns an httpx response into the chunks of a resumable stream: the `data` of
each upstream event, whatever the network chunking, without upstream comments, up to the
`data: [DONE]` sentinel. The stream's readers get this library's offsets as ids, never the
upstream's `id:` fields, so a reconnect resumes our copy, not the upstream. A stream the
upstream ends badly fails (readers get `event: error`), never passes for complete:

    async with http.stream("POST", url, json=body) as response:
        async for chunk in relay(response):
            yield chunk

`upstream(open_response)` wraps that into a `make_stream` for `ctx.resumable_stream(...)`.

Needs httpx (`pip install httpx`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, aclosing

import httpx

from ._event import Event
from ._exceptions import ResumableStreamError
from ._upstream import detail, is_event_stream, media_type
from .sse import SSEDecoder

__all__ = ["UpstreamError", "UpstreamTruncatedError", "relay", "upstream"]

OpenResponse = Callable[[], AbstractAsyncContextManager[httpx.Response] | Awaitable[httpx.Response]]
"""Opens the upstream response: `lambda: http.stream(...)`, or a coroutine giving a response
opened with `stream=True` (which is then closed when the relay ends)."""

_DROPS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class UpstreamError(ResumableStreamError):
    """The upstream answered an error status or sent `event: error`; `message` is its text."""

    def __init__(self, message: str, *, status_code: int | None = None, data: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.data = data


class UpstreamTruncatedError(UpstreamError):
    """The upstream's body ended (or its connection broke) before its end sentinel."""


async def relay(
    response: httpx.Response, *, done: str | None = "[DONE]"
) -> AsyncGenerator[str | Event, None]:
    """Yield the events of an upstream SSE `response` as chunks of a resumable stream.

    Message events become their `data`; a named event becomes `Event(data, event=name)` (its
    name survives replay). Events without data, comments and `retry:` are dropped. The relay
    ends at the event whose data is `done` (None: at the end of the body). Raises `UpstreamError`
    for an error status, a body that is not an event stream or an `event: error`, and
    `UpstreamTruncatedError` if the body ends or breaks before `done`.
    """
    await _check(response)
    decoder = SSEDecoder()
    try:
        async for piece in response.aiter_bytes():
            for event in decoder.feed(piece):
                if event.event == "error":
                    raise UpstreamError(
                        f"the upstream sent an error: {_message(event.data)}", data=event.data
                    )
                if event.data == done and event.event == "message":
                    return
                if not event.data:
                    continue  # an empty chunk has no offset of its own, so it cannot be kept
                yield event.data if event.event == "message" else Event(event.data, event.event)
    except _DROPS as exc:
        raise UpstreamTruncatedError(
            f"the upstream connection broke before the end of its stream: {exc!r}"
        ) from exc
    if done is not None:
        raise UpstreamTruncatedError(f"the upstream stream ended without its {done!r} sentinel")


def upstream(
    open_response: OpenResponse, *, done: str | None = "[DONE]"
) -> Callable[[], AsyncIterator[str | Event]]:
    """A `make_stream` for `ctx.resumable_stream(stream_id, ...)` relaying an upstream response.

    `open_response` is called by the producer when the stream starts (not by the request
    handler), so the upstream request outlives the client that asked for it and ends with the
    stream: the response is closed when the relay ends, fails or is cancelled. For example
    `upstream(lambda: http.stream("POST", url, json=body))`.
    """

    async def stream() -> AsyncIterator[str | Event]:
        opened = open_response()
        if isinstance(opened, AbstractAsyncContextManager):
            async with opened as response, aclosing(relay(response, done=done)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        response = await opened
        try:
            async with aclosing(relay(response, done=done)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            await response.aclose()

    return stream


async def _check(response: httpx.Response) -> None:
    if response.is_success and is_event_stream(response):
        return
    text = await detail(response)
    if not response.is_success:
        message = f"the upstream answered {response.status_code}: {_message(text)}"
    else:
        media = media_type(response)
        message = f"the upstream sent {media or 'no content type'!r}, not an event stream"
    raise UpstreamError(message, status_code=response.status_code, data=text)


def _message(data: str) -> str:
    """The message of an error payload: OpenAI's `{"error": {"message"}}`, `{"message"}`..."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to decode
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    text = data.strip()
    return text if len(text) <= 500 else text[:500] + "..."
