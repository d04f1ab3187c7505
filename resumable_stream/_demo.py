"""`python -m resumable_stream demo`: a page where a simulated LLM streams an answer over SSE.

The app is plain ASGI on purpose: it shows that `resumable_stream.asgi.EventStreamResponse` needs
no framework, and keeps uvicorn the demo's only extra dependency. Routes:

- `GET /`: the page (`static/demo.html`);
- `GET /api/info`: which backend serves the streams, for the page to show;
- `GET /api/stats`: the context's `stats()` snapshot, as a health endpoint would serve it;
- `GET /stream/{id}?prompt=...`: the stream as SSE (produced on first request when a prompt is
  given, followed or resumed otherwise);
- `POST /cut/{id}`: ends this process's open responses for that stream, server side, so the
  browser's `EventSource` has to reconnect and resume by itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import random
import re
import socket
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio

from ._backend import MemoryBackend
from ._context import ResumableStreamContext, create_resumable_stream_context
from .asgi import EventStreamResponse, Message, Receive, Scope, Send
from .sse import encode_event

__all__ = ["DemoApp", "answer_text", "answer_tokens", "run", "simulated_llm"]

DEFAULT_DELAY = 0.04
RETRY_MS = 500  # quick reconnects, so a cut is visibly healed within a blink
KEEPALIVE = 15.0
MAX_PROMPT = 500
DEMO_KEY_PREFIX = "resumable-stream-demo"
# Leaving the context waits this long for running answers: a demo should stop promptly.
DRAIN_TIMEOUT = 1.0

Answer = Callable[[str], AsyncIterable[str]]

# The simulated model. Sentences are picked by a generator seeded with the prompt, so the same
# prompt always gives the same text and a test can compute what a browser must end up showing.
_OPENERS = (
    "You asked “{topic}”: a real model would think hard about that, while this one streams a "
    "simulated answer, one token at a time.",
    "“{topic}” is a good question. Here is a simulated answer, generated on the server and sent "
    "to you token by token.",
    "Let me answer “{topic}” the way a language model would: slowly, one token after another.",
)
_SENTENCES = (
    "Every token you see arrives as one Server-Sent Event, and its id is the character offset "
    "just past it.",
    "If the connection drops, the browser reconnects on its own and sends that offset back in "
    "the Last-Event-ID header.",
    "The server then resumes from exactly that character, so nothing is lost and nothing is "
    "repeated.",
    "Meanwhile the answer keeps being generated, whether anybody is listening or not.",
    "A second tab can follow the same stream: it catches up on the text so far, then receives "
    "the live tokens.",
    "When the answer is complete, a reconnecting browser gets a 204, which tells it to stop "
    "trying.",
    "Thinking about “{word}”, the key idea is that the answer lives on the server, not in the "
    "connection.",
    "With Redis behind it, another worker process could take over the stream just as well.",
    "Try cutting the connection now and watch the connection log.",
    "Reload the page halfway through: it continues from the offset it stored.",
    "The words come from your prompt and a seeded random generator, so the same prompt always "
    "gives the same text.",
    "Of course, “{word}” deserves more depth than a simulation can offer.",
    "In a real application this generator would be a call to a language model.",
    "Every reader, the first one included, receives exactly the text from its own offset on.",
    "Offsets count characters, so a reconnect may well resume in the middle of a word.",
    "Nothing here needs a framework: the server is a plain ASGI app.",
)
_CLOSERS = (
    "And that is the end of this simulated answer.",
    "That is all: the stream is finished.",
    "Thanks for watching this answer stream to its end.",
)
_TOKEN = re.compile(r"\s*(?:[\w']+|[^\w\s])|\s+")
_WORD = re.compile(r"[^\W\d_]{4,}")


def answer_tokens(prompt: str) -> list[str]:
    """The simulated model's answer to `prompt`, as the tokens it streams (about 150 to 300)."""
    prompt = " ".join(prompt[:MAX_PROMPT].split())
    rng = random.Random(hashlib.sha256(prompt.encode("utf-8", "replace")).digest())
    topic = prompt if len(prompt) <= 80 else prompt[:79].rstrip() + "…"
    words = _WORD.findall(prompt)
    fill = {"topic": topic or "nothing in particular"}
    paragraphs = [[rng.choice(_OPENERS).format(**fill)]]
    target = rng.randint(150, 220)
    count = len(_TOKEN.findall(paragraphs[0][0]))
    for sentence in rng.sample(_SENTENCES, len(_SENTENCES)):
        if count >= target:
            break
        if len(paragraphs[-1]) >= 3:
            paragraphs.append([])
        text = sentence.format(word=rng.choice(words).lower() if words else "this")
        paragraphs[-1].append(text)
        count += len(_TOKEN.findall(text))
    paragraphs.append([rng.choice(_CLOSERS)])
    return _TOKEN.findall("\n\n".join(" ".join(p) for p in paragraphs))


