"""A client for event streams that resume by themselves, over httpx: `follow` and `run_task`.

`follow(url)` is `EventSource` for Python: it yields the events of a stream and, when the
connection drops or the body ends, reconnects with `Last-Event-ID` after the server's `retry:`
delay, until the server answers 204 ("stop reconnecting"). `run_task(url, input)` runs a
`resumable_stream.tasks.TaskApp` task to its outcome through any number of dropped connections.

Needs httpx (`pip install httpx`).
"""

from __future__ import annotations

import json as _json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
import httpx

from ._exceptions import ResumableStreamError
from ._upstream import detail, is_event_stream, media_type
from .sse import ServerSentEvent, SSEDecoder

__all__ = [
    "DEFAULT_BACKOFF",
    "RemoteStreamError",
    "ResumableClientError",
    "RetriesExhaustedError",
    "TaskClientError",
    "UnexpectedResponseError",
    "follow",
    "run_task",
]

logger = logging.getLogger("resumable_stream")

DEFAULT_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# Longer than a few keep-alive intervals (15 s by default), so only a dead connection times out.
DEFAULT_TIMEOUT = httpx.Timeout(10.0, read=60.0)
# What a dropped connection looks like; anything else (a bad URL, say) would fail again.
_DROPS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_RETRY_STATUSES = frozenset({502, 503, 504})  # a proxy or a busy producer: worth another try
_sleep = anyio.sleep  # the tests replace it to record the delays the client chooses


class ResumableClientError(ResumableStreamError):
    """Base class of the errors `follow` and `run_task` raise."""


class UnexpectedResponseError(ResumableClientError):
    """The server answered with something other than an event stream (a 4xx, say)."""

    def __init__(self, message: str, status_code: int, detail: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class RemoteStreamError(ResumableClientError):
    """The server ended the stream with an `event: error` frame; `code` and `message` are its."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(f"{message} ({code})")
        self.message = message
        self.code = code


class RetriesExhaustedError(ResumableClientError, ConnectionError):
    """`max_retries` reconnections in a row brought nothing; the last failure is chained."""


class TaskClientError(ResumableClientError):
    """A task ended without a result: `code` is the server's (`TaskError.code`), or
    `INTERNAL_ERROR`, an `error` frame's code (`cancelled`...), `NO_DATA` (the stream ended
    with no outcome) or `RECONNECT` (the connection dropped before the task had an id)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(f"{message} ({code})")
        self.message = message
        self.code = code


async def follow(
    url: str,
    *,
    client: httpx.AsyncClient | None = None,
    method: str = "GET",
    json: Any = None,
    headers: Mapping[str, str] | None = None,
    last_event_id: str | None = None,
    max_retries: int | None = None,
    backoff: Sequence[float] = DEFAULT_BACKOFF,
) -> AsyncGenerator[ServerSentEvent, None]:
    """Yield every event of the stream at `url` once, reconnecting until the server says stop.

    As `EventSource` does, a dropped connection (network error, read timeout, cut body) and a
    body that ends are followed by a reconnection with `Last-Event-ID` = the last id seen (or
    `last_event_id` until one is), after the server's `retry:` delay (else `backoff[0]`; after
    attempts bringing no event, the next `backoff` step). A 204 ends the iteration. Every event
    is yielded, `wait` too, except one whose id was already yielded (digit ids count as
    positions, like this library's offsets) and a final `event: error`: that raises
    `RemoteStreamError`. 502, 503 and 504 are retried; any other answer that is not a 200 event
    stream raises `UnexpectedResponseError`; `max_retries` fruitless attempts in a row (None:
    no limit) raise `RetriesExhaustedError`.

    It is an async generator holding a connection: leave it with `aclose()`, or iterate it
    inside `contextlib.aclosing(follow(...))`. Without `client`, it makes its own.
    """
    async with _http(client) as http:
        session = _Session(http, url, method, json, headers, last_event_id, max_retries, backoff)
        async with aclosing(session.events()) as events:
            async for event in events:
                yield event


