"""The AI SDK's own client (the npm package `ai`, pinned in tests/ai_sdk_client) against the
example backend (`examples/ai_sdk_chat.py`'s `create_app`, see `ai_sdk_app.py`) under real
uvicorn servers: one worker on the in-memory backend, and two worker processes sharing a real
Redis, the first behind a TCP proxy that cuts connections mid-message.

Node runs `DefaultChatTransport` and `readUIMessageStream` (tests/ai_sdk_client/scenarios.mjs);
`npm ci` installs it once per session. Headless Chromium runs the same scenarios from the
package's ESM build, bundled with esbuild (from the same package-lock). Without Node.js (or
Chromium) these tests are skipped, and under `RESUMABLE_STREAM_REQUIRE_ALL=1` (CI) they fail
instead.
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

from .ai_sdk_app import SECRET, tokens
from .browser import chromium
from .servers import uvicorn_server
from .tcp_proxy import TcpProxy

pytestmark = pytest.mark.anyio

STEP = 20.0  # seconds: the bound of one scenario, Node's start included
DELAY = "0.02"  # seconds between tokens: a message streams for about a second
KEEPALIVE = 0.1  # the servers' keep-alive interval, seconds (the model pauses for 0.3)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the test's loop; the servers run on theirs


@dataclass
class Deployment:
    """The app's workers on one backend; the first one is also behind `proxy`."""

    backend: str
    workers: list[str]
    proxy: TcpProxy
    log: Path

    @property
    def proxied(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def other(self) -> str:
        """A worker other than the proxied one, where there are two."""
        return self.workers[-1]


@pytest.fixture(scope="module", params=["memory", "redis"])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    backend = request.param
    with tempfile.TemporaryDirectory(prefix="rs-ai-sdk-") as tmp:
        log = Path(tmp) / "server.log"
        env = {"RS_TEST_TOKEN_DELAY": DELAY, "RS_TEST_LOG": str(log)}
        env["RS_EXAMPLE_KEEPALIVE"] = str(KEEPALIVE)
        count, loop = 1, "asyncio"
        if backend == "redis":
            env["REDIS_URL"] = request.getfixturevalue("redis_server").url
            count, loop = 2, "uvloop"
        with ExitStack() as stack:
            workers = [
                stack.enter_context(uvicorn_server("tests.ai_sdk_app:app", env, loop=loop))
                for _ in range(count)
            ]
            port = urlsplit(workers[0]).port
            assert port is not None
            proxy = stack.enter_context(TcpProxy(port))
            yield Deployment(backend, workers, proxy, log)


async def run(client: Path, deployment: Deployment, **options: Any) -> dict[str, Any]:
    """Run one scenario in Node; cut the proxy's connections whenever it asks."""
    command = ["node", str(client / "client.mjs"), json.dumps(options)]
    with anyio.fail_after(STEP):
        async with await anyio.open_process(command, stderr=sys.stderr.fileno()) as process:
            assert process.stdout is not None
            assert process.stdin is not None
            buffered = b""
            async for piece in process.stdout:
                buffered += piece
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    message = json.loads(line)
                    if message["event"] == "cut":
                        await anyio.to_thread.run_sync(deployment.proxy.cut)
                        await process.stdin.send(b"go\n")
                    else:
                        result: dict[str, Any] = message["result"]
                        return result
    raise AssertionError(f"the client exited with {process.returncode} and no result")


def new_chat() -> str:
    return f"chat-{uuid.uuid4().hex}"  # the Redis outlives a test: never the same chat twice


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


async def test_a_message_cut_mid_stream_resumes_on_another_worker_exactly_once(
    ai_sdk_client: Path, deployment: Deployment
) -> None:
    prompt = "cut"
    result = await run(
        ai_sdk_client,
        deployment,
        scenario="resume",
        api=f"{deployment.proxied}/api/chat",
        resumeApi=f"{deployment.other}/api/chat",  # the other worker, where there are two
        chatId=new_chat(),
        prompt=prompt,
        cutAfter=3,
    )
    expected = "".join(tokens(prompt))
    first = result["first"]
    # The cut broke the first response mid-message: an error, no finish.
    assert first["cut"] is True
    assert first["error"] is not None
    assert first["chunks"][0]["type"] == "start"
    assert "finish" not in [c["type"] for c in first["chunks"]]
    assert len(text_of(first["chunks"])) >= 3
    assert text_of(first["chunks"]) != expected
    resumed = result["resumed"]
    assert resumed is not None
    # Replayed from its start: the whole text once, in one part, under the first message id.
    assert resumed["text"] == expected
    assert [p["type"] for p in resumed["parts"]] == ["step-start", "text"]
    assert resumed["id"] == first["chunks"][0]["messageId"]
    assert resumed["errors"] == []
    assert result["resumedError"] is None
    kinds = [c["type"] for c in result["resumedChunks"]]
    assert kinds.count("start") == 1
    assert kinds[0] == "start"
    assert kinds[-1] == "finish"
    assert {c["id"] for c in result["resumedChunks"] if c["type"] == "text-delta"} == {
        f"{resumed['id']}-1"
    }
    # After the end: no active stream, 204, which the transport turns into null.
    assert result["secondIsNull"] is True


async def test_a_client_that_counts_chunks_continues_instead_of_replaying(
    ai_sdk_client: Path, deployment: Deployment
) -> None:
    prompt = "continue"
    result = await run(
        ai_sdk_client,
        deployment,
        scenario="continue",
        api=f"{deployment.proxied}/api/chat",
        resumeApi=f"{deployment.other}/api/chat",
        chatId=new_chat(),
        prompt=prompt,
        cutAfter=4,
    )
    assert result["first"]["error"] is not None
    # The transport counted what it received, and went on counting what the resume sent.
    assert result["received"] == len(result["first"]["chunks"])
    assert result["counted"] == result["received"] + len(result["tail"]["chunks"])
    assert result["replayFlag"] is False
    tail = result["tail"]
    assert tail["error"] is None
    # Only what the client had not received: no second start, and the text adds up.
    assert tail["chunks"][0]["type"] != "start"
    assert "start" not in [c["type"] for c in tail["chunks"]]
    assert tail["chunks"][-1]["type"] == "finish"
    assert text_of(result["first"]["chunks"]) + text_of(tail["chunks"]) == "".join(tokens(prompt))
    assert result["text"] == "".join(tokens(prompt))
    assert result["errors"] == []


async def test_several_viewers_follow_one_message_at_once(
    ai_sdk_client: Path, deployment: Deployment
) -> None:
    prompt = "viewers"
    result = await run(
        ai_sdk_client,
        deployment,
        scenario="viewers",
        api=f"{deployment.workers[0]}/api/chat",
        resumeApi=f"{deployment.other}/api/chat",
        chatId=new_chat(),
        prompt=prompt,
        count=3,
    )
    views = result["views"]
    assert len(views) == 3
    assert all(v is not None for v in views)
    assert {v["text"] for v in views} == {"".join(tokens(prompt))}
    assert len({v["id"] for v in views}) == 1
    assert all(v["errors"] == [] for v in views)
    assert result["ownError"] is None


async def test_a_failing_model_ends_with_an_error_chunk_and_no_details(
    ai_sdk_client: Path, deployment: Deployment
) -> None:
    result = await run(
        ai_sdk_client,
        deployment,
        scenario="error",
        api=f"{deployment.workers[0]}/api/chat",
        chatId=new_chat(),
        prompt="fail please",
    )
    chunks = result["chunks"]
    assert chunks[-1] == {"type": "error", "errorText": "An error occurred."}
    assert "finish" not in [c["type"] for c in chunks]
    assert text_of(chunks) == "".join(tokens("fail please")[:2])
    # The client surfaced it, and nothing of the exception reached it.
    assert result["errors"] == [{"name": "Error", "message": "An error occurred."}]
    assert SECRET not in json.dumps(result)
    assert "RuntimeError" not in json.dumps(result)
    # The details went to the server's log.
    assert SECRET in deployment.log.read_text()


async def test_keepalive_comments_while_the_model_thinks_do_not_disturb_the_client(
    ai_sdk_client: Path, deployment: Deployment
) -> None:
    prompt = "pause first"
    body = {"id": new_chat(), "messages": [_user(prompt)], "trigger": "submit-message"}
    head = ""
    async with httpx.AsyncClient(timeout=STEP) as client:
        url = f"{deployment.workers[0]}/api/chat"
        with anyio.fail_after(STEP):
            async with client.stream("POST", url, json=body) as response:
                async for piece in response.aiter_text():
                    head += piece
                    if '"type":"text-start"' in head:
                        break  # the model spoke: its silence is over
    assert head.count(": keep-alive\n\n") >= 2  # sent while the model was silent
    # The real client reads through them.
    result = await run(
        ai_sdk_client,
        deployment,
        scenario="error",  # send, and assemble what comes
        api=f"{deployment.workers[0]}/api/chat",
        chatId=new_chat(),
        prompt=prompt,
    )
    assert result["errors"] == []
    assert result["text"] == "".join(tokens(prompt))
    assert result["chunks"][-1]["type"] == "finish"


async def test_a_stop_from_any_worker_ends_the_message_with_abort(
    ai_sdk_client: Path, deployment: Deployment
) -> None:
    prompt = "stop"
    result = await run(
        ai_sdk_client,
        deployment,
        scenario="stop",
        api=f"{deployment.other}/api/chat",
        chatId=new_chat(),
        prompt=prompt,
        stopAfter=3,
    )
    assert result["stopped"] == 204
    kinds = [c["type"] for c in result["chunks"]]
    # The open text part ends, then abort: the client's message is clean, and shorter.
    assert kinds[-2:] == ["text-end", "abort"]
    assert "finish" not in kinds
    assert result["errors"] == []
    assert [p.get("state") for p in result["parts"] if p["type"] == "text"] == ["done"]
    assert "".join(tokens(prompt)).startswith(result["text"])
    assert len(result["text"]) < len("".join(tokens(prompt)))
    assert result["againIsNull"] is True


async def test_a_stop_on_another_worker_reaches_the_producer(deployment: Deployment) -> None:
    # On Redis the stop goes to the other worker; in memory there is one.
    chat = new_chat()
    body = {"id": chat, "messages": [_user("stop")], "trigger": "submit-message"}
    async with httpx.AsyncClient(timeout=STEP) as client:
        with anyio.fail_after(STEP):
            async with client.stream(
                "POST", f"{deployment.workers[0]}/api/chat", json=body
            ) as response:
                frames = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        frames.append(line[6:])
                        if len(frames) == 5:
                            stop = await client.post(f"{deployment.other}/api/chat/{chat}/stop")
                            assert stop.status_code == 204
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[-2]) == {"type": "abort", "reason": "stopped"}


