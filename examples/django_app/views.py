"""The views: an async view returns the stream as a `StreamingHttpResponse` (or a 204, 400...)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import anyio
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from resumable_stream.django import stop_response, stream_response

from .streams import streams

ANSWER = (
    "Here is a simulated answer, streamed one token at a time like a language model's. "
    "Each token is one Server-Sent Event whose id is the character offset just past it, so a "
    "browser that loses its connection reconnects with Last-Event-ID and resumes exactly there, "
    "on any worker, while the answer keeps being generated on the server whoever listens."
)


async def answer(prompt: str) -> AsyncIterator[str]:
    """A stand-in for a model: a few hundred characters, a token every few milliseconds."""
    for token in re.findall(r"\S+\s*", f"You asked {prompt!r}. {ANSWER}"):
        await anyio.sleep(0.005)
        yield token


async def chat(request: HttpRequest, stream_id: str) -> HttpResponseBase:
    prompt = request.GET.get("prompt", "")
    return await stream_response(request, streams, stream_id, lambda: answer(prompt))


async def stop(request: HttpRequest, stream_id: str) -> HttpResponse:
    return await stop_response(request, streams, stream_id)
