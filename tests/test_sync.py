"""The sync context (`rs.create_sync_context`): threads writing and reading at once, the writer's
semantics from sync code, batching across the thread boundary, and forked processes.

Each test's contexts run their own event loop in a thread; the test is plain sync code, as a
Celery task or a Flask view is. On the in-memory backend one context serves every thread (a
memory backend is one process's); on a real server (Redis, or Valkey: whichever the session
starts) and the local cluster, the writers use one context and the readers another, as two
processes would.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

import resumable_stream as rs

JOIN_TIMEOUT = 30.0  # seconds: the bound of any one thread of a test
KINDS = ["memory", "redis", "redis-durable", "cluster"]


@dataclass
class Pair:
    """A writers' context and a readers' context on one backend (the same one in memory)."""

    writers: rs.SyncResumableStreamContext
    readers: rs.SyncResumableStreamContext
    url: str | None


def _url(kind: str, request: pytest.FixtureRequest) -> str | None:
    if kind.startswith("memory"):
        return None
    if kind.startswith("cluster"):
        seed = request.getfixturevalue("redis_cluster").seed_url
        return str(seed).replace("redis://", "redis+cluster://", 1)
    return str(request.getfixturevalue("redis_server").url)


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    kind = str(request.param)
    url = _url(kind, request)
    options: dict[str, Any] = {
        "key_prefix": f"sync-{uuid.uuid4().hex}",
        "durable": kind.endswith("-durable"),
        "drain_timeout": 2.0,
    }
    with ExitStack() as stack:
        if url is None:
            ctx = stack.enter_context(rs.create_sync_context(backend=rs.MemoryBackend(), **options))
            yield Pair(ctx, ctx, None)
        else:
            writers = stack.enter_context(rs.create_sync_context(url, **options))
            readers = stack.enter_context(rs.create_sync_context(url, **options))
            yield Pair(writers, readers, url)


def run_threads(*targets: Callable[[], None]) -> None:
    """Start every target at once (a barrier), join them within `JOIN_TIMEOUT`, and raise the
    first error any of them raised."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def run(target: Callable[[], None]) -> None:
        try:
            barrier.wait(JOIN_TIMEOUT)
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(target,), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
        assert not thread.is_alive(), "a thread did not finish in time"
    if errors:
        raise errors[0]


def chunks_of(i: int, count: int = 3000) -> list[str]:
    return [f"{i}:{n}{'😀' if n % 7 == 0 else ''} " for n in range(count)]


def test_eight_threads_at_once_four_writing_four_reading(pair: Pair) -> None:
    ids = [f"s{i}-{uuid.uuid4().hex}" for i in range(4)]
    texts = ["".join(chunks_of(i)) for i in range(4)]
    got: dict[int, str] = {}

    def writer(i: int) -> Callable[[], None]:
        def write() -> None:
            with pair.writers.writer(ids[i]) as w:
                for chunk in chunks_of(i):
                    w.write(chunk)

        return write

    # Every reader asks before or while its stream is written, waiting for it to start: from
    # its start, from an offset, and on the writers' own context (where it reads the
    # producer's buffer) as well as on the other one.
    starts = [0, 0, 1234, 5]

    def reader(i: int, ctx: rs.SyncResumableStreamContext) -> Callable[[], None]:
        def read() -> None:
            stream = ctx.resume_existing_stream(ids[i], resume_at=starts[i], wait=JOIN_TIMEOUT)
            assert stream is not None
            with stream:
                got[i] = "".join(stream)

        return read

    run_threads(
        *(writer(i) for i in range(4)),
        reader(0, pair.readers),
        reader(1, pair.writers),
        reader(2, pair.readers),
        reader(3, pair.readers),
    )
    for i in range(4):
        assert got[i] == texts[i][starts[i] :], i
        assert pair.readers.has_existing_stream(ids[i]) == "DONE"


