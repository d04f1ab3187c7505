"""Replays far larger than Redis' pub/sub output buffer limit (32 MiB by default)."""

from __future__ import annotations

import pytest

from .conftest import Workers
from .helpers import TestingSource, never_called, read_chunks

pytestmark = pytest.mark.anyio

DURABLE = True  # conftest: every `workers` test here runs in both modes

MIB = 1 << 20


@pytest.mark.parametrize("flavor", ["memory", "redis"], indirect=True)
async def test_a_40_mib_replay_arrives_whole(workers: Workers) -> None:
    source = TestingSource()
    own = await workers.P.resumable_stream("big", source.make)
    chunks = [chr(ord("a") + i % 26) * MIB for i in range(40)]
    for chunk in chunks:
        source.write(chunk)
    assert len(await read_chunks(own, 40)) == 40
    follower = await workers.C.resumable_stream("big", never_called, 5)
    source.write("end")
    source.close()
    got = await read_chunks(follower)
    assert got == [chunks[0][5:], *chunks[1:], "end"]
