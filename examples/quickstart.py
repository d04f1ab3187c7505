"""A producer, a client that drops and resumes mid-stream, and a second viewer.

Run it with `python examples/quickstart.py` (in-memory backend), or with `REDIS_URL` set to use
Redis. Two contexts stand for two workers sharing one backend.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import anyio

import resumable_stream as rs

ANSWER = "Resumable streams keep generating when the client drops, and anyone can catch up."


async def fake_llm() -> AsyncIterator[str]:
    for word in ANSWER.split(" "):
        await anyio.sleep(0.02)  # a token arriving from a slow model
        yield word + " "


async def main() -> None:
    url = os.environ.get("REDIS_URL")
    backend: rs.Backend
    if url:
        from resumable_stream.redis import RedisBackend

        backend = RedisBackend(url)
    else:
        backend = rs.MemoryBackend()
    async with (
        rs.ResumableStreamContext(backend=backend) as worker_a,
        rs.ResumableStreamContext(backend=backend) as worker_b,
    ):
        stream_id = f"chat-{uuid.uuid4().hex[:8]}"
        # 1. The first request produces; its client reads a little and then drops.
        stream = await worker_a.resumable_stream(stream_id, fake_llm)
        assert stream is not None
        received = ""
        async for chunk in stream:
            received += chunk
            if len(received) > 20:
                break
        await stream.aclose()
        print(f"client, before the drop: {received!r}")

        # 2. A second viewer opens the same stream on another worker, from the start.
        viewer = await worker_b.resumable_stream(stream_id, fake_llm)
        assert viewer is not None

        # 3. The client reconnects (to worker B) and resumes where it stopped.
        resumed = await worker_b.resume_existing_stream(stream_id, resume_at=len(received))
        assert resumed is not None
        rest = "".join([chunk async for chunk in resumed])
        print(f"client, after resuming at {len(received)}: {rest!r}")
        seen = "".join([chunk async for chunk in viewer])
        print(f"second viewer: {seen!r}")
        assert received + rest == seen == ANSWER + " "
        print("state:", await worker_a.has_existing_stream(stream_id))


if __name__ == "__main__":
    anyio.run(main)
