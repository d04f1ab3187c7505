"""Telemetry through OpenTelemetry: imported only when `opentelemetry-api` is installed.

The instruments and spans here are the contract the README's table documents: change a name or
an attribute there and here together.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import Token
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._telemetry import Resume, Telemetry, resume_result_of

__all__ = ["OtelTelemetry"]

NAME = "resumable_stream"
STREAM_ID = "resumable_stream.stream_id"

_PRODUCER = {"role": "producer"}
_FOLLOWER = {"role": "follower"}
_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
_CHARACTERS = [0, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000]
_PROPAGATOR = TraceContextTextMapPropagator()


def _version() -> str:
    from . import __version__

    return __version__


class OtelTelemetry(Telemetry):
    __slots__ = (
        "_active",
        "_attributes",
        "_backlog",
        "_commands",
        "_duration",
        "_ended",
        "_reconnects",
        "_replay_size",
        "_resumes",
        "_stream_ids",
        "_tracer",
    )

    enabled = True

    def __init__(
        self, meter_provider: Any | None, tracer_provider: Any | None, stream_ids: bool
    ) -> None:
        version = _version()
        meter = metrics.get_meter(NAME, version, meter_provider=meter_provider)
        self._tracer = trace.get_tracer(NAME, version, tracer_provider=tracer_provider)
        self._stream_ids = stream_ids
        self._active = meter.create_up_down_counter(
            "resumable_stream.streams.active",
            unit="{stream}",
            description="Streams running in this process, by role (producer or follower)",
        )
        self._ended = meter.create_counter(
            "resumable_stream.streams.ended",
            unit="{stream}",
            description="Streams that ended, by role and outcome",
        )
        self._resumes = meter.create_counter(
            "resumable_stream.resumes",
            unit="{resume}",
            description="Resumes of existing streams, by result",
        )
        self._duration = meter.create_histogram(
            "resumable_stream.resume.duration",
            unit="s",
            description="From a resume call to its answer (a reader with its first text, or "
            "the stream's state)",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        self._replay_size = meter.create_histogram(
            "resumable_stream.replay.size",
            unit="{character}",
            description="Characters of existing text a resume's answer carried",
            explicit_bucket_boundaries_advisory=_CHARACTERS,
        )
        self._commands = meter.create_counter(
            "resumable_stream.backend.commands",
            unit="{command}",
            description="Commands sent to the backend, by command",
        )
        self._reconnects = meter.create_counter(
            "resumable_stream.backend.reconnects",
            unit="{reconnect}",
            description="Times the backend connection came back after an outage",
        )
        self._backlog = meter.create_histogram(
            "resumable_stream.follower.backlog",
            unit="{character}",
            description="Unread characters a follower held when it ended, by outcome",
            explicit_bucket_boundaries_advisory=_CHARACTERS,
        )
        self._attributes: dict[str, dict[str, str]] = {}

    def _id(self, stream_id: str) -> dict[str, Any]:
        return {STREAM_ID: stream_id} if self._stream_ids else {}

    # Producers

    def producer_started(self, stream_id: str) -> object:
        self._active.add(1, _PRODUCER)
        span = self._tracer.start_span("resumable_stream.produce", attributes=self._id(stream_id))
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    def producer_ended(self, token: object, outcome: str | None, length: int) -> None:
        outcome = outcome or "cancelled"
        self._active.add(-1, _PRODUCER)
        self._ended.add(1, {"role": "producer", "outcome": outcome})
        assert isinstance(token, tuple)
        span: trace.Span = token[0]
        context_token: Token[Context] = token[1]
        span.set_attribute("resumable_stream.length", length)
        span.set_attribute("resumable_stream.outcome", outcome)
        if outcome == "failed":
            span.set_status(Status(StatusCode.ERROR, "the stream failed"))
        span.end()
        otel_context.detach(context_token)

    async def serve(
        self,
        stream_id: str,
        traceparent: str | None,
        serve: Callable[[Any], Awaitable[None]],
        request: object,
    ) -> None:
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        with self._tracer.start_as_current_span(
            "resumable_stream.resume.serve",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=self._id(stream_id),
        ):
            await serve(request)

    # Followers and resumes

    def follower_started(self) -> None:
        self._active.add(1, _FOLLOWER)

    def follower_ended(self, outcome: str, backlog: int) -> None:
        self._active.add(-1, _FOLLOWER)
        attributes = {"role": "follower", "outcome": outcome}
        self._ended.add(1, attributes)
        self._backlog.record(backlog, {"outcome": outcome})

    def resume(self, stream_id: str, resume_at: int, started: int | None = None) -> Resume:
        return _OtelResume(self, stream_id, resume_at, started or time.time_ns())

    def traceparent(self) -> str | None:
        if not trace.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent")

    # The backend

    def command(self, name: str) -> None:
        attributes = self._attributes.get(name)
        if attributes is None:
            attributes = self._attributes[name] = {"command": name}
        self._commands.add(1, attributes)

    def reconnect(self) -> None:
        self._reconnects.add(1)


class _OtelResume(Resume):
    __slots__ = ("_replayed", "_result", "_span", "_start", "_telemetry", "_token")

    def __init__(
        self, telemetry: OtelTelemetry, stream_id: str, resume_at: int, started: int
    ) -> None:
        self._telemetry = telemetry
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
        result = self._result
        if exc is not None:
            result = resume_result_of(exc)
            span.set_attribute("error.type", type(exc).__name__)
            if result != "finished":
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        if result is not None:
            attributes = {"result": result}
            telemetry._resumes.add(1, attributes)
            telemetry._duration.record((time.time_ns() - self._start) / 1e9, attributes)
            span.set_attribute("resumable_stream.result", result)
            if result in ("replayed", "live"):
                telemetry._replay_size.record(self._replayed, attributes)
                span.set_attribute("resumable_stream.replay.size", self._replayed)
        span.end()
        if self._token is not None:
            otel_context.detach(self._token)
