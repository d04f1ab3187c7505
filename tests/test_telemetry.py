"""Telemetry: OpenTelemetry metrics and spans (SDK in-memory reader and exporter), the trace
context a resume request carries, `ctx.stats()`, the stream id in log records, and a process
without `opentelemetry-api`.

Two contexts stand for two processes: the producer's (P) and the follower's (C), each with its
own meter provider, on the in-memory backend and on a real Redis.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import resumable_stream as rs
from resumable_stream import _protocol as p
from resumable_stream._telemetry import NOOP

from .asgi_driver import serve
from .conftest import RedisServer
from .helpers import TestingSource, poll_until, read

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Process:
    """What one process exports: its meter provider's metrics."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], Any]:
        """Every data point: a sum's value, or a histogram's (count, sum)."""
        found: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                assert scope.scope.name == "resumable_stream"
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        key = (metric.name, frozenset(dict(point.attributes or {}).items()))
                        if isinstance(point, HistogramDataPoint):
                            found[key] = (point.count, point.sum)
                        else:
                            assert isinstance(point, NumberDataPoint)
                            found[key] = point.value
        return found

    def of(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        return {attrs: value for (n, attrs), value in self.metrics().items() if n == name}


def attrs(**values: str) -> frozenset[tuple[str, Any]]:
    return frozenset(values.items())


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(exporter))
    return tracer, exporter


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def by_stream(found: list[ReadableSpan], stream_id: str) -> list[ReadableSpan]:
    return [s for s in found if (s.attributes or {}).get("resumable_stream.stream_id") == stream_id]


# A producer in a process of its own, killed with SIGKILL once it has produced its first words.
KILLED_PRODUCER = textwrap.dedent(
    """
    import sys, anyio, resumable_stream as rs
    from resumable_stream.redis import RedisBackend

    async def llm():
        yield "first words"
        print("ready", flush=True)
        await anyio.sleep_forever()
        yield "never"

    async def main():
        async with rs.ResumableStreamContext(backend=RedisBackend(sys.argv[1]),
                                             key_prefix=sys.argv[2], liveness_timeout=1.0) as P:
            stream = await P.resumable_stream("killed", llm)
            await stream.__anext__()
            await anyio.sleep_forever()

    anyio.run(main)
    """
)


