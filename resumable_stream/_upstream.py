"""What our HTTP clients (`client.py`, `proxy.py`) read of a response before its events: is it
an event stream, and if not, the start of what it says instead (for the error they raise)."""

from __future__ import annotations

import httpx

MAX_DETAIL = 2000  # bytes of a response that is not an event stream, kept for its error


def media_type(response: httpx.Response) -> str:
    """The response's media type, lower case, without parameters ("" if none)."""
    value: str = response.headers.get("content-type", "")
    return value.partition(";")[0].strip().lower()


def is_event_stream(response: httpx.Response) -> bool:
    return media_type(response) == "text/event-stream"


async def detail(response: httpx.Response) -> str:
    """The start of the body (at most `MAX_DETAIL` bytes, read no further), as text."""
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) >= MAX_DETAIL:
            break
    return body[:MAX_DETAIL].decode("utf-8", "replace")
