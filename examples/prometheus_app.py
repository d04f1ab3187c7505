"""Metrics for Prometheus: `uvicorn examples.prometheus_app:app`, then `/chat/<id>?prompt=hi`,
`/metrics` (Prometheus' text format) and `/healthz` (the context's `stats()`).

Needs `pip install "resumable-streams[otel,starlette]" opentelemetry-sdk
opentelemetry-exporter-prometheus`. The context reports to the meter provider it is given (here
one with OpenTelemetry's Prometheus reader); without `meter_provider=` it uses the global one,
which `opentelemetry-instrument` or your own setup code configures. Instrument names come out
in Prometheus' spelling: `resumable_stream.resumes` is `resumable_stream_resumes_total`,
`resumable_stream.resume.duration` is `resumable_stream_resume_duration_seconds`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import anyio
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from resumable_stream import create_resumable_stream_context
from resumable_stream.starlette import EventStreamResponse

# The reader registers itself with prometheus_client's default registry, served at /metrics.
meter_provider = MeterProvider(
    metric_readers=[PrometheusMetricReader()],
    resource=Resource.create({"service.name": "chat"}),
)


async def answer(prompt: str) -> AsyncIterator[str]:
    """A stand-in for an LLM: one word every 50 ms."""
    for word in f"You asked {prompt!r}. Here is a long answer, one word at a time.".split(" "):
        await anyio.sleep(0.05)
        yield word + " "


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
    # REDIS_URL, else in memory.
    async with create_resumable_stream_context(meter_provider=meter_provider) as streams:
        yield {"streams": streams}


async def chat(request: Request) -> Response:
    prompt = request.query_params.get("prompt", "")
    stream_id = request.path_params["stream_id"]
    return EventStreamResponse(request.state.streams, stream_id, lambda: answer(prompt))


async def metrics(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    stats = request.state.streams.stats()
    return JSONResponse(
        dataclasses.asdict(stats), status_code=200 if stats.backend_connected else 503
    )


app = Starlette(
    routes=[
        Route("/chat/{stream_id}", chat),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)