async def run_task(
    url: str,
    input: Any = None,
    *,
    client: httpx.AsyncClient | None = None,
    task_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    max_retries: int | None = None,
    backoff: Sequence[float] = DEFAULT_BACKOFF,
) -> Any:
    """POST `input` as JSON to a `TaskApp` at `url` and return the task's result (its `settle`).

    A dropped connection is resumed with the `X-Task-Id` the server gave and `Last-Event-ID`,
    so the task runs once whatever happens to the connection. Pass `task_id` to choose the id
    (the request then joins a task already running under it). Raises `TaskClientError`.
    """
    async with _http(client) as http:
        session = _TaskSession(
            http, url, "POST", input, headers, None, max_retries, backoff, task_id=task_id
        )
        async with aclosing(session.events()) as events:
            try:
                async for event in events:
                    if event.event == "settle":
                        try:
                            return _json.loads(event.data)
                        except (ValueError, RecursionError):
                            raise TaskClientError(
                                "the task's result is not JSON", "MALFORMED_RESULT"
                            ) from None
                    if event.event == "server-error":
                        raise TaskClientError(*_error_info(event.data, "SERVER_ERROR"))
                    if event.event == "internal-error":
                        message, _ = _error_info(event.data, "INTERNAL_ERROR")
                        raise TaskClientError(message, "INTERNAL_ERROR")
            except RemoteStreamError as exc:
                raise TaskClientError(exc.message, exc.code) from exc
    raise TaskClientError("the task's stream ended without an outcome", "NO_DATA")


@asynccontextmanager
async def _http(client: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    if client is not None:
        yield client
        return
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, follow_redirects=True) as http:
        yield http