@pytest.mark.parametrize("flavor", ["memory", "redis"])
async def test_metrics_spans_and_stats_of_two_processes(
    flavor: str,
    request: pytest.FixtureRequest,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracer, exporter = spans
    prefix = f"otel-{uuid.uuid4().hex}"
    if flavor == "memory":
        memory = rs.MemoryBackend()
        backends: tuple[rs.Backend, rs.Backend] = (memory, memory)
        server: RedisServer | None = None
    else:
        from resumable_stream.redis import RedisBackend

        server = request.getfixturevalue("redis_server")
        backends = (RedisBackend(server.url), RedisBackend(server.url))
    producer, follower = Process(), Process()
    options: dict[str, Any] = {"key_prefix": prefix, "tracer_provider": tracer}
    options.update(drain_timeout=2.0, liveness_timeout=1.0, resume_timeout=0.5)
    P = rs.ResumableStreamContext(backend=backends[0], meter_provider=producer.meters, **options)
    C = rs.ResumableStreamContext(backend=backends[1], meter_provider=follower.meters, **options)
    assert not P.stats().backend_connected
    with anyio.fail_after(20), caplog.at_level(logging.WARNING, "resumable_stream"):
        async with P, C:
            assert P.stats() == rs.ContextStats(0, 0, 0, True, 0, None)
            # 1. A follower resumes mid-stream (3 characters in): it gets a replay, then live.
            s1 = TestingSource()
            own = await P.resumable_stream("s1", s1.make)
            assert own is not None
            s1.write("hello ")
            assert await own.__anext__() == "hello "
            resumed = await C.resume_existing_stream("s1", resume_at=3)
            assert (P.stats().producers, C.stats().followers) == (1, 1)
            P._telemetry.flush()  # else done once a second, and when the context closes
            C._telemetry.flush()
            assert producer.of("resumable_stream.streams.active") == {attrs(role="producer"): 1}
            assert follower.of("resumable_stream.streams.active") == {attrs(role="follower"): 1}
            s1.write("world")
            s1.close()
            assert await read(resumed) == "lo world"
            assert await read(own) == "world"
            assert C.stats().followers == 0
            assert P.stats().producers == 0
            assert P.stats().lingering == 1  # keeps its text for late resumes

            # 2. A stream that fails; a later resume learns it.
            s2 = TestingSource()
            own = await P.resumable_stream("s2", s2.make)
            s2.write("x")
            s2.fail(RuntimeError("boom"))
            with pytest.raises(rs.StreamFailedError):
                await read(own)
            with pytest.raises(rs.StreamFailedError):
                await C.resume_existing_stream("s2")

            # 3. A stream cancelled from the follower's process, with a follower live from 0.
            s3 = TestingSource()
            own = await P.resumable_stream("s3", s3.make)
            live = await C.resume_existing_stream("s3")
            await C.cancel_stream("s3")
            with pytest.raises(rs.StreamCancelledError):
                await read(live)
            with pytest.raises(rs.StreamCancelledError):
                await read(own)

            # 4. A stream whose producer died.
            if server is None:
                # In one process: its keys say it runs, and nobody produces it.
                async with memory.connect(lambda channel, data: None) as raw:
                    await raw.set(p.Keys(prefix).sentinel("killed"), "1", 60)
                with pytest.raises(rs.ProducerLostError):
                    await C.resume_existing_stream("killed")
            else:
                command = [sys.executable, "-c", KILLED_PRODUCER, server.url, prefix]
                async with await anyio.open_process(command, stderr=None) as process:
                    assert process.stdout is not None
                    output = b""
                    while b"ready" not in output:
                        output += await process.stdout.receive()
                    doomed = await C.resume_existing_stream("killed")
                    assert await read(doomed, 1) == "first words"
                    process.send_signal(signal.SIGKILL)
                    await process.wait()
                    with pytest.raises(rs.ProducerLostError):
                        await read(doomed)
                with pytest.raises(rs.ProducerLostError):
                    await C.resume_existing_stream("killed")  # a late reader learns it too

                # The subscriber connections drop and come back: the producer's (the follower's
                # subscribes to nothing any more, so it is not a pub/sub client to kill).
                import redis.asyncio

                async with redis.asyncio.Redis.from_url(server.url) as admin:
                    await admin.client_kill_filter(_type="pubsub")

                async def reconnected() -> int:
                    return P.stats().reconnects

                await poll_until(reconnected, 1)
                assert P.stats().backend_connected
                assert P.stats().last_reconnect is not None

        assert not P.stats().backend_connected

    on_redis = server is not None
    # How streams ended, per process and role.
    assert producer.of("resumable_stream.streams.active") == {attrs(role="producer"): 0}
    assert producer.of("resumable_stream.streams.ended") == {
        attrs(role="producer", outcome="done"): 1,
        attrs(role="producer", outcome="failed"): 1,
        attrs(role="producer", outcome="cancelled"): 1,
    }
    assert follower.of("resumable_stream.streams.active") == {attrs(role="follower"): 0}
    ended = {
        attrs(role="follower", outcome="done"): 1,
        attrs(role="follower", outcome="cancelled"): 1,
    }
    if on_redis:
        ended[attrs(role="follower", outcome="lost")] = 1
    assert follower.of("resumable_stream.streams.ended") == ended
    # Resumes: only the follower's process resumed anything.
    assert producer.of("resumable_stream.resumes") == {}
    resumes = {
        attrs(result="replayed"): 2 if on_redis else 1,
        attrs(result="finished"): 1,
        attrs(result="live"): 1,
        attrs(result="lost"): 1,
    }
    assert follower.of("resumable_stream.resumes") == resumes
    durations = follower.of("resumable_stream.resume.duration")
    assert {a: count for a, (count, _) in durations.items()} == resumes
    assert all(0 < total < 10 for _, total in durations.values())
    # Characters replayed: "lo " (and "first words" from the killed producer).
    assert follower.of("resumable_stream.replay.size") == {
        attrs(result="replayed"): (2, 3 + 11) if on_redis else (1, 3),
        attrs(result="live"): (1, 0),
    }
    # Every follower read all it had been sent: nothing unread at its end.
    backlog = {attrs(outcome="done"): (1, 0), attrs(outcome="cancelled"): (1, 0)}
    if on_redis:
        backlog[attrs(outcome="lost")] = (1, 0)
    assert follower.of("resumable_stream.follower.backlog") == backlog
    # Backend commands: each process its own. The producer's: its inbox and three request
    # channels subscribed, three elections (INCR with EXPIRE); the follower elected nothing.
    sent_p = {
        dict(a)["command"]: n for a, n in producer.of("resumable_stream.backend.commands").items()
    }
    sent_c = {
        dict(a)["command"]: n for a, n in follower.of("resumable_stream.backend.commands").items()
    }
    assert (sent_p["incr"], sent_p["expire"], sent_p["subscribe"]) == (3, 3, 4)
    assert "incr" not in sent_c
    assert sent_c["subscribe"] == 4  # the context's inbox, then s1, s3 and the dead stream
    if not on_redis:
        # Exactly what the backend served, but for the one command the test sent itself.
        served = dict(memory.commands)
        served["set"] -= 1
        assert {k: sent_p.get(k, 0) + sent_c.get(k, 0) for k in served} == served
    reconnects: dict[frozenset[tuple[str, Any]], int] = {frozenset(): 1} if on_redis else {}
    assert producer.of("resumable_stream.backend.reconnects") == reconnects
    # The follower's subscriber holds no channel any more: it is not a pub/sub client to kill
    # (or, if its last UNSUBSCRIBE was still on the way, it reconnects too).
    follower_reconnects = C.stats().reconnects
    assert follower_reconnects in (0, 1)
    expected: dict[frozenset[tuple[str, Any]], int] = {}
    if follower_reconnects:
        expected[frozenset()] = follower_reconnects
    assert follower.of("resumable_stream.backend.reconnects") == expected

    # Spans: one per stream on the producer, with its final length and outcome.
    produced = {
        (s.attributes or {})["resumable_stream.stream_id"]: s
        for s in named(exporter, "resumable_stream.produce")
    }
    assert sorted(map(str, produced)) == ["s1", "s2", "s3"]
    assert [
        (
            (s.attributes or {})["resumable_stream.length"],
            (s.attributes or {})["resumable_stream.outcome"],
        )
        for s in (produced["s1"], produced["s2"], produced["s3"])
    ] == [(11, "done"), (1, "failed"), (0, "cancelled")]
    assert produced["s2"].status.status_code == StatusCode.ERROR
    # One per resume on the follower.
    resume_spans = named(exporter, "resumable_stream.resume")
    assert len(resume_spans) == sum(resumes.values())
    [resume] = by_stream(resume_spans, "s1")
    assert (resume.attributes or {})["resumable_stream.result"] == "replayed"
    assert (resume.attributes or {})["resumable_stream.replay.size"] == 3
    # The producer's serving of that resume is in the follower's trace, a child of its span:
    # the request carried it (through Redis: nothing in-process relates the two tasks).
    [served_s1] = by_stream(named(exporter, "resumable_stream.resume.serve"), "s1")
    assert resume.context is not None
    assert served_s1.context is not None
    assert served_s1.context.trace_id == resume.context.trace_id
    assert served_s1.parent is not None
    assert served_s1.parent.span_id == resume.context.span_id
    assert produced["s1"].context is not None
    assert served_s1.context.trace_id != produced["s1"].context.trace_id

    # Every warning about a stream names it in `extra`.
    failed = [r for r in caplog.records if "failed" in r.getMessage() and "s2" in r.getMessage()]
    assert failed
    assert all(getattr(r, "stream_id", None) == "s2" for r in failed)
    stream_records = [r for r in caplog.records if "stream '" in r.getMessage()]
    assert stream_records
    for record in stream_records:
        assert f"stream {getattr(record, 'stream_id', None)!r}" in record.getMessage()


async def test_stream_ids_stay_out_of_spans_when_asked(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    backend = rs.MemoryBackend()
    options: dict[str, Any] = {"tracer_provider": tracer, "trace_stream_ids": False}
    async with (
        rs.ResumableStreamContext(backend=backend, **options) as P,
        rs.ResumableStreamContext(backend=backend, **options) as C,
    ):
        source = TestingSource()
        own = await P.resumable_stream("secret-capability", source.make)
        source.write("text")
        follower = await C.resume_existing_stream("secret-capability", resume_at=1)
        source.close()
        with anyio.fail_after(5):
            assert await read(follower) == "ext"
            assert await read(own) == "text"
    found = exporter.get_finished_spans()
    assert {s.name for s in found} == {
        "resumable_stream.produce",
        "resumable_stream.resume",
        "resumable_stream.resume.serve",
    }
    for span in found:
        assert "secret-capability" not in repr(dict(span.attributes or {}))


async def test_a_follower_that_sends_no_trace_context_is_served(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    # An older follower, or one that traces nothing, sends the request's five fields.
    assert p.Request("l", "r", 3, False, 10).pack() == b'Q["l","r",3,false,10]'
    assert p.parse(b'Q["l","r",3,false,10]') == p.Request("l", "r", 3, False, 10, None)
    traced = p.Request("l", "r", 3, False, 10, "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    assert p.parse(traced.pack()) == traced
    with pytest.raises(ValueError, match="malformed"):
        p.parse(b'Q["l","r",3,false,10,"t","extra"]')
    tracer, exporter = spans
    backend = rs.MemoryBackend()
    async with (
        rs.ResumableStreamContext(backend=backend, tracer_provider=tracer) as P,
        rs.ResumableStreamContext(backend=backend, telemetry=False) as C,
    ):
        assert C._telemetry is NOOP
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        source.write("abc")
        follower = await C.resume_existing_stream("s", resume_at=1)
        source.close()
        with anyio.fail_after(5):
            assert await read(follower) == "bc"
            assert await read(own) == "abc"
    [served] = named(exporter, "resumable_stream.resume.serve")
    assert served.parent is None  # a trace of its own
    assert named(exporter, "resumable_stream.resume") == []


# A process where `import opentelemetry` fails, as if the API were not installed.
WITHOUT_OTEL = textwrap.dedent(
    """
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Blocker())

    import anyio
    import resumable_stream as rs
    from resumable_stream._telemetry import NOOP, Telemetry

    calls = []
    for name in ("producer_started", "follower_started", "resume", "command", "traceparent"):
        def spy(*args, _name=name, _method=getattr(Telemetry, name)):
            calls.append(_name)
            return _method(*args)
        setattr(Telemetry, name, spy)

    async def main():
        backend = rs.MemoryBackend()
        async with rs.ResumableStreamContext(backend=backend) as P, \\
                rs.ResumableStreamContext(backend=backend) as C:
            assert P._telemetry is NOOP and C._telemetry is NOOP
            gate = anyio.Event()

            async def make():
                yield "hello "
                await gate.wait()
                yield "world"

            own = await P.resumable_stream("s", make)
            assert await own.__anext__() == "hello "
            follower = await C.resume_existing_stream("s", resume_at=2)
            assert C.stats().followers == 1
            gate.set()
            assert "".join([c async for c in follower]) == "llo world"
            assert "".join([c async for c in own]) == "world"
            try:
                rs.ResumableStreamContext(backend=backend, meter_provider=object())
            except ValueError as exc:
                assert "OpenTelemetry" in str(exc)
            else:
                raise AssertionError("a meter provider without the API")
        names = ("opentelemetry", "resumable_stream._otel")
        loaded = [m for m in sys.modules if m.startswith(names)]
        assert not loaded, loaded
        # Only the no-op ran: a few calls per stream, none per chunk or command.
        assert "command" not in calls and "traceparent" in calls, calls
        print("ok", sorted(set(calls)))

    anyio.run(main)
    """
)


def test_without_the_opentelemetry_api_nothing_of_it_is_imported_or_run() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_OTEL],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ['follower_started', 'producer_started', 'resume'")


async def test_traces_nest_in_the_caller_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    # The produce span is a child of whatever span started the stream (an HTTP request's), and
    # the generator runs inside it.
    tracer, exporter = spans
    otel_tracer = tracer.get_tracer("test")
    inner: list[Any] = []

    async def make() -> AsyncIterator[str]:
        from opentelemetry import trace

        inner.append(trace.get_current_span().get_span_context())
        yield "x"

    async with rs.ResumableStreamContext(backend=rs.MemoryBackend(), tracer_provider=tracer) as P:
        with otel_tracer.start_as_current_span("http request") as http:
            stream = await P.resumable_stream("s", make)
        with anyio.fail_after(5):
            assert await read(stream) == "x"
    [produce] = named(exporter, "resumable_stream.produce")
    assert produce.parent is not None
    assert produce.parent.span_id == http.get_span_context().span_id
    assert inner == [produce.context]


async def test_the_prometheus_example_lists_our_instruments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    example = importlib.import_module("examples.prometheus_app")
    async with serve(example.app) as client:
        async with client.request("/chat/p1", query="prompt=hi") as first:
            head = await first.events(3)
            first.disconnect()
        async with client.request("/chat/p1", headers={"Last-Event-ID": head[-1].id}) as again:
            rest = await again.events()
        assert "".join(e.data for e in head + rest).startswith("You asked 'hi'.")
        client.state["streams"]._telemetry.flush()  # else done once a second
        async with client.request("/metrics") as response:
            assert response.status == 200
            page = (await response.read()).decode()
        async with client.request("/healthz") as response:
            health = json.loads(await response.read())
    assert health["backend_connected"] is True
    assert health["lingering"] == 1
    samples = {
        line.split("{")[0].split(" ")[0]: line
        for line in page.splitlines()
        if line.startswith("resumable_stream")
    }
    for name in (
        "resumable_stream_streams_active",
        "resumable_stream_streams_ended_total",
        "resumable_stream_resumes_total",
        "resumable_stream_resume_duration_seconds_count",
        "resumable_stream_replay_size_count",
        "resumable_stream_backend_commands_total",
    ):
        assert name in samples, name
    assert 'outcome="done"' in samples["resumable_stream_streams_ended_total"]
    # The reconnect resumed where it stopped: live, or replayed if a word came meanwhile.
    assert re.search(r'result="(live|replayed)"} 1\.0$', samples["resumable_stream_resumes_total"])


async def test_a_durable_resume_reads_the_log_and_asks_no_producer(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    # A durable stream's follower reads the backend's log: its resume span covers that read,
    # and no producer serves anything (no serving span) unless the log lost text.
    tracer, exporter = spans
    backend = rs.MemoryBackend()
    follower = Process()
    async with (
        rs.ResumableStreamContext(backend=backend, durable=True, tracer_provider=tracer) as P,
        rs.ResumableStreamContext(
            backend=backend, durable=True, tracer_provider=tracer, meter_provider=follower.meters
        ) as C,
    ):
        source = TestingSource()
        own = await P.resumable_stream("d", source.make)
        source.write("hello")
        source.close()
        with anyio.fail_after(5):
            assert await read(own) == "hello"
            assert await read(await C.resume_existing_stream("d", resume_at=2)) == "llo"
    assert follower.of("resumable_stream.resumes") == {attrs(result="replayed"): 1}
    assert follower.of("resumable_stream.replay.size") == {attrs(result="replayed"): (1, 3)}
    assert follower.of("resumable_stream.streams.ended") == {
        attrs(role="follower", outcome="done"): 1
    }
    [resume] = named(exporter, "resumable_stream.resume")
    assert (resume.attributes or {})["resumable_stream.result"] == "replayed"
    assert named(exporter, "resumable_stream.resume.serve") == []


async def test_measurements_reach_the_instruments_once_a_second_and_no_span_without_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No explicit flush: the context's task hands measurements over every FLUSH_INTERVAL. No
    # tracer provider: no span is made, and a follower's request carries no trace context.
    from resumable_stream import _otel

    monkeypatch.setattr(_otel, "FLUSH_INTERVAL", 0.01)
    backend = rs.MemoryBackend()
    producer, follower = Process(), Process()
    requests: list[p.Message] = []
    keys = p.Keys("resumable-stream")
    async with (
        backend.connect(lambda channel, data: requests.append(p.parse(data))) as spy,
        rs.ResumableStreamContext(backend=backend, meter_provider=producer.meters) as P,
        rs.ResumableStreamContext(backend=backend, meter_provider=follower.meters) as C,
    ):
        await spy.subscribe(keys.request("s"))
        source = TestingSource()
        own = await P.resumable_stream("s", source.make)
        assert own is not None
        source.write("abc")
        assert await own.__anext__() == "abc"  # the producer listens for requests by now
        resumed = await C.resume_existing_stream("s", resume_at=1)
        source.close()
        with anyio.fail_after(5):
            assert await read(resumed) == "bc"
            assert await read(own) == ""

            async def ended() -> object:
                return producer.of("resumable_stream.streams.ended")

            await poll_until(ended, {attrs(role="producer", outcome="done"): 1})
    [request] = requests
    assert isinstance(request, p.Request)
    assert request.traceparent is None
    assert follower.of("resumable_stream.resumes") == {attrs(result="replayed"): 1}
