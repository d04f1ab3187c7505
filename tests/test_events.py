"""Chunks yielded as `Event`s keep their names and boundaries through replay, on every backend."""

from __future__ import annotations

import pytest

import resumable_stream as rs

from .conftest import Workers
from .helpers import TestingSource, never_called, read, read_entries

pytestmark = pytest.mark.anyio

DURABLE = True  # conftest: every `workers` test here runs in both modes

E = rs.Event


def test_event_validation() -> None:
    assert E("x", "add", 5) == E(data="x", event="add", retry=5)
    for bad in ({"data": ""}, {"data": 1}, {"data": "x", "event": "a\nb"}):
        with pytest.raises(ValueError, match=r"Event\."):
            E(**bad)
    for retry in (-1, True, 1.5):
        with pytest.raises(ValueError, match="retry"):
            E("x", retry=retry)  # type: ignore[arg-type]


async def test_iterating_yields_the_text_of_events(workers: Workers) -> None:
    source = TestingSource()
    stream = await workers.P.resumable_stream("s", source.make)
    follower = await workers.C.resume_existing_stream("s")
    chunks: list[str | rs.Event] = ["a", E("b", "name"), "c"]
    for chunk in chunks:
        source.write(chunk)
    source.close()
    assert await read(stream) == "abc"
    assert await read(follower) == "abc"


async def test_names_and_boundaries_survive_replay_and_live(workers: Workers) -> None:
    source = TestingSource()
    stream = await workers.P.resumable_stream("s", source.make)
    before: list[str | rs.Event] = ["ab", E("cd", "add"), E("ef", None, 1500), "g"]
    after: list[str | rs.Event] = [E("hij", "upd"), "k"]
    for chunk in before:
        source.write(chunk)
    assert [e[0] for e in (await read_entries_n(stream, 4))] == before
    follower = await workers.C.resume_existing_stream("s", resume_at=1)
    for chunk in after:
        source.write(chunk)
    source.close()
    expected = [("b", 2), (E("cd", "add"), 4), (E("ef", None, 1500), 6), ("g", 7)]
    expected += [(E("hij", "upd"), 10), ("k", 11)]
    assert await read_entries(follower) == expected


async def test_resume_mid_event_keeps_its_name(workers: Workers) -> None:
    source = TestingSource()
    stream = await workers.P.resumable_stream("s", source.make)
    source.write(E("hello", "greet"))
    source.write("!")
    assert await read(stream, 2) == "hello!"
    follower = await workers.C.resume_existing_stream("s", resume_at=2)
    own = await workers.P.resume_existing_stream("s", resume_at=3)
    source.close()
    assert await read_entries(follower) == [(E("llo", "greet"), 5), ("!", 6)]
    assert await read_entries(own) == [(E("lo", "greet"), 5), ("!", 6)]


@pytest.mark.parametrize("workers", [{"max_message_size": 4}], indirect=True)
async def test_event_larger_than_a_message_is_rejoined_with_its_name(workers: Workers) -> None:
    source = TestingSource()
    stream = await workers.P.resumable_stream("s", source.make)
    source.write("ab")
    source.write(E("0123456789", "big", 7))
    assert await read(stream, 2) == "ab0123456789"
    replayed = await workers.C.resume_existing_stream("s", resume_at=3)
    live = await workers.C.resume_existing_stream("s", resume_at=12)
    source.write(E("abcdefghij", "big2"))
    source.close()
    assert await read_entries(replayed) == [
        (E("123456789", "big", 7), 12),
        (E("abcdefghij", "big2"), 22),
    ]
    assert await read_entries(live) == [(E("abcdefghij", "big2"), 22)]


async def test_a_new_caller_after_the_end_gets_none(workers: Workers) -> None:
    source = TestingSource()
    stream = await workers.P.resumable_stream("s", source.make)
    source.write(E("x", "only"))
    source.close()
    assert await read_entries(stream) == [(E("x", "only"), 1)]
    assert await workers.C.resumable_stream("s", never_called) is None


async def test_yielding_something_else_fails_the_stream(workers: Workers) -> None:
    source = TestingSource()
    stream = await workers.P.resumable_stream("s", source.make)
    source.write(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(rs.StreamFailedError) as info:
        await read(stream)
    assert isinstance(info.value.__cause__, TypeError)


async def read_entries_n(stream: rs.ResumableStream | None, n: int) -> list[tuple[object, int]]:
    assert stream is not None
    entries: list[tuple[object, int]] = []
    while len(entries) < n:
        entries.extend(await stream.next_batch(n - len(entries)))
    return entries