async def test_every_route_asks_authorize_about_the_chat(deployment: Deployment) -> None:
    worker = deployment.workers[0]
    body = {"id": "denied-1", "messages": [_user("hi")], "trigger": "submit-message"}
    async with httpx.AsyncClient(timeout=STEP) as client:
        assert (await client.post(f"{worker}/api/chat", json=body)).status_code == 403
        assert (await client.get(f"{worker}/api/chat/denied-1/stream")).status_code == 403
        assert (await client.post(f"{worker}/api/chat/denied-1/stop")).status_code == 403
        # The same chat id, allowed, works: the refusal was about the id.
        body["id"] = chat = new_chat()
        async with client.stream("POST", f"{worker}/api/chat", json=body) as response:
            assert response.status_code == 200
        stop = await client.post(f"{worker}/api/chat/{chat}/stop")
        assert stop.status_code == 204


PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>the AI SDK client under test</title>
<script type="module" src="/__test__/bundle.js"></script>
"""


async def test_in_a_browser_a_cut_message_resumes_exactly_once(
    ai_sdk_client: Path, deployment: Deployment, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.js"
    esbuild = ai_sdk_client / "node_modules" / ".bin" / "esbuild"
    command = [str(esbuild), "browser.mjs", "--bundle", "--format=esm", "--platform=browser"]
    command += [f"--outfile={bundle}", "--log-level=warning"]
    with anyio.fail_after(60):
        await anyio.run_process(command, cwd=ai_sdk_client)
    # The page comes from the proxied worker's origin, so the transport's requests are
    # same-origin, as an app's are.
    origin = deployment.proxied
    prompt = "browser"
    async with chromium() as browser:
        page = await browser.new_page()

        async def serve_page(route: Any) -> None:
            await route.fulfill(body=PAGE, content_type="text/html")

        async def serve_bundle(route: Any) -> None:
            await route.fulfill(body=bundle.read_bytes(), content_type="text/javascript")

        async def cut() -> None:
            await anyio.to_thread.run_sync(deployment.proxy.cut)

        await page.route(f"{origin}/__test__/page", serve_page)
        await page.route(f"{origin}/__test__/bundle.js", serve_bundle)
        await page.expose_function("cutConnection", cut)
        with anyio.fail_after(STEP):
            await page.goto(f"{origin}/__test__/page")
            await page.wait_for_function("window.runScenario !== undefined")
            result = await page.evaluate(
                "(options) => window.runScenario(options)",
                {
                    "scenario": "resume",
                    "api": f"{origin}/api/chat",
                    "resumeApi": f"{origin}/api/chat",
                    "chatId": new_chat(),
                    "prompt": prompt,
                    "cutAfter": 3,
                },
            )
    first = result["first"]
    assert first["cut"] is True
    assert first["error"] is not None  # Chromium saw the network drop mid-message
    assert text_of(first["chunks"]) != "".join(tokens(prompt))
    resumed = result["resumed"]
    assert resumed["text"] == "".join(tokens(prompt))
    assert resumed["id"] == first["chunks"][0]["messageId"]
    assert resumed["errors"] == []
    assert [c["type"] for c in result["resumedChunks"]].count("start") == 1
    assert result["secondIsNull"] is True


def _user(text: str) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "role": "user", "parts": [{"type": "text", "text": text}]}


def test_the_example_app_runs_under_uvicorn() -> None:
    """`uvicorn examples.ai_sdk_chat:app` serves the protocol with its simulated model."""
    env = {"RS_EXAMPLE_DELAY": "0.001"}
    chat = new_chat()
    body = {"id": chat, "messages": [_user("hello")], "trigger": "submit-message"}
    with uvicorn_server("examples.ai_sdk_chat:app", env) as url:
        response = httpx.post(f"{url}/api/chat", json=body, timeout=STEP)
        assert response.status_code == 200
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        frames = [line[6:] for line in response.text.split("\n\n") if line]
        assert frames[-1] == "[DONE]"
        chunks = [json.loads(f) for f in frames[:-1]]
        assert text_of(chunks) == "You said 'hello'. Here is a long answer, one word at a time. "
        resumed = httpx.get(f"{url}/api/chat/{chat}/stream", timeout=STEP)
        assert resumed.status_code == 204


async def test_the_docs_lines_serve_the_ai_sdk_client(ai_sdk_client: Path, tmp_path: Path) -> None:
    """The AI SDK page's app (docs/guides/ai-sdk.md, its first Python block, as a developer
    copies it: imports and a stand-in model included) serves the real client through a cut."""
    page = (Path(__file__).parent.parent / "docs" / "guides" / "ai-sdk.md").read_text()
    block = page.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "docs_chat.py").write_text(block)
    env = {"PYTHONPATH": str(tmp_path)}
    with (
        uvicorn_server("docs_chat:app", env) as url,
        TcpProxy(urlsplit(url).port or 0) as proxy,
    ):
        deployment = Deployment("memory", [url], proxy, tmp_path / "unused.log")
        result = await run(
            ai_sdk_client,
            deployment,
            scenario="resume",
            api=f"{deployment.proxied}/api/chat",
            resumeApi=f"{url}/api/chat",
            chatId=new_chat(),
            prompt="hi",
            cutAfter=2,
        )
    assert result["first"]["error"] is not None
    assert result["resumed"]["text"] == "You said hi, and here is the answer, word by word. "
    assert result["secondIsNull"] is True