def test_the_writers_semantics_from_sync_code(pair: Pair) -> None:
    W, R = pair.writers, pair.readers
    sid = f"sem-{uuid.uuid4().hex}"

    # Done; a second writer of the id is refused.
    with W.writer(sid) as w:
        w.write("Hello")
        w.write(rs.Event(", world", event="greeting"))
        w.write("")
        assert w.attempt == 1
    stream = R.resume_existing_stream(sid, resume_at=0)
    assert stream is not None
    assert "".join(stream) == "Hello, world"
    with pytest.raises(rs.StreamExistsError), W.writer(sid):
        pass
    with pytest.raises(rs.ResumableStreamError, match="has ended it"):
        w.write("more")

    # An exception ends it failed, and goes on; fail(message) likewise, without one.
    failed = f"failed-{uuid.uuid4().hex}"

    def raising_block() -> None:
        with W.writer(failed) as w:
            w.write("partial")
            raise KeyError("model down")

    with pytest.raises(KeyError):
        raising_block()
    with pytest.raises(rs.StreamFailedError):
        R.resume_existing_stream(failed)
    failed2 = f"failed2-{uuid.uuid4().hex}"
    with W.writer(failed2) as w:
        w.write("partial")
        w.fail("the model refused")
        with pytest.raises(rs.ResumableStreamError):
            w.write("after the end")
    stream = R.resume_existing_stream(failed2, resume_at=0)
    assert stream is not None
    with pytest.raises(rs.StreamFailedError):
        "".join(stream)

    # A stop from the other context: the next write raises, and the block ends quietly.
    stopped = f"stopped-{uuid.uuid4().hex}"
    with W.writer(stopped) as w:
        w.write("before the stop")
        follower = R.resume_existing_stream(stopped, resume_at=0)
        assert follower is not None
        assert next(follower) == "before the stop"
        R.cancel_stream(stopped)
        with pytest.raises(rs.StreamCancelledError):
            list(follower)  # the stop reached the writer's process: its readers end
        assert w.cancelled
        with pytest.raises(rs.StreamCancelledError):
            w.write("x")
        w.write("the block goes on")  # it raises again, and leaving takes it back
    assert w.cancelled

    # A reader that waits: it gets nothing after `wait` with no stream.
    assert R.resume_existing_stream(f"never-{uuid.uuid4().hex}", wait=0.2) is None


def test_a_retried_job_restarts_its_stream(pair: Pair) -> None:
    W, R = pair.writers, pair.readers
    sid = f"retry-{uuid.uuid4().hex}"
    readers: list[rs.SyncResumableStream] = []

    def first_try() -> None:
        with W.writer(sid, restart=True) as w:
            w.write("first try, ")
            reader = R.resume_existing_stream(sid, resume_at=0)
            assert reader is not None
            assert next(reader) == "first try, "
            readers.append(reader)
            raise ConnectionError("the model's connection broke")

    with pytest.raises(ConnectionError):
        first_try()
    with pytest.raises(rs.StreamFailedError):
        list(readers[0])
    with W.writer(sid, restart=True) as w:
        assert w.attempt == 2
        w.write("second try")
    # A new reader reads the new attempt from its start; a cursor into the first gets the
    # restart, never the second's text from its offset.
    fresh = R.resume_existing_stream(sid, resume_at=0, attempt=2)
    assert fresh is not None
    assert fresh.attempt == 2
    assert "".join(fresh) == "second try"
    with pytest.raises(rs.StreamRestartedError) as restarted:
        R.resume_existing_stream(sid, resume_at=len("first try, "))
    assert restarted.value.attempt == 2
    # One that ended done is not started again.
    with pytest.raises(rs.StreamExistsError), W.writer(sid, restart=True):
        pass


def test_a_fast_writer_hands_over_batches_and_a_reader_takes_batches(pair: Pair) -> None:
    W, R = pair.writers, pair.readers
    sid = f"batches-{uuid.uuid4().hex}"
    count = 20_000
    with W.writer(sid) as w:
        runner = w._runner
        handoffs = 0
        call_soon = runner.call_soon

        def counted(fn: Callable[[], object]) -> None:
            nonlocal handoffs
            handoffs += 1
            call_soon(fn)

        runner.call_soon = counted  # type: ignore[method-assign]
        for n in range(count):
            w.write(f"{n} ")
    # However the two threads interleave, a hand-off takes every chunk queued until then.
    assert handoffs < count / 10
    stream = R.resume_existing_stream(sid, resume_at=0)
    assert stream is not None
    batches = 0
    text = []
    with stream:
        while True:
            try:
                batch = stream.next_batch()
            except StopIteration:
                break
            batches += 1
            text += [item for item, _ in batch]
    assert "".join(text) == "".join(f"{n} " for n in range(count))  # type: ignore[arg-type]
    assert batches < count / 100


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_async_writers_write_many_appends_a_batch(anyio_backend: str) -> None:
    """What the sync writer's loop calls: a batch at once, with `write`'s checks."""
    async with rs.create_resumable_stream_context(backend=rs.MemoryBackend()) as ctx:
        async with ctx.writer("batch") as w:
            reader = await ctx.resume_existing_stream("batch", resume_at=0)
            assert reader is not None
            w.write_many(["a", "", rs.Event("b", event="named"), "c"])
            with pytest.raises(ValueError, match="str or Event"):
                w.write_many(["d", 42])  # type: ignore[list-item]
            w.write_many([])
        batch = await reader.next_batch()
        assert batch == [("a", 1), (rs.Event("b", event="named"), 2), ("c", 3), ("d", 4)]
        with pytest.raises(rs.ResumableStreamError, match="has ended it"):
            w.write_many(["late"])
        async with ctx.writer("stopped") as w:
            await ctx.cancel_stream("stopped")
            with pytest.raises(rs.StreamCancelledError):
                w.write_many(["after the stop"])
        assert w.cancelled


