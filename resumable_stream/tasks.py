"""Long-running tasks over SSE that outlive platform timeouts and dropped connections.

`TaskApp(context, fn)` is an ASGI endpoint: `POST` with a JSON body (or `GET ?input=<JSON>` for
`EventSource`) runs `await fn(input, request)` as a resumable stream. While it runs the client
gets `event: wait` every `wait_interval` seconds; at the end exactly one of

    event: settle          data: the JSON result
    event: server-error    data: {"message": ..., "code": ...}   (the task raised TaskError)
    event: internal-error  data: {"message": "internal error", "code": "INTERNAL_ERROR"}

Anything else a task raises stays in the server log. The response carries `X-Task-Id`; a request
with that id (header `X-Task-Id` or query `taskId`) joins the running task instead of starting a
second one, and one that also carries `Last-Event-ID` (or `resumeAt`) resumes after a dropped
connection, on any worker, and still gets the outcome. Event ids are `<task id>:<offset>`, so an
`EventSource` on `GET ?input=` (which cannot read headers) rejoins its own task when it
reconnects, and its first frame gives it such an id before the task has said anything.
`StopStreamApp` stops a task by its id.

`TaskEndpoint(context, fn)` makes the same decisions for any framework, from the request's
method, headers, query and body (`resumable_stream.django`, `.quart` and `.falcon` use it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _protocol as p
from ._context import ResumableStreamContext
from ._event import Event
from ._http import (
    Query,
    Receive,
    RequestHeaders,
    Scope,
    Send,
    allowed,
    check_callables,
    check_options,
    context_of,
    find_cursor,
    header_value,
    query_pairs,
    send_whole,
)
from .asgi import EventStreamResponse
from .http import Authorize, Disconnected, EventStream, PreparedResponse
from .http import plain as answer

__all__ = ["TaskApp", "TaskEndpoint", "TaskError", "TaskRequest"]

logger = logging.getLogger("resumable_stream")

_WAIT_FRAME = b"event: wait\ndata: \n\n"


class TaskError(Exception):
    """Raise it from a task to send the client `server-error` with this message and code."""

    def __init__(self, message: str, code: str = "TASK_ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class TaskRequest:
    """What a task function learns of the request that started it: the ASGI `scope`, and the
    framework's own `request` object where an adapter (Django, Quart, Falcon) started it."""

    task_id: str
    scope: Scope = field(repr=False)
    request: Any = field(default=None, repr=False, compare=False)

    @property
    def path_params(self) -> Mapping[str, Any]:
        """Path parameters, when a router (Starlette, FastAPI) put them in the scope."""
        params: Mapping[str, Any] = self.scope.get("path_params", {})
        return params

    @property
    def headers(self) -> Iterable[tuple[bytes, bytes]]:
        headers: Iterable[tuple[bytes, bytes]] = self.scope.get("headers", ())
        return headers


TaskFunction = Callable[[Any, TaskRequest], Awaitable[Any]]

ReadBody = Callable[[int], Awaitable[bytes]]
"""`read_body(limit)`: the request body, or at least its first `limit` bytes when it is longer
(more is fine); `ValueError` if the client went away before sending it."""


class _Tasks:
    """The decisions of a task endpoint, whatever serves it; options checked when built."""

    def __init__(
        self,
        fn: TaskFunction,
        *,
        wait_interval: float = 0.3,
        retry: int | None = 1000,
        max_input_size: int = 1 << 20,
        authorize: Authorize | None = None,
    ) -> None:
        if not wait_interval > 0:
            raise ValueError(f"wait_interval must be > 0 seconds, got {wait_interval!r}")
        check_options(wait_interval, retry)
        if isinstance(max_input_size, bool) or not isinstance(max_input_size, int):
            raise TypeError(f"max_input_size must be an int, not {type(max_input_size).__name__}")
        if max_input_size < 0:
            raise ValueError(f"max_input_size must be >= 0 bytes, got {max_input_size!r}")
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        check_callables(authorize=authorize)
        self.fn = fn
        self.wait_interval = wait_interval
        self.retry = retry
        self.max_input_size = max_input_size
        self.authorize = authorize

    def _options(self, task_id: str) -> dict[str, Any]:
        """The options of the task's `EventStream`."""
        return {
            "keepalive": self.wait_interval,
            "keepalive_frame": _WAIT_FRAME,
            "retry": self.retry,
            "headers": [("x-task-id", task_id)],
            "id_prefix": f"{task_id}:",
        }

    async def _decide(
        self,
        method: str,
        headers: RequestHeaders,
        query: Query,
        body: bytes | ReadBody,
        request: Any,
        scope: Scope | None,
    ) -> PreparedResponse | tuple[str, Callable[[], AsyncIterator[Event]]]:
        """The answer, or the task's id and its stream's generator."""
        if method not in ("GET", "POST"):
            return answer(405, "use POST (or GET)", [("allow", "GET, POST")])
        pairs = query_pairs(query)
        try:
            task_id = _task_id(headers, pairs)
            if method == "POST":
                raw = body if isinstance(body, bytes) else await body(self.max_input_size + 1)
                if len(raw) > self.max_input_size:
                    return answer(413, f"the input is larger than {self.max_input_size} bytes")
            else:
                raw = next((v.encode() for k, v in pairs if k == "input"), b"null")
            task_input = json.loads(raw) if raw.strip() else None
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            return answer(400, f"bad task request: {exc}")
        except RecursionError:
            # json.loads recurses once per nesting level, so valid but deep JSON exhausts it.
            return answer(400, "bad task request: the input is nested too deeply")
        if not await allowed(self.authorize, request, task_id):
            return answer(403, "not allowed")
        task = TaskRequest(task_id, {} if scope is None else scope, request)
        return task_id, lambda: self._run(task_input, task)

    async def _run(self, task_input: Any, request: TaskRequest) -> AsyncIterator[Event]:
        try:
            result = json.dumps(await self.fn(task_input, request))
        except TaskError as exc:
            failure = {"message": exc.message, "code": exc.code}
            yield Event(json.dumps(failure), "server-error")
            return
        except Exception:
            # Details stay here: the client learns only that something went wrong.
            # The task's id is its stream's.
            logger.exception(
                "task %r failed", request.task_id, extra={"stream_id": request.task_id}
            )
            failure = {"message": "internal error", "code": "INTERNAL_ERROR"}
            yield Event(json.dumps(failure), "internal-error")
            return
        yield Event(result, "settle")