class _Session:
    """The state one `follow` keeps across its connections."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        method: str,
        body: Any,
        headers: Mapping[str, str] | None,
        cursor: str | None,
        max_retries: int | None,
        backoff: Sequence[float],
    ) -> None:
        if not backoff or any(not delay >= 0 for delay in backoff):
            raise ValueError(f"backoff must be non-negative delays (seconds), got {backoff!r}")
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"max_retries must be >= 0 or None, got {max_retries!r}")
        self.http, self.url, self.method, self.body = http, url, method, body
        self.headers = dict(headers or {})
        self.cursor = cursor or None  # sent as Last-Event-ID: the seed until an id arrives
        self.max_retries = max_retries
        self.backoff = tuple(backoff)
        self.retry: float | None = None  # seconds, from the server's `retry:` field
        self._max_id = -1  # ids made of digits are positions: all up to this one were yielded
        self._other_ids: set[str] = set()
        if self.cursor:
            self._is_new(self.cursor)  # the caller has everything up to its cursor
        self.finished = False
        self.error: ServerSentEvent | None = None

    def _is_new(self, id: str) -> bool:
        """Record `id`; False if it was yielded before (a server replayed too much)."""
        if id.isascii() and id.isdigit():
            new = int(id) > self._max_id
            self._max_id = max(self._max_id, int(id))
            return new
        if id in self._other_ids:
            return False
        self._other_ids.add(id)
        return True

    def request_headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store", **self.headers}
        if self.cursor:
            headers["Last-Event-ID"] = self.cursor
        return headers

    def accept(self, response: httpx.Response) -> None:
        """Called with each response that opens an event stream."""

    def before_reconnect(self, drop: Exception | None) -> None:
        """Called before each reconnection; may raise to stop."""

    async def events(self) -> AsyncGenerator[ServerSentEvent, None]:
        failures = 0  # attempts in a row that brought no event
        attempt = 0
        while True:
            if attempt:
                await _sleep(self._delay(failures))
            attempt += 1
            progressed = False
            drop: Exception | None = None
            try:
                async with aclosing(self._connect()) as connection:
                    async for event in connection:
                        progressed = True
                        yield event
            except _DROPS as exc:
                drop = exc
            except UnexpectedResponseError as exc:
                if exc.status_code not in _RETRY_STATUSES:
                    raise
                drop = exc
            if self.error is not None:
                raise RemoteStreamError(*_error_info(self.error.data, "error"))
            if self.finished:
                return
            failures = 0 if progressed else failures + 1
            if self.max_retries is not None and failures > self.max_retries:
                last = repr(drop) if drop else "the stream ended without any event"
                raise RetriesExhaustedError(
                    f"{self.url}: {failures} attempts in a row brought nothing; last: {last}"
                ) from drop
            self.before_reconnect(drop)
            logger.debug("reconnecting to %s at %r after %r", self.url, self.cursor, drop)

    def _delay(self, failures: int) -> float:
        base = self.retry if self.retry is not None else self.backoff[0]
        if failures == 0:
            return base
        return max(base, self.backoff[min(failures, len(self.backoff)) - 1])

    async def _connect(self) -> AsyncGenerator[ServerSentEvent, None]:
        request = self.http.stream(
            self.method, self.url, json=self.body, headers=self.request_headers()
        )
        async with request as response:
            if response.status_code == 204:
                self.finished = True
                return
            await _check(response)
            self.accept(response)
            # A fresh decoder per connection, so an event that carries an id of its own can be
            # told from one that inherits the last one (wait frames, error frames).
            decoder = SSEDecoder()
            last_id = ""
            held: ServerSentEvent | None = None  # an `error` event: final only if last
            try:
                async for piece in response.aiter_bytes():
                    for event in decoder.feed(piece):
                        if held is not None:
                            yield held
                            held = None
                        fresh = event.id != last_id
                        last_id = event.id
                        if fresh and event.id and not self._is_new(event.id):
                            continue  # already yielded: the server replayed too much
                        if event.event == "error":
                            held = event
                        else:
                            yield event
                    # An id-only block moves the cursor too. An empty id (a reset) is ignored:
                    # the cursor only ever moves forward.
                    if decoder.last_event_id:
                        self.cursor = decoder.last_event_id
                    if decoder.retry is not None:
                        self.retry = decoder.retry / 1000
            finally:
                self.error = held


class _TaskSession(_Session):
    """A session against a `TaskApp`: reconnections name the task and only continue it."""

    def __init__(self, *args: Any, task_id: str | None) -> None:
        super().__init__(*args)
        self.task_id = task_id

    def request_headers(self) -> dict[str, str]:
        headers = super().request_headers()
        if self.task_id:
            headers["X-Task-Id"] = self.task_id
        return headers

    def accept(self, response: httpx.Response) -> None:
        self.task_id = response.headers.get("x-task-id") or self.task_id
        # The task exists now. A request with a cursor never starts one, so that a reconnection
        # after the task's state expired cannot run it a second time.
        self.cursor = self.cursor or "0"

    def before_reconnect(self, drop: Exception | None) -> None:
        if self.task_id is None and not isinstance(drop, httpx.ConnectError):
            # The request may have reached the server and started a task we could not name;
            # sending it again could run it twice.
            raise TaskClientError(
                "the connection dropped before the server named the task, which may be running;"
                " pass task_id= to be able to rejoin it",
                "RECONNECT",
            ) from drop


async def _check(response: httpx.Response) -> None:
    if response.status_code == 200 and is_event_stream(response):
        return
    text = (await detail(response)).strip()
    where = f"{response.request.method} {response.request.url}"
    if response.status_code == 200:
        media = media_type(response)
        message = f"{where} is not an event stream (Content-Type {media or 'missing'!r})"
    else:
        message = f"{where} answered {response.status_code} {response.reason_phrase}: {text}"
    raise UnexpectedResponseError(message, response.status_code, text)


def _error_info(data: str, default_code: str) -> tuple[str, str]:
    """(message, code) of an error payload: JSON `{"message", "code"}`, else the text itself."""
    try:
        payload = _json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to decode
        payload = None
    if isinstance(payload, dict):
        message, code = payload.get("message"), payload.get("code")
        return str(message) if message else data, str(code) if code else default_code
    return data or "the stream ended with an error", default_code
