"""Background jobs on Celery whose answers browsers follow, resume and stop, through any web worker.

One module, both sides, on one Redis (`REDIS_URL`: the streams and Celery's broker):

    uvicorn examples.celery_app:app                      # the web side (as many as you like)
    celery -A examples.celery_app:celery worker          # the workers (prefork, the default)
    celery -A examples.celery_app:celery worker --pool threads

(`-A examples.celery_app` alone would pick the FastAPI `app`, not the Celery one.)

- `POST /jobs` with `{"prompt": "..."}` enqueues a job: 202 `{"job_id": "..."}`.
- `GET /jobs/{job_id}/stream` follows its answer as SSE: it waits for a job still queued,
  resumes with `Last-Event-ID` on any web worker, answers 204 once the answer ended (404 for an
  unknown job). `new EventSource("/jobs/<id>/stream")` is all a browser needs.
- `POST /jobs/{job_id}/stop` stops the job, from any web worker: 204.

The job writes its answer through the sync context's writer, from whatever process and thread
Celery runs it in: the context opens itself in each of them on first use (in a forked prefork
child too). The answer is durable, so readers get every word written even if the worker dies;
then `producer_lost`. A job retried by Celery (`autoretry_for`, or redelivered after its worker
died: `acks_late`) starts the stream again (`restart=True`): readers holding a cursor into the
failed attempt get `event: restart`, new readers the new attempt from its start.

Environment, for tuning (and the tests): `JOBS_TOKEN_DELAY` (seconds between the simulated
model's words), `JOBS_LIVENESS_TIMEOUT` (how soon readers learn of a dead worker),
`JOBS_REDELIVER_AFTER` (seconds before a job whose worker died is run again; longer than your
longest job, as a job still running would be run twice).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio.to_thread
from celery import Celery
from celery.signals import worker_process_shutdown, worker_shutdown
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

import resumable_stream as rs
from resumable_stream.starlette import EventStreamResponse

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
TOKEN_DELAY = float(os.environ.get("JOBS_TOKEN_DELAY", "0.05"))
REDELIVER_AFTER = int(os.environ.get("JOBS_REDELIVER_AFTER", "3600"))
STREAM_OPTIONS: dict[str, Any] = {
    "key_prefix": "jobs",
    "durable": True,  # readers never depend on the worker's process to get what it wrote
    "liveness_timeout": float(os.environ.get("JOBS_LIVENESS_TIMEOUT", "3")),
    # A dead worker's stream keeps its id (and its attempt) until its job is redelivered, so
    # that the redelivered job's stream is the next attempt, not a new stream.
    "lost_ttl": REDELIVER_AFTER + 60,
}
WAIT = 30.0  # how long a reader waits for a queued job to start

# The worker side.

celery = Celery("jobs", broker=REDIS_URL)
celery.conf.update(
    task_ignore_result=True,
    task_acks_late=True,  # a job whose worker dies is not lost: it runs again...
    task_reject_on_worker_lost=True,  # ...at once if only the pool's child died,
    worker_prefetch_multiplier=1,
    # ...else once Redis has held it unacknowledged for this long (checked every second).
    broker_transport_options={
        "visibility_timeout": REDELIVER_AFTER,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
)

# Made at import, opened on first use in each process that uses it (a prefork child included).
streams = rs.create_sync_context(REDIS_URL, **STREAM_OPTIONS)


@worker_process_shutdown.connect
@worker_shutdown.connect
def close_streams(**kwargs: object) -> None:
    streams.close()  # waits for the streams still being written (drain_timeout)


class ModelUnavailable(Exception):
    """The model's service failed for now: the job is tried again."""


def simulated_model(prompt: str, first_try: bool) -> Iterator[str]:
    """A stand-in for a model's streamed answer: one word every `TOKEN_DELAY` seconds. A prompt
    with "[flaky]" in it fails on its first try, after a few words."""
    words = [f"You asked: {prompt}.", *(f"word{i}" for i in range(60)), "The end."]
    for i, word in enumerate(words):
        time.sleep(TOKEN_DELAY)
        if first_try and "[flaky]" in prompt and i == 20:
            raise ModelUnavailable("the model's service is overloaded")
        yield word + " "


@celery.task(
    bind=True, autoretry_for=(ModelUnavailable,), max_retries=3, retry_kwargs={"countdown": 0.5}
)
def answer(self: object, job_id: str, prompt: str) -> str:
    request = self.request  # type: ignore[attr-defined]
    retried = request.retries > 0 or bool((request.delivery_info or {}).get("redelivered"))
    try:
        writer = streams.writer(job_id, restart=retried)
        with writer:
            for word in simulated_model(prompt, first_try=not retried):
                writer.write(word)
    except rs.StreamExistsError:
        return "not run: its answer exists, or it was stopped before it started"
    return "stopped" if writer.cancelled else "done"


# The web side.


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, object]]:
    async with rs.create_resumable_stream_context(REDIS_URL, **STREAM_OPTIONS) as context:
        yield {"streams": context}


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
    enqueue = functools.partial(answer.apply_async, (job_id, job.prompt), task_id=job_id)
    await anyio.to_thread.run_sync(enqueue)  # Celery's client blocks
    return {"job_id": job_id}


@app.get("/jobs/{job_id}/stream")
async def follow_job(job_id: str, request: Request) -> Response:
    context = request.state.streams
    if await context.resolve_alias(job_name(job_id)) is None:
        return Response("no such job", status_code=404)
    # Follow only (no generator: the job writes it), waiting for a job still queued.
    return EventStreamResponse(context, job_id, wait=WAIT, retry=500)


@app.post("/jobs/{job_id}/stop", status_code=204)
async def stop_job(job_id: str, request: Request) -> Response:
    # From any web worker: the writer's next word raises, and its block ends the stream
    # cancelled. A job still queued finds its stream stopped when it starts, and does nothing.
    await request.state.streams.cancel_stream(job_id)
    return Response(status_code=204)
