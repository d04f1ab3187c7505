"""Which telemetry a context gets: OpenTelemetry's (`_otel`) when it is wanted and its API
imports, else the no-op. Apart from `_telemetry`, whose interface both implement, so that the
dependencies point one way: this module -> `_otel` -> `_telemetry`."""

from __future__ import annotations

from ._telemetry import NOOP, Telemetry

__all__ = ["make_telemetry"]


def make_telemetry(
    enabled: bool,
    meter_provider: object | None,
    tracer_provider: object | None,
    stream_ids: bool,
) -> Telemetry:
    """OpenTelemetry telemetry if `enabled` and the API imports, else the no-op.

    Nothing of OpenTelemetry is imported when `enabled` is false; without the API installed,
    an attempt to import it is all it costs (once per context).
    """
    if not enabled:
        return NOOP
    try:
        import opentelemetry.metrics
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        if meter_provider is not None or tracer_provider is not None:
            raise ValueError(
                "meter_provider and tracer_provider need the OpenTelemetry API: "
                'pip install "resumable-streams[otel]"'
            ) from None
        return NOOP
    from ._otel import OtelTelemetry

    return OtelTelemetry(meter_provider, tracer_provider, stream_ids)
