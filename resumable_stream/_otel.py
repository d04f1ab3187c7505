"""Telemetry through OpenTelemetry: imported only when `opentelemetry-api` is installed.

The instruments and spans here are the contract the documentation's table documents
(`docs/operations/telemetry.md`): change a name or an attribute there and here together.

Measurements are not handed to the instruments where they happen: an SDK instrument takes
microseconds per call (more than a resume's own work on the process that answers it), so each
event only adds to a plain dict here, and `flush` hands what accumulated to the instruments:
every `FLUSH_INTERVAL` seconds from the context's task group, when much has accumulated, and
when the context closes. A scrape sees counts at most that old. Spans are made where they
happen (they must be current while the work runs).
"""

from __future__ import annotations

import time
from contextvars import Token
from types import TracebackType
from typing import Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._telemetry import Resume, Serve, Telemetry, resume_result_of
from ._version import __version__

__all__ = ["FLUSH_INTERVAL", "OtelTelemetry"]

NAME = "resumable_stream"
STREAM_ID = "resumable_stream.stream_id"
FLUSH_INTERVAL = 1.0  # seconds
_FLUSH_AT = 1024  # pending measurements that make an early flush

_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
_CHARACTERS: list[float] = [0, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000]
_PROPAGATOR = TraceContextTextMapPropagator()
_NO_TRACING = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)

# Instruments, by index in `OtelTelemetry._instruments`.
_ACTIVE, _ENDED, _RESUMES, _DURATION, _REPLAY, _COMMANDS, _RECONNECTS, _BACKLOG = range(8)
_PRODUCER = (("role", "producer"),)
_FOLLOWER = (("role", "follower"),)

Attributes = tuple[tuple[str, str], ...]


def _histogram(
    meter: metrics.Meter, name: str, unit: str, description: str, buckets: list[float]
) -> metrics.Histogram:
    """A histogram with advised bucket boundaries (seconds and characters fit the default ones
    badly); without them on an API older than 1.23, which has no such advice."""
    try:
        return meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:
        return meter.create_histogram(name, unit=unit, description=description)