def answer_text(prompt: str) -> str:
    """The full text a reader of a stream started with `prompt` ends up with."""
    return "".join(answer_tokens(prompt))


async def simulated_llm(prompt: str, delay: float = DEFAULT_DELAY) -> AsyncIterator[str]:
    """Stream `answer_tokens(prompt)`, one token every `delay` seconds, like a slow model."""
    for token in answer_tokens(prompt):
        await anyio.sleep(delay)
        yield token


@dataclass
class _Sent:
    """What a response has sent so far, so a cut one can still be ended properly."""

    started: bool = False
    ended: bool = False


class DemoApp:
    """The demo's ASGI app. The context lives from lifespan startup to shutdown.

    `answer(prompt)` makes the text of a new stream (default: `simulated_llm` with `delay`);
    `on_ready` is called once the app can serve, so a launcher can tell the user where to go.
    """

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        delay: float = DEFAULT_DELAY,
        answer: Answer | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.redis_url = redis_url or None
        self.delay = delay
        self.answer: Answer = answer or (lambda prompt: simulated_llm(prompt, delay))
        self.on_ready = on_ready
        self._context: ResumableStreamContext | None = None
        # The open responses of this process, by stream id, so POST /cut/{id} can end them.
        self._active: dict[str, set[anyio.CancelScope]] = {}
        self._page = (
            importlib.resources.files("resumable_stream").joinpath("static/demo.html").read_bytes()
        )

    @property
    def backend_name(self) -> str:
        return "redis" if self.redis_url else "memory"

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.backend_name,
            "redis": _redact(self.redis_url) if self.redis_url else None,
            "delay": self.delay,
            "retry_ms": RETRY_MS,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets here; the server refuses the handshake
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/":
            if method not in ("GET", "HEAD"):
                await _send(send, 405, b"use GET", allow=b"GET")
            else:
                # Servers drop the body of a HEAD response themselves.
                await _send(send, 200, self._page, b"text/html; charset=utf-8")
        elif path == "/api/info":
            await _send(send, 200, json.dumps(self.info()).encode(), b"application/json")
        elif path == "/api/stats":
            if self._context is None:
                await _send(send, 503, b"not serving yet")
            else:
                stats = dataclasses.asdict(self._context.stats())
                await _send(send, 200, json.dumps(stats).encode(), b"application/json")
        elif path.startswith("/stream/"):
            if method != "GET":
                await _send(send, 405, b"use GET", allow=b"GET")
            else:
                await self._stream(path.removeprefix("/stream/"), scope, receive, send)
        elif path.startswith("/cut/"):
            if method != "POST":
                await _send(send, 405, b"use POST", allow=b"POST")
            else:
                cut = self.cut(path.removeprefix("/cut/"))
                body = json.dumps({"cut": cut}).encode()
                await _send(send, 200, body, b"application/json")
        else:
            await _send(send, 404, b"not found")

    def cut(self, stream_id: str) -> int:
        """End this process's open responses for `stream_id`; return how many there were."""
        scopes = self._active.get(stream_id, set())
        for cancel_scope in scopes:
            cancel_scope.cancel()
        return len(scopes)

    def cut_all(self) -> None:
        """End every open response (the producers go on), as when the server shuts down."""
        for stream_id in list(self._active):
            self.cut(stream_id)

    async def _stream(self, stream_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        context = self._context
        if context is None:
            await _send(send, 503, b"the demo is not running (no lifespan)")
            return
        prompts = [
            value
            for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), True)
            if name == "prompt"
        ]
        # Without a prompt the request may only follow or resume: a viewer never starts one.
        make = partial(self.answer, prompts[-1][:MAX_PROMPT]) if prompts else None
        response = EventStreamResponse(
            context, stream_id, make, retry=RETRY_MS, keepalive=KEEPALIVE
        )
        sent = _Sent()

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent.started = True
            elif not message.get("more_body", False):
                sent.ended = True
            await send(message)

        cancel_scope = anyio.CancelScope()
        scopes = self._active.setdefault(stream_id, set())
        scopes.add(cancel_scope)
        try:
            with cancel_scope:
                await response(scope, receive, tracking_send)
        finally:
            scopes.discard(cancel_scope)
            if not scopes and self._active.get(stream_id) is scopes:
                del self._active[stream_id]
        if cancel_scope.cancelled_caught and not sent.ended:
            await _end_cut_response(send, started=sent.started)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        started = False
        try:
            async with self._make_context() as context:
                self._context = context
                await send({"type": "lifespan.startup.complete"})
                started = True
                if self.on_ready is not None:
                    self.on_ready()
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                self._context = None
                self.cut_all()
        except Exception as exc:
            self._context = None
            phase = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{phase}.failed", "message": _startup_error(self, exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    def _make_context(self) -> ResumableStreamContext:
        if self.redis_url:
            return create_resumable_stream_context(
                self.redis_url, key_prefix=DEMO_KEY_PREFIX, drain_timeout=DRAIN_TIMEOUT
            )
        return create_resumable_stream_context(
            backend=MemoryBackend(), key_prefix=DEMO_KEY_PREFIX, drain_timeout=DRAIN_TIMEOUT
        )


