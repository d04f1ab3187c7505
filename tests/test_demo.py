"""`python -m resumable_stream demo`: the ASGI app driven in-process, the command line, and the
page in a real headless Chromium against the demo server run as a subprocess.

Without Chromium or Playwright the browser tests are skipped (they fail under
`RESUMABLE_STREAM_REQUIRE_ALL=1`, as in CI); `RESUMABLE_STREAM_CHROMIUM` names another Chromium
binary. They leave a screenshot in `tests/artifacts/demo.png`.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from resumable_stream.__main__ import main
from resumable_stream._demo import DemoApp, answer_text, answer_tokens

from .asgi_driver import serve
from .browser import chromium
from .conftest import ASYNCIO_LOOPS

pytestmark = pytest.mark.anyio

PROMPT = "Why do streams need to be resumable?"
ARTIFACTS = Path(__file__).parent / "artifacts"
SERVER_START_TIMEOUT = 30.0
BROWSER_TIMEOUT_MS = 20_000  # any one wait in the page; a whole stream takes about 4 s


@pytest.fixture
def anyio_backend() -> str:
    # Playwright's async API runs on asyncio only; this overrides conftest's flavor matrix.
    # The browser tests' loop is only the test's: the demo server is a subprocess (on uvloop
    # when it is installed, uvicorn's default).
    return "asyncio"


# The app runs in the test's loop: both loops.
on_both_loops = pytest.mark.parametrize("anyio_backend", ASYNCIO_LOOPS)


# The simulated model


@pytest.mark.parametrize("prompt", [PROMPT, "", "x" * 2000, "Ça va? 😀\r\n\tbien"])
def test_answer_is_deterministic_and_llm_sized(prompt: str) -> None:
    tokens = answer_tokens(prompt)
    assert 150 <= len(tokens) <= 300
    assert "".join(tokens) == answer_text(prompt) == "".join(answer_tokens(prompt))
    assert all(tokens)
    assert "\r" not in answer_text(prompt)


def test_different_prompts_get_different_answers() -> None:
    assert answer_text("one question") != answer_text("another question")


# The ASGI app, driven in-process


class Gate:
    """An answer source that stops after `before` tokens until the test opens it."""

    def __init__(self, before: int) -> None:
        self.before = before
        self.open = anyio.Event()

    async def answer(self, prompt: str) -> AsyncIterator[str]:
        for index, token in enumerate(answer_tokens(prompt)):
            if index == self.before:
                await self.open.wait()
            yield token


@on_both_loops
async def test_page_and_info_are_served() -> None:
    async with serve(DemoApp(delay=0)) as client:
        async with client.request("/") as response:
            body = await response.read()
        assert response.status == 200
        assert response.header("content-type") == "text/html; charset=utf-8"
        assert b"<title>resumable_stream demo</title>" in body
        assert b"new EventSource(" in body
        assert not re.search(rb"(src|href)=\"https?:", body), "the page must work offline"
        async with client.request("/api/info") as response:
            info = json.loads(await response.read())
        assert info == {"backend": "memory", "redis": None, "delay": 0, "retry_ms": 500}
        async with client.request("/api/stats") as response:
            stats = json.loads(await response.read())
        assert stats == {
            "producers": 0,
            "followers": 0,
            "lingering": 0,
            "backend_connected": True,
            "reconnects": 0,
            "last_reconnect": None,
        }
        async with client.request("/nowhere") as response:
            assert response.status == 404
        async with client.request("/cut/x") as response:
            assert response.status == 405
            assert response.header("allow") == "POST"


@on_both_loops
async def test_a_stream_sends_the_whole_answer_with_offsets_as_ids() -> None:
    expected = answer_text(PROMPT)
    async with serve(DemoApp(delay=0)) as client:
        query = "prompt=Why+do+streams+need+to+be+resumable%3F"
        async with client.request("/stream/s1", query=query) as response:
            assert response.status == 200
            assert response.header("content-type") == "text/event-stream; charset=utf-8"
            events = await response.events()
            assert response.finished
        assert "".join(e.data for e in events) == expected
        assert events[0].retry == 500
        assert events[-1].id == str(len(expected))
        # What the browser's EventSource does after the end: reconnect with the last id. A 204
        # then tells it to stop.
        headers = {"Last-Event-ID": str(len(expected))}
        async with client.request("/stream/s1", query=query, headers=headers) as again:
            assert again.status == 204
        # A reader cut off near the end still gets the tail, while the producer lingers.
        async with client.request("/stream/s1", headers={"Last-Event-ID": "3"}) as tail:
            assert "".join(e.data for e in await tail.events()) == expected[3:]
        # The health snapshot: the finished producer lingers for late readers.
        async with client.request("/api/stats") as response:
            stats = json.loads(await response.read())
        assert (stats["producers"], stats["followers"], stats["lingering"]) == (0, 0, 1)


@on_both_loops
async def test_a_viewer_never_starts_a_stream() -> None:
    async with serve(DemoApp(delay=0)) as client, client.request("/stream/unknown") as response:
        assert response.status == 204


@on_both_loops
async def test_cut_ends_the_response_and_a_reconnect_gets_exactly_the_rest() -> None:
    gate = Gate(before=5)
    expected = answer_text(PROMPT)
    async with serve(DemoApp(answer=gate.answer)) as client:
        async with client.request("/stream/c1", query=f"prompt={PROMPT}") as first:
            received = await first.events(5)
            async with client.request("/cut/c1", method="POST") as cut:
                assert json.loads(await cut.read()) == {"cut": 1}
            received += await first.events()
            assert first.finished, "the cut response must end its body"
        *text_events, last = received
        assert last.event == "cut"
        offset = len("".join(e.data for e in text_events))
        assert last.id == str(offset) == text_events[-1].id  # the cut event moves no cursor
        async with client.request("/cut/c1", method="POST") as cut:
            assert json.loads(await cut.read()) == {"cut": 0}
        # EventSource reconnects with the same URL, prompt included, and the last id it saw.
        async with client.request(
            "/stream/c1", query=f"prompt={PROMPT}", headers={"Last-Event-ID": str(offset)}
        ) as second:
            assert second.status == 200
            gate.open.set()
            rest = await second.events()
        assert "".join(e.data for e in text_events + rest) == expected
        assert rest[-1].id == str(len(expected))


@on_both_loops
async def test_cut_reaches_every_viewer_of_the_stream_and_no_other() -> None:
    gate = Gate(before=3)
    async with (
        serve(DemoApp(answer=gate.answer)) as client,
        client.request("/stream/a", query="prompt=a") as a1,
        client.request("/stream/a") as a2,
        client.request("/stream/b", query="prompt=b") as b,
    ):
        await a1.events(3)
        await a2.events(3)
        before = await b.events(3)
        async with client.request("/cut/a", method="POST") as cut:
            assert json.loads(await cut.read()) == {"cut": 2}
        assert [e.event for e in await a1.events()] == ["cut"]
        assert [e.event for e in await a2.events()] == ["cut"]
        gate.open.set()
        rest = await b.events()
        assert "".join(e.data for e in before + rest) == answer_text("b")
        assert b.finished


@on_both_loops
async def test_cut_all_ends_every_open_response_as_on_shutdown() -> None:
    gate = Gate(before=2)
    app = DemoApp(answer=gate.answer)
    async with (
        serve(app) as client,
        client.request("/stream/x", query="prompt=x") as x,
        client.request("/stream/y", query="prompt=y") as y,
    ):
        await x.events(2)
        await y.events(2)
        app.cut_all()
        assert [e.event for e in await x.events()] == ["cut"]
        assert [e.event for e in await y.events()] == ["cut"]
        gate.open.set()


# The command line


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--redis-url", "--delay"):
        assert option in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--port", "http"], "not a port number"),
        (["demo", "--port", "70000"], "a port is 0 to 65535"),
        (["demo", "--delay", "-1"], "the delay is 0 to 10 seconds"),
        (["demo", "--delay", "nan"], "the delay is 0 to 10 seconds"),
        (["demo", "--what"], "unrecognized arguments"),
        (["fly"], "invalid choice"),
    ],
)
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_without_uvicorn_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` fail
    assert main(["demo", "--port", "0"]) == 1
    assert "pip install 'resumable-streams[demo]'" in capsys.readouterr().err


def test_a_busy_port_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# The page, in a real browser


@dataclass
class DemoServer:
    url: str
    output: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def demo_server() -> Iterator[DemoServer]:
    """`python -m resumable_stream demo` on a port of its choosing, as a user would start it."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-m", "resumable_stream", "demo", "--port", "0", "--delay", "0.02"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    server = DemoServer(url="")

    def pump() -> None:
        # Also keeps the pipe drained, so the server never blocks writing its access log.
        assert process.stdout is not None
        for line in process.stdout:
            server.output.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not server.url:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the demo did not start in time:\n{''.join(server.output)}")
            if line is None:
                pytest.fail(f"the demo exited:\n{''.join(server.output)}")
            if match := re.search(r"Open (http://\S+/) in your browser", line):
                server.url = match.group(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        print("demo server output:\n" + "".join(server.output))


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": 860})
        context.set_default_timeout(BROWSER_TIMEOUT_MS)
        yield context


async def start_stream(page: Any, url: str, prompt: str = PROMPT, offset: int = 40) -> None:
    """Open the page, ask `prompt`, and wait until `offset` characters have arrived."""
    await page.goto(url)
    await page.fill("#prompt", prompt)
    await page.click("#start")
    await wait_for_offset(page, offset)


async def wait_for_offset(page: Any, offset: int) -> int:
    await page.wait_for_function(
        f"Number(document.getElementById('offset').textContent) >= {offset}"
    )
    return int(await page.text_content("#offset"))


async def finished_text(page: Any) -> str:
    await page.wait_for_selector("#status[data-state=finished]")
    text: str = await page.eval_on_selector("#answer", "e => e.textContent")
    return text


async def log_of(page: Any) -> list[tuple[str, int | None, str]]:
    entries = await page.eval_on_selector_all(
        "#log li[data-kind]",
        "items => items.map(li => [li.dataset.kind, li.dataset.offset ?? null, "
        "li.querySelector('span').textContent])",
    )
    return [(kind, None if off is None else int(off), text) for kind, off, text in entries]


async def test_browser_cut_by_server_reconnects_and_resumes_exactly(browser, demo_server) -> None:
    expected = answer_text(PROMPT)
    page = await browser.new_page()
    await page.goto(demo_server.url)
    await page.wait_for_selector("#backend[data-backend=memory]")
    await start_stream(page, demo_server.url)
    await page.click("#cut")
    await page.wait_for_selector("#log li[data-kind=resumed]")
    assert await finished_text(page) == expected
    assert int(await page.text_content("#offset")) == len(expected)
    log = await log_of(page)
    kinds = [kind for kind, _, _ in log]
    cut_at = kinds.index("cut")
    (_, cut_offset, cut_text), (resumed, resumed_offset, resumed_text) = log[cut_at : cut_at + 2]
    assert resumed == "resumed"
    assert cut_offset is not None
    assert 0 < cut_offset < len(expected), "cut mid-stream"
    assert resumed_offset == cut_offset
    assert cut_text == f"cut by server at offset {cut_offset}"
    assert resumed_text == f"reconnected, resumed from {cut_offset}"
    assert kinds[0] == "connected"
    assert kinds[-1] == "finished"
    assert await page.text_content("#connections") == "2"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    print(f"cut at offset {cut_offset}, resumed from {resumed_offset}, of {len(expected)}")


async def test_browser_second_tab_follows_the_same_stream(browser, demo_server) -> None:
    expected = answer_text("Two viewers, one answer")
    first = await browser.new_page()
    await start_stream(first, demo_server.url, "Two viewers, one answer")
    link = await first.get_attribute("#second", "href")
    assert link is not None
    assert link.startswith("#id=chat-")
    # A new tab has its own sessionStorage, so it starts from offset 0 and catches up.
    second = await browser.new_page()
    await second.goto(demo_server.url + link)
    await wait_for_offset(second, 1)
    assert await second.input_value("#prompt") == "Two viewers, one answer"
    assert await finished_text(second) == expected
    assert await finished_text(first) == expected
    log = await log_of(second)
    assert ("connected", 0, "connected, streaming from offset 0") in log


async def test_browser_reload_continues_from_the_stored_offset(browser, demo_server) -> None:
    expected = answer_text("Reload me halfway")
    page = await browser.new_page()
    await start_stream(page, demo_server.url, "Reload me halfway")
    await page.reload()
    assert await finished_text(page) == expected
    log = await log_of(page)
    kind, stored, _ = log[0]
    assert kind == "info"
    assert stored is not None
    assert 0 < stored < len(expected)
    assert ("connected", stored, f"connected, resumed from stored offset {stored}") in log
    # Reloading a finished stream shows it from storage, without asking the server again.
    await page.reload()
    assert await finished_text(page) == expected
    print(f"reloaded at offset {stored}, of {len(expected)}")