def test_misuse_is_refused() -> None:
    with rs.create_sync_context(backend=rs.MemoryBackend()) as ctx:
        w = ctx.writer("x")
        with pytest.raises(RuntimeError, match=r"with ctx\.writer"):
            w.write("outside the block")
        with pytest.raises(ValueError, match="str or Event"), ctx.writer("y") as w:
            w.write(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="stream_id"):
            ctx.writer("")
        with pytest.raises(ValueError, match="restart"):
            ctx.writer("z", restart="yes")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="closed"):
        ctx.has_existing_stream("x")


def test_a_context_used_before_it_is_opened_opens_itself() -> None:
    ctx = rs.create_sync_context(backend=rs.MemoryBackend())
    try:
        with ctx.writer("lazy") as w:
            w.write("opened on first use")
        assert ctx.has_existing_stream("lazy") == "DONE"
        assert ctx.stats().backend_connected
    finally:
        ctx.close()


def test_the_options_go_to_the_async_context_compat_included() -> None:
    with pytest.raises(ValueError, match="ttl"):
        rs.create_sync_context(backend=rs.MemoryBackend(), ttl=0)
    with rs.create_sync_context(backend=rs.MemoryBackend(), compat="vercel") as ctx:
        with pytest.raises(ValueError, match="compat"):
            ctx.writer("x")
        assert ctx.resume_existing_stream("x", wait=0.05) is None


# Forked processes


def _fork() -> Any:
    # Python 3.12+ warns of fork() in a process with threads (our loop's): that is the case
    # under test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return multiprocessing.get_context("fork")


def _child_writes(
    ctx: rs.SyncResumableStreamContext, parent_id: str, child_id: str, conn: Any
) -> None:
    try:
        stream = ctx.resume_existing_stream(parent_id, resume_at=0)
        text = "" if stream is None else "".join(stream)
        with ctx.writer(child_id) as w:
            w.write(f"from the child {os.getpid()}")
        conn.send(("ok", text))
    except BaseException as exc:
        conn.send(("error", repr(exc)))


def test_a_forked_child_reopens_the_context_and_leaves_the_parents_alone(
    redis_server: Any,
) -> None:
    prefix = f"fork-{uuid.uuid4().hex}"
    # Durable: the child's text outlives its process, which exits before the parent reads it.
    with rs.create_sync_context(redis_server.url, key_prefix=prefix, durable=True) as ctx:
        parent_id, child_id = f"p-{uuid.uuid4().hex}", f"c-{uuid.uuid4().hex}"
        with ctx.writer(parent_id) as w:
            w.write("from the parent")
        mp = _fork()
        receive, send = mp.Pipe(duplex=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            child = mp.Process(target=_child_writes, args=(ctx, parent_id, child_id, send))
            child.start()
        try:
            assert receive.poll(JOIN_TIMEOUT), "the child did not answer"
            assert receive.recv() == ("ok", "from the parent")
            child.join(JOIN_TIMEOUT)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join()
        # The parent's loop and connections are untouched: it goes on as before.
        stream = ctx.resume_existing_stream(child_id, resume_at=0)
        assert stream is not None
        assert "".join(stream) == f"from the child {child.pid}"
        with ctx.writer(f"after-{uuid.uuid4().hex}") as w:
            w.write("still fine")


def _child_uses(ctx: rs.SyncResumableStreamContext, conn: Any) -> None:
    try:
        ctx.has_existing_stream("anything")
        conn.send("no error")
    except RuntimeError as exc:
        conn.send(str(exc))


def test_a_context_of_objects_refuses_to_work_in_a_forked_child(redis_server: Any) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_server.url)
    with rs.create_sync_context(client, key_prefix=f"fork-{uuid.uuid4().hex}") as ctx:
        assert ctx.has_existing_stream("anything") is None
        mp = _fork()
        receive, send = mp.Pipe(duplex=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            child = mp.Process(target=_child_uses, args=(ctx, send))
            child.start()
        try:
            assert receive.poll(JOIN_TIMEOUT)
            assert "make the context with a URL" in receive.recv()
            child.join(JOIN_TIMEOUT)
        finally:
            if child.is_alive():
                child.kill()
                child.join()
        assert ctx.has_existing_stream("anything") is None  # the parent's still works
        ctx._loop().call(client.aclose)  # in the loop its connections were made in