async def _end_cut_response(send: Send, *, started: bool) -> None:
    """Finish a response the server cut, telling the client why (an event without an id).

    The event carries no id, so the client's `Last-Event-ID` stays the offset of the last text
    it got. A response cut before it started still answers 200: any other status would make
    `EventSource` give up instead of reconnecting.
    """
    try:
        if not started:
            headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache, no-transform"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send(
                {
                    "type": "http.response.body",
                    "body": f"retry: {RETRY_MS}\n\n".encode(),
                    "more_body": True,
                }
            )
        cut = encode_event("the server ended this connection", event="cut").encode()
        await send({"type": "http.response.body", "body": cut, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass  # the client left first (ASGI spec 2.4 servers)


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    *,
    allow: bytes | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-cache"),
    ]
    if allow is not None:
        headers.append((b"allow", allow))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _redact(url: str) -> str:
    """The URL without its credentials, fit to show on a page."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _startup_error(app: DemoApp, exc: BaseException) -> str:
    # Task groups wrap the cause in exception groups; the person starting the demo wants it.
    while isinstance(group := getattr(exc, "exceptions", None), tuple) and group:
        exc = group[0]
    if app.redis_url:
        return f"cannot use Redis at {_redact(app.redis_url)}: {exc}"
    return f"the demo could not start: {exc}"


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _browser_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    # A wildcard address is where the server listens, not somewhere a browser can go.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run(host: str, port: int, redis_url: str | None, delay: float) -> int:
    """Serve the demo until interrupted; the exit status of `python -m resumable_stream demo`."""
    try:
        import uvicorn
    except ImportError:
        print(
            "the demo needs uvicorn, an optional dependency: pip install 'resumable-streams[demo]'",
            file=sys.stderr,
        )
        return 1
    if redis_url:
        try:
            import redis  # noqa: F401
        except ImportError:
            print(
                "--redis-url needs the redis package: pip install 'resumable-streams[redis]'",
                file=sys.stderr,
            )
            return 1
    try:
        sock = _bind(host, port)
    except OSError as exc:
        print(f"cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    url = _browser_url(sock)
    backend = f"in Redis at {_redact(redis_url)}" if redis_url else "in memory (this process only)"

    def ready() -> None:
        print(
            f"\nresumable_stream demo: streams kept {backend}, "
            f"one token every {delay * 1000:g} ms\n"
            f"Open {url} in your browser (Ctrl+C to stop)\n",
            flush=True,
        )

    app = DemoApp(redis_url=redis_url, delay=delay, on_ready=ready)
    config = uvicorn.Config(
        app,
        host=sock.getsockname()[0],
        port=sock.getsockname()[1],
        lifespan="on",
        # uvloop and httptools when they are installed (`uvicorn[standard]`): a streamed
        # response costs about half the CPU per chunk on uvloop (benchmarks/README.md).
        loop="auto",
        http="auto",
        timeout_graceful_shutdown=3,
        log_level="info",
    )

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn waits for open responses before it shuts down, and an SSE response only
            # ends with its stream: end them now, or Ctrl+C would wait and then cancel them.
            app.cut_all()
            await super().shutdown(sockets)

    server = Server(config)
    with sock:
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            return 0
        except SystemExit:
            return 1  # uvicorn exits this way when the lifespan startup fails; it said why
    return 0 if server.started else 1