def _task_id(headers: RequestHeaders, pairs: list[tuple[str, str]]) -> str:
    value = header_value(headers, "x-task-id")
    if value is not None:
        return p.validate_stream_id(value)
    for name, text in pairs:
        if name == "taskId":
            return p.validate_stream_id(text)
    cursor = find_cursor(headers, pairs)
    if cursor is not None:
        # An event id of ours names its task: `<task id>:<offset>`.
        task_id, colon, _ = cursor[1].rpartition(":")
        if not colon:
            raise ValueError("resuming needs the task id (X-Task-Id or ?taskId=)")
        return p.validate_stream_id(task_id)
    return p.new_stream_id()


def _native(context: ResumableStreamContext) -> ResumableStreamContext:
    """`context`, which must speak this library's own protocol: a task's outcome is a named
    event, and the names do not cross the reference's protocol (`compat`)."""
    if context.compat is not None:
        raise ValueError(
            f"task endpoints need a context of this library's own protocol, not "
            f"compat={context.compat!r}"
        )
    return context


class TaskEndpoint(_Tasks):
    """A task endpoint for any framework (see module docs): `await endpoint.prepare(...)` with
    the request's method, headers, query and body decides the answer, as `TaskApp` does.

    `authorize(request, task_id)` gets what `prepare` was given as `request`. Options are
    checked here.
    """

    def __init__(
        self,
        context: ResumableStreamContext,
        fn: TaskFunction,
        *,
        wait_interval: float = 0.3,
        retry: int | None = 1000,
        max_input_size: int = 1 << 20,
        authorize: Authorize | None = None,
    ) -> None:
        super().__init__(
            fn,
            wait_interval=wait_interval,
            retry=retry,
            max_input_size=max_input_size,
            authorize=authorize,
        )
        self.context = _native(context)

    async def prepare(
        self,
        *,
        method: str,
        headers: RequestHeaders = (),
        query: Query = "",
        body: bytes | ReadBody = b"",
        request: Any = None,
        scope: Scope | None = None,
        disconnected: Disconnected | None = None,
    ) -> PreparedResponse:
        """The answer to one request: `body` is the request body, or `read_body(limit)`, read
        only for a POST once the task id is known. The task function's `TaskRequest` gets
        `scope` (the ASGI scope, where the framework has it) and `request`."""
        decided = await self._decide(method, headers, query, body, request, scope)
        if isinstance(decided, PreparedResponse):
            return decided
        task_id, make = decided
        stream = EventStream(self.context, task_id, make, **self._options(task_id))
        return await stream.prepare(
            method=method, headers=headers, query=query, request=request, disconnected=disconnected
        )


class TaskApp:
    """An ASGI endpoint running `fn(input, request)` as a resumable task (see module docs).

    `context` is the context or a function of the ASGI scope returning it; `authorize(scope,
    task_id)` is asked before a task is started or joined (403 if it says no).
    """

    def __init__(
        self,
        context: ResumableStreamContext | Callable[[Scope], ResumableStreamContext],
        fn: TaskFunction,
        *,
        wait_interval: float = 0.3,
        retry: int | None = 1000,
        max_input_size: int = 1 << 20,
        authorize: Authorize | None = None,
    ) -> None:
        self._context = _native(context) if isinstance(context, ResumableStreamContext) else context
        self._tasks = _Tasks(
            fn,
            wait_interval=wait_interval,
            retry=retry,
            max_input_size=max_input_size,
            authorize=authorize,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"TaskApp serves HTTP only, not {scope['type']!r}")

        async def read_body(limit: int) -> bytes:
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ValueError("the client went away before sending its input")
                body += message.get("body", b"")
                if len(body) > limit or not message.get("more_body", False):
                    return bytes(body)

        headers = scope.get("headers", ())
        query = scope.get("query_string", b"")
        decided = await self._tasks._decide(
            scope["method"], headers, query, read_body, scope, scope
        )
        if isinstance(decided, PreparedResponse):
            await send_whole(decided, send)
            return
        task_id, make = decided
        context = _native(context_of(self._context, scope))
        response = EventStreamResponse(context, task_id, make, **self._tasks._options(task_id))
        await response(scope, receive, send)
