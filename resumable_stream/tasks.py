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
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from . import _protocol as p
from ._context import ResumableStreamContext
from ._event import Event
from ._http import Authorize, Receive, Scope, Send, allowed, context_of, cursor_value, plain
from .asgi import EventStreamResponse

__all__ = ["TaskApp", "TaskError", "TaskRequest"]

logger = logging.getLogger("resumable_stream")


class TaskError(Exception):
    """Raise it from a task to send the client `server-error` with this message and code."""

    def __init__(self, message: str, code: str = "TASK_ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class TaskRequest:
    """What a task function learns of the request that started it."""

    task_id: str
    scope: Scope = field(repr=False)

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


class TaskApp:
    """An ASGI endpoint running `fn(input, request)` as a resumable task (see module docs)."""

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
        if not wait_interval > 0:
            raise ValueError(f"wait_interval must be > 0 seconds, got {wait_interval!r}")
        self._context = context
        self._fn = fn
        self._wait_interval = wait_interval
        self._retry = retry
        self._max_input_size = max_input_size
        self._authorize = authorize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"TaskApp serves HTTP only, not {scope['type']!r}")
        method = scope["method"]
        if method not in ("GET", "POST"):
            await plain(send, 405, "use POST (or GET)", [(b"allow", b"GET, POST")])
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), True)
        try:
            task_id = self._task_id(scope, query)
            if method == "POST":
                raw = await self._body(receive)
            else:
                raw = next((v.encode() for k, v in query if k == "input"), b"null")
            task_input = json.loads(raw) if raw.strip() else None
        except _TooLarge:
            await plain(send, 413, f"the input is larger than {self._max_input_size} bytes")
            return
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            await plain(send, 400, f"bad task request: {exc}")
            return
        except RecursionError:
            # json.loads recurses once per nesting level, so valid but deep JSON exhausts it.
            await plain(send, 400, "bad task request: the input is nested too deeply")
            return
        if not await allowed(self._authorize, scope, task_id):
            await plain(send, 403, "not allowed")
            return
        request = TaskRequest(task_id, scope)
        response = EventStreamResponse(
            context_of(self._context, scope),
            task_id,
            lambda: self._run(task_input, request),
            keepalive=self._wait_interval,
            keepalive_frame=b"event: wait\ndata: \n\n",
            retry=self._retry,
            headers=[("x-task-id", task_id)],
            id_prefix=f"{task_id}:",
        )
        await response(scope, receive, send)

    def _task_id(self, scope: Scope, query: list[tuple[str, str]]) -> str:
        for name, value in scope.get("headers", ()):
            if name == b"x-task-id":
                return p.validate_stream_id(value.decode("latin-1"))
        for name, text in query:
            if name == "taskId":
                return p.validate_stream_id(text)
        cursor = cursor_value(scope)
        if cursor is not None:
            # An event id of ours names its task: `<task id>:<offset>`.
            task_id, colon, _ = cursor[1].rpartition(":")
            if not colon:
                raise ValueError("resuming needs the task id (X-Task-Id or ?taskId=)")
            return p.validate_stream_id(task_id)
        return p.new_stream_id()

    async def _body(self, receive: Receive) -> bytes:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ValueError("the client went away before sending its input")
            body += message.get("body", b"")
            if len(body) > self._max_input_size:
                raise _TooLarge
            if not message.get("more_body", False):
                return bytes(body)

    async def _run(self, task_input: Any, request: TaskRequest) -> AsyncIterator[Event]:
        try:
            result = json.dumps(await self._fn(task_input, request))
        except TaskError as exc:
            failure = {"message": exc.message, "code": exc.code}
            yield Event(json.dumps(failure), "server-error")
            return
        except Exception:
            # Details stay here: the client learns only that something went wrong.
            logger.exception("task %r failed", request.task_id)
            failure = {"message": "internal error", "code": "INTERNAL_ERROR"}
            yield Event(json.dumps(failure), "internal-error")
            return
        yield Event(result, "settle")


class _TooLarge(Exception):
    pass
