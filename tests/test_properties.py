"""Property: whatever the chunking and the resume offset, a reader gets exactly the suffix."""

from __future__ import annotations

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

import resumable_stream as rs

from .helpers import TestingSource, never_called, read_chunks

# Printable characters from ASCII to astral-plane emoji; surrogates excluded (not valid text).
text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x1F6FF, exclude_categories=["Cs"]))


def expected_chunks(chunks: list[str], offset: int) -> list[str]:
    """The non-empty chunks from `offset` on, the first one trimmed."""
    out, start = [], 0
    for chunk in chunks:
        end = start + len(chunk)
        if end > offset and chunk:
            out.append(chunk[max(0, offset - start) :])
        start = end
    return out


@settings(max_examples=150, deadline=None)
@given(
    chunks=st.lists(text.filter(bool), max_size=8),
    buffered=st.integers(min_value=0, max_value=8),
    max_message_size=st.integers(min_value=1, max_value=12),
    trio=st.booleans(),
)
def test_every_offset_gives_exactly_the_suffix(
    chunks: list[str], buffered: int, max_message_size: int, trio: bool
) -> None:
    full = "".join(chunks)
    buffered = min(buffered, len(chunks))

    async def scenario() -> None:
        backend = rs.MemoryBackend()
        async with (
            rs.ResumableStreamContext(
                backend=backend, max_message_size=max_message_size
            ) as producer_side,
            rs.ResumableStreamContext(
                backend=backend, max_message_size=max_message_size
            ) as follower_side,
        ):
            source = TestingSource()
            own = await producer_side.resumable_stream("s", source.make)
            for chunk in chunks[:buffered]:
                source.write(chunk)
            assert await read_chunks(own, buffered) == chunks[:buffered]
            offsets = range(len(full) + 2)
            followers = [
                await follower_side.resumable_stream("s", never_called, offset)
                for offset in offsets
            ]
            for chunk in chunks[buffered:]:
                source.write(chunk)
            source.close()
            assert await read_chunks(own) == chunks[buffered:]
            for offset, follower in zip(offsets, followers, strict=True):
                assert await read_chunks(follower) == expected_chunks(chunks, offset)

    anyio.run(scenario, backend="trio" if trio else "asyncio")