class OtelTelemetry(Telemetry):
    __slots__ = (
        "_instruments",
        "_pending",
        "_records",
        "_stream_ids",
        "_tracer",
        "_tracer_provider",
    )

    enabled = True

    def __init__(
        self, meter_provider: Any | None, tracer_provider: Any | None, stream_ids: bool
    ) -> None:
        version = __version__
        meter = metrics.get_meter(NAME, version, meter_provider=meter_provider)
        self._tracer = trace.get_tracer(NAME, version, tracer_provider=tracer_provider)
        self._tracer_provider = tracer_provider
        self._stream_ids = stream_ids
        self._instruments: tuple[Any, ...] = (
            meter.create_up_down_counter(
                "resumable_stream.streams.active",
                unit="{stream}",
                description="Streams running in this process, by role (producer or follower)",
            ),
            meter.create_counter(
                "resumable_stream.streams.ended",
                unit="{stream}",
                description="Streams that ended, by role and outcome",
            ),
            meter.create_counter(
                "resumable_stream.resumes",
                unit="{resume}",
                description="Resumes of existing streams, by result",
            ),
            _histogram(
                meter,
                "resumable_stream.resume.duration",
                "s",
                "From a resume call to its answer (a reader with its first text, or the "
                "stream's state)",
                _SECONDS,
            ),
            _histogram(
                meter,
                "resumable_stream.replay.size",
                "{character}",
                "Characters of existing text a resume's answer carried",
                _CHARACTERS,
            ),
            meter.create_counter(
                "resumable_stream.backend.commands",
                unit="{command}",
                description="Commands sent to the backend, by command",
            ),
            meter.create_counter(
                "resumable_stream.backend.reconnects",
                unit="{reconnect}",
                description="Times the backend connection came back after an outage",
            ),
            _histogram(
                meter,
                "resumable_stream.follower.backlog",
                "{character}",
                "Unread characters a follower held when it ended, by outcome",
                _CHARACTERS,
            ),
        )
        # Sums to add, by (instrument, attributes); histogram values to record, in order.
        self._pending: dict[tuple[int, Attributes], int] = {}
        self._records: list[tuple[int, float, Attributes]] = []

    def _add(self, instrument: int, value: int, attributes: Attributes = ()) -> None:
        key = (instrument, attributes)
        pending = self._pending
        pending[key] = pending.get(key, 0) + value

    def _record(self, instrument: int, value: float, attributes: Attributes) -> None:
        records = self._records
        records.append((instrument, value, attributes))
        if len(records) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        instruments = self._instruments
        pending, self._pending = self._pending, {}
        records, self._records = self._records, []
        for (instrument, attributes), value in pending.items():
            if value or instrument == _ACTIVE:
                instruments[instrument].add(value, dict(attributes))
        for instrument, number, attributes in records:
            instruments[instrument].record(number, dict(attributes))

    async def run(self) -> None:
        try:
            while True:
                await anyio.sleep(FLUSH_INTERVAL)
                self.flush()
        finally:
            self.flush()

    def _tracing(self) -> bool:
        """Spans are recorded: a tracer provider was given, or a real one is the global one
        (set before or after this context was made). Else every span would be a no-op, and
        making them is skipped (their cost adds up on a resume's path)."""
        if self._tracer_provider is not None:
            return True
        return not isinstance(trace.get_tracer_provider(), _NO_TRACING)  # it may be set later

    def _id(self, stream_id: str) -> dict[str, Any]:
        return {STREAM_ID: stream_id} if self._stream_ids else {}

    # Producers

    def producer_started(self, stream_id: str) -> object:
        self._add(_ACTIVE, 1, _PRODUCER)
        if not self._tracing():
            return None
        span = self._tracer.start_span("resumable_stream.produce", attributes=self._id(stream_id))
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    def producer_ended(self, token: object, outcome: str | None, length: int) -> None:
        outcome = outcome or "cancelled"
        self._add(_ACTIVE, -1, _PRODUCER)
        self._add(_ENDED, 1, (("role", "producer"), ("outcome", outcome)))
        if token is None:
            return
        assert isinstance(token, tuple)
        span: trace.Span = token[0]
        context_token: Token[Context] = token[1]
        span.set_attribute("resumable_stream.length", length)
        span.set_attribute("resumable_stream.outcome", outcome)
        if outcome == "failed":
            span.set_status(Status(StatusCode.ERROR, "the stream failed"))
        span.end()
        otel_context.detach(context_token)

    def serving(self, stream_id: str, traceparent: str | None, serve: Serve) -> Serve:
        if not self._tracing():
            return serve

        async def traced(request: object) -> None:
            # The span is made once the answer is out, with the times it had: its cost is then
            # not in the follower's wait (nothing inside makes spans, so none is current).
            started = time.time_ns()
            try:
                await serve(request)
            finally:
                parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
                span = self._tracer.start_span(
                    "resumable_stream.resume.serve",
                    context=parent,
                    kind=SpanKind.SERVER,
                    attributes=self._id(stream_id),
                    start_time=started,
                )
                span.end()

        return traced

    # Followers and resumes

    def follower_started(self) -> None:
        self._add(_ACTIVE, 1, _FOLLOWER)

    def follower_ended(self, outcome: str, backlog: int) -> None:
        self._add(_ACTIVE, -1, _FOLLOWER)
        self._add(_ENDED, 1, (("role", "follower"), ("outcome", outcome)))
        self._record(_BACKLOG, backlog, (("outcome", outcome),))

    def resume(self, stream_id: str, resume_at: int, started: int | None = None) -> Resume:
        return _OtelResume(self, stream_id, resume_at, started or time.time_ns())

    def traceparent(self) -> str | None:
        # What TraceContextTextMapPropagator.inject writes, without its detours.
        span = trace.get_current_span().get_span_context()
        if not span.is_valid:
            return None
        return f"00-{span.trace_id:032x}-{span.span_id:016x}-{span.trace_flags:02x}"

    # The backend

    def command(self, name: str) -> None:
        key = (_COMMANDS, (("command", name),))
        pending = self._pending
        pending[key] = pending.get(key, 0) + 1

    def reconnect(self) -> None:
        self._add(_RECONNECTS, 1)


class _OtelResume(Resume):
    __slots__ = ("_replayed", "_result", "_span", "_start", "_telemetry", "_token")

    def __init__(
        self, telemetry: OtelTelemetry, stream_id: str, resume_at: int, started: int
    ) -> None:
        self._telemetry = telemetry
        self._span: trace.Span | None = None
        if telemetry._tracing():
            attributes = telemetry._id(stream_id)
            attributes["resumable_stream.resume_at"] = resume_at
            self._span = telemetry._tracer.start_span(
                "resumable_stream.resume", attributes=attributes, start_time=started
            )
        self._result: str | None = None
        self._replayed = 0
        self._start = started
        self._token: Token[Context] | None = None

    def __enter__(self) -> Resume:
        if self._span is not None:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def answered(self, result: str, replayed: int = 0) -> None:
        self._result, self._replayed = result, replayed

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        telemetry, span = self._telemetry, self._span
        result = self._result if exc is None else resume_result_of(exc)
        if result is not None:
            attributes = (("result", result),)
            telemetry._add(_RESUMES, 1, attributes)
            telemetry._record(_DURATION, (time.time_ns() - self._start) / 1e9, attributes)
            if result in ("replayed", "live"):
                telemetry._record(_REPLAY, self._replayed, attributes)
        if span is None:
            return
        if exc is not None:
            span.set_attribute("error.type", type(exc).__name__)
            if result != "finished":
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        if result is not None:
            span.set_attribute("resumable_stream.result", result)
            if result in ("replayed", "live"):
                span.set_attribute("resumable_stream.replay.size", self._replayed)
        span.end()
        if self._token is not None:
            otel_context.detach(self._token)
