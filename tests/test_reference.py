"""The reference library's suite (vercel/resumable-stream `tests.ts` and `generic.test.ts`), ported.

P and C are two workers sharing one backend. Where the reference reads a `null`, we read None.
"""

from __future__ import annotations

import anyio
import pytest

from .conftest import Workers
from .helpers import TestingSource, never_called, read

pytestmark = pytest.mark.anyio

DURABLE = True  # conftest: every `workers` test here runs in both modes


async def test_acts_like_a_normal_stream(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    source.write("1\n")
    source.write("2\n")
    source.write("3\n")
    source.close()
    assert await read(s) == "1\n2\n3\n"


async def test_resumes_a_done_stream(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    s2 = await workers.C.resumable_stream("test", source.make)
    source.write("1\n")
    source.write("2\n")
    source.close()
    assert await read(s) == "1\n2\n"
    assert await read(s2) == "1\n2\n"


async def test_has_existing_stream(workers: Workers) -> None:
    source = TestingSource()
    assert await workers.C.has_existing_stream("test") is None
    s = await workers.P.resumable_stream("test", source.make)
    assert await workers.C.has_existing_stream("test") is True
    assert await workers.C.has_existing_stream("test2") is None
    s2 = await workers.C.resumable_stream("test", source.make)
    assert await workers.C.has_existing_stream("test") is True
    source.write("1\n")
    source.write("2\n")
    source.close()
    assert await read(s) == "1\n2\n"
    assert await read(s2) == "1\n2\n"
    assert await workers.C.has_existing_stream("test") == "DONE"


async def test_resumes_a_done_stream_reverse_read(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    s2 = await workers.C.resumable_stream("test", source.make)
    source.write("1\n")
    source.write("2\n")
    source.close()
    assert await read(s2) == "1\n2\n"
    assert await read(s) == "1\n2\n"


async def test_resumes_an_in_progress_stream(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    source.write("1\n")
    s2 = await workers.C.resumable_stream("test", source.make)
    source.write("2\n")
    source.close()
    assert await read(s) == "1\n2\n"
    assert await read(s2) == "1\n2\n"


async def test_actually_streams(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    source.write("1\n")
    s2 = await workers.C.resumable_stream("test", source.make)
    assert await read(s, 1) == "1\n"
    assert await read(s2, 1) == "1\n"
    source.write("2\n")
    source.close()
    assert await read(s) == "2\n"
    assert await read(s2) == "2\n"


async def test_actually_streams_producer_first(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    source.write("1\n")
    s2 = await workers.C.resumable_stream("test", source.make)
    assert await read(s, 1) == "1\n"
    source.write("2\n")
    source.close()
    assert await read(s) == "2\n"
    assert await read(s2) == "1\n2\n"


async def test_actually_streams_consumer_first(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    source.write("1\n")
    s2 = await workers.C.resumable_stream("test", source.make)
    assert await read(s2, 1) == "1\n"
    source.write("2\n")
    source.close()
    assert await read(s) == "1\n2\n"
    assert await read(s2) == "2\n"


async def test_resumes_multiple_streams(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    source.write("1\n")
    s2 = await workers.C.resumable_stream("test", source.make)
    source.write("2\n")
    s3 = await workers.C.resumable_stream("test", source.make)
    source.close()
    assert await read(s) == "1\n2\n"
    assert await read(s2) == "1\n2\n"
    assert await read(s3) == "1\n2\n"


async def test_differentiates_between_streams(workers: Workers) -> None:
    source, source2 = TestingSource(), TestingSource()
    s1 = await workers.P.resumable_stream("test", source.make)
    s2 = await workers.P.resumable_stream("test2", source2.make)
    s12 = await workers.C.resumable_stream("test", source.make)
    s22 = await workers.C.resumable_stream("test2", source2.make)
    source.write("1\n")
    source.write("2\n")
    source.close()
    source2.write("writer2\n")
    source2.close()
    assert await read(s1) == "1\n2\n"
    assert await read(s2) == "writer2\n"
    assert await read(s12) == "1\n2\n"
    assert await read(s22) == "writer2\n"


@pytest.mark.parametrize(("skip", "expected"), [(2, "2\n"), (4, ""), (0, "1\n2\n")])
async def test_respects_resume_at(workers: Workers, skip: int, expected: str) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    source.write("1\n")
    source.write("2\n")
    assert await read(s, 2) == "1\n2\n"
    s2 = await workers.C.resumable_stream("test", source.make, skip)
    source.close()
    assert await read(s) == ""
    assert await read(s2) == expected


async def test_returns_none_if_stream_is_done(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test", source.make)
    source.write("1\n")
    source.write("2\n")
    source.close()
    assert await read(s) == "1\n2\n"
    assert await workers.C.resumable_stream("test", never_called) is None
    assert await workers.P.resumable_stream("test", never_called) is None


async def test_explicit_apis(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.create_new_resumable_stream("test", source.make)
    s2 = await workers.C.resume_existing_stream("test")
    source.write("1\n")
    source.write("2\n")
    source.close()
    assert await read(s) == "1\n2\n"
    assert await read(s2) == "1\n2\n"


async def test_returns_none_if_stream_is_done_explicit_apis(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.create_new_resumable_stream("test", source.make)
    source.write("1\n")
    source.write("2\n")
    source.close()
    assert await read(s) == "1\n2\n"
    assert await workers.C.resume_existing_stream("test") is None
    assert await workers.C.resume_existing_stream("never-created") is None


async def test_custom_backend_hello_world(workers: Workers) -> None:
    source = TestingSource()
    s = await workers.P.resumable_stream("test-stream", source.make)
    source.write("Hello ")
    source.write("World!")
    source.close()
    assert await read(s) == "Hello World!"


async def test_custom_backend_resume(workers: Workers) -> None:
    source = TestingSource()
    s1 = await workers.P.resumable_stream("test-stream-2", source.make)
    s2 = await workers.C.resumable_stream("test-stream-2", never_called)
    source.write("Part 1 ")
    source.write("Part 2")
    source.close()
    assert await read(s1) == "Part 1 Part 2"
    assert await read(s2) == "Part 1 Part 2"


async def test_create_new_replaces_a_finished_stream(workers: Workers) -> None:
    first, second = TestingSource(), TestingSource()
    s = await workers.P.create_new_resumable_stream("test", first.make)
    first.write("old")
    first.close()
    assert await read(s) == "old"
    s2 = await workers.C.create_new_resumable_stream("test", second.make)
    assert await workers.P.has_existing_stream("test") is True
    second.write("new")
    second.close()
    assert await read(s2) == "new"
    with anyio.fail_after(5):
        await second.finished.wait()
