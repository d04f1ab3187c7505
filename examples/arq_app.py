"""Background jobs on arq whose answers browsers follow, resume and stop, through any web worker.

One module, both sides, on one Redis (`REDIS_URL`: the streams and arq's queue):

    uvicorn examples.arq_app:app                # the web side (as many as you like)
    arq examples.arq_app.WorkerSettings         # the workers

- `POST /jobs` with `{"prompt": "..."}` enqueues a job: 202 `{"job_id": "..."}`.
- `GET /jobs/{job_id}/stream` follows its answer as SSE: it waits for a job still queued,
  resumes with `Last-Event-ID` on any web worker, answers 204 once the answer ended (404 for an
  unknown job).
- `POST /jobs/{job_id}/stop` stops the job, from any web worker: 204.

arq runs jobs as coroutines, so the job writes through the async context's writer; the worker
opens one context for all its jobs. The answer is durable: readers get every word written even
if the worker dies, then `producer_lost`. A job that raises `Retry` (here, when the simulated
model is unavailable), or that arq runs again after its worker died, starts the stream again
(`restart=True`, on every try after the first): readers holding a cursor into the failed
attempt get `event: restart`, new readers the new attempt from its start.

Environment, for tuning (and the tests): `JOBS_TOKEN_DELAY` (seconds between the simulated
model's words), `JOBS_LIVENESS_TIMEOUT` (how soon readers learn of a dead worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import anyio
from arq import Retry, create_pool
from arq.connections import RedisSettings
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

import resumable_stream as rs
from resumable_stream.starlette import EventStreamResponse

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
TOKEN_DELAY = float(os.environ.get("JOBS_TOKEN_DELAY", "0.05"))
JOB_TIMEOUT = 300  # seconds (arq's default); arq runs a job again this long + 10 s after its
# worker died
STREAM_OPTIONS: dict[str, Any] = {
    "key_prefix": "jobs",
    "durable": True,  # readers never depend on the worker's process to get what it wrote
    "liveness_timeout": float(os.environ.get("JOBS_LIVENESS_TIMEOUT", "3")),
    # A dead worker's stream keeps its id (and its attempt) until arq runs its job again, so
    # that the new run's stream is the next attempt, not a new stream.
    "lost_ttl": JOB_TIMEOUT + 10 + 60,
}
WAIT = 30.0  # how long a reader waits for a queued job to start

# The worker side.


class ModelUnavailable(Exception):
    """The model's service failed for now: the job is tried again."""


async def simulated_model(prompt: str, first_try: bool) -> AsyncIterator[str]:
    """A stand-in for a model's streamed answer: one word every `TOKEN_DELAY` seconds. A prompt
    with "[flaky]" in it fails on its first try, after a few words."""
    words = [f"You asked: {prompt}.", *(f"word{i}" for i in range(60)), "The end."]
    for i, word in enumerate(words):
        await anyio.sleep(TOKEN_DELAY)
        if first_try and "[flaky]" in prompt and i == 20:
            raise ModelUnavailable("the model's service is overloaded")
        yield word + " "


async def answer(ctx: dict[str, Any], job_id: str, prompt: str) -> str:
    streams: rs.ResumableStreamContext = ctx["streams"]
    retried = ctx["job_try"] > 1
    try:
        writer = streams.writer(job_id, restart=retried)
        async with writer:
            try:
                async for word in simulated_model(prompt, first_try=not retried):
                    await writer.write(word)
            except ModelUnavailable as exc:
                raise Retry(defer=0.5) from exc  # ends this attempt failed; arq tries again
    except rs.StreamExistsError:
        return "not run: its answer exists, or it was stopped before it started"
    return "stopped" if writer.cancelled else "done"


async def startup(ctx: dict[str, Any]) -> None:
    # The context is entered and left by one task (its task group needs that), which arq's
    # startup and shutdown hooks are not: a task of its own holds it open.
    opened: asyncio.Future[rs.ResumableStreamContext] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def hold() -> None:
        try:
            async with rs.create_resumable_stream_context(REDIS_URL, **STREAM_OPTIONS) as streams:
                opened.set_result(streams)
                await stop.wait()
        except BaseException as exc:
            if not opened.done():
                opened.set_exception(exc)
            raise

    ctx["streams_task"] = asyncio.create_task(hold())
    ctx["streams_stop"] = stop
    ctx["streams"] = await opened


async def shutdown(ctx: dict[str, Any]) -> None:
    ctx["streams_stop"].set()  # waits for the streams still being written (drain_timeout)
    await ctx["streams_task"]


class WorkerSettings:
    functions: ClassVar = [answer]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    job_timeout = JOB_TIMEOUT
    max_tries = 4


# The web side.


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, object]]:
    queue = await create_pool(RedisSettings.from_dsn(REDIS_URL))
    try:
        async with rs.create_resumable_stream_context(REDIS_URL, **STREAM_OPTIONS) as streams:
            yield {"streams": streams, "queue": queue}
    finally:
        await queue.aclose()


app = FastAPI(lifespan=lifespan)


class NewJob(BaseModel):
    prompt: str


def job_name(job_id: str) -> str:
    """The alias that records a job's existence (its stream has the job's id)."""
    return f"job.{job_id}"


@app.post("/jobs", status_code=202)
async def create_job(job: NewJob, request: Request) -> dict[str, str]:
    job_id = rs.new_stream_id()
    await request.state.streams.set_alias(job_name(job_id), job_id)
    await request.state.queue.enqueue_job("answer", job_id, job.prompt, _job_id=job_id)
    return {"job_id": job_id}


@app.get("/jobs/{job_id}/stream")
async def follow_job(job_id: str, request: Request) -> Response:
    streams = request.state.streams
    if await streams.resolve_alias(job_name(job_id)) is None:
        return Response("no such job", status_code=404)
    # Follow only (no generator: the job writes it), waiting for a job still queued.
    return EventStreamResponse(streams, job_id, wait=WAIT, retry=500)


@app.post("/jobs/{job_id}/stop", status_code=204)
async def stop_job(job_id: str, request: Request) -> Response:
    # From any web worker: the writer's next word raises, and its block ends the stream
    # cancelled. A job still queued finds its stream stopped when it starts, and does nothing.
    await request.state.streams.cancel_stream(job_id)
    return Response(status_code=204)
