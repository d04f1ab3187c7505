"""Every Python block of the documentation and the README runs (or, where it cannot run alone,
compiles and type-checks, saying why), and the apps they build answer as the pages say.

The blocks run in this process, each as a module of its own, with `REDIS_URL` and
`redis://localhost:6379/0` pointing at the session's Redis-protocol server; a block's `check`
(named in its docs-test comment, see `docs_blocks`) then drives what it made, in-process
through the ASGI driver. Every block is also type-checked with mypy, in one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import anyio
import pytest

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

import resumable_stream as rs

from .asgi_driver import serve
from .conftest import RedisServer
from .docs_blocks import (
    ROOT,
    Block,
    DocsBlockError,
    collect,
    execute,
    for_type_checking,
    load,
    python_blocks,
    sources,
)

BLOCKS = python_blocks()
LOCAL_REDIS = "redis://localhost:6379/0"
STEP = 10.0  # seconds any one step of a check may take


@pytest.fixture
def redis_url(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    return redis_server.url


def run(block: Block, tmp_path: Path, redis_url: str) -> ModuleType:
    """Run the block as module `docs_block` (its coroutine too, if it awaits at top level)."""
    code = block.code.replace(LOCAL_REDIS, redis_url)
    module, compiled = load(block, code, tmp_path / "docs_block.py", "docs_block")
    try:
        coroutine = execute(module, compiled)
        if coroutine is not None:

            async def main() -> None:
                with anyio.fail_after(60):
                    await coroutine

            anyio.run(main)
    finally:
        sys.modules.pop(module.__name__, None)
    return module


@pytest.mark.redis_server
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode == "run"], ids=lambda b: b.id)
def test_block_runs(block: Block, tmp_path: Path, redis_url: str) -> None:
    module = run(block, tmp_path, redis_url)
    if block.check is not None:
        check = CHECKS[block.check]
        anyio.run(check, module)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode == "compile"], ids=lambda b: b.id)
def test_block_compiles(block: Block) -> None:
    # It cannot run alone (the comment says why); it still has to be Python, and it is
    # type-checked with the others below.
    assert block.reason
    compile(for_type_checking(block.code), block.id, "exec")


def test_every_block_type_checks(tmp_path: Path) -> None:
    """mypy over every Python block, each a module of its own: names, attributes and calls of
    the library as the pages use them (not strict: the pages leave out annotations)."""
    files: list[Path] = []
    for n, block in enumerate(BLOCKS):
        if block.included is not None:
            # The file itself: mypy then names its module as the project's run does (a
            # package's relative imports resolve), whichever pages include it.
            if block.included not in files:
                files.append(block.included)
            continue
        path = tmp_path / f"block_{n}.py"
        path.write_text(f"# {block.id}\n{for_type_checking(block.code)}", encoding="utf-8")
        files.append(path)
    errors = mypy(tmp_path, files)
    assert errors == "", "\n" + errors


def mypy(folder: Path, files: list[Path]) -> str:
    """mypy's errors for `files`, with their blocks' names; '' if there are none."""
    config = folder / "mypy.ini"
    config.write_text(
        "[mypy]\ncheck_untyped_defs = True\nwarn_unused_ignores = True\n"
        "disable_error_code = top-level-await\n"
        # Untyped packages the examples use (as in pyproject.toml's overrides).
        "[mypy-fakeredis.*,django.*,celery.*]\nignore_missing_imports = True\n"
    )
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # this checkout's package, not an installed one
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            str(ROOT / ".mypy_cache" / "docs-blocks"),
            "--no-error-summary",
            "--hide-error-context",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    if out.returncode not in (0, 1) or (out.returncode == 1 and not out.stdout):
        raise AssertionError(f"mypy failed to run: {out.stderr or out.stdout}")
    # A block's file starts with a comment naming the block, for the message.
    names = {str(f): f.read_text().split("\n", 1)[0][2:] for f in files if f.parent == folder}
    lines = []
    for line in out.stdout.splitlines():
        file = line.split(":", 1)[0]
        lines.append(f"{names[file]}: {line}" if file in names else line)
    return "\n".join(lines)


def test_the_pages_hold_no_untested_python() -> None:
    """Every fence of every page is a known kind; Python ones are the blocks tested above."""
    for path in sources():
        collect(path)  # raises on an unknown language, directive or include
    pages = {b.path for b in BLOCKS}
    assert ROOT / "docs" / "getting-started.md" in pages
    assert ROOT / "README.md" in pages


# The collector itself: a broken block fails, and nothing is skipped silently.


def page(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(text)
    return path


def test_the_collector_finds_blocks_and_their_directives(tmp_path: Path) -> None:
    path = page(
        tmp_path,
        "Text\n\n```python\nx = 1\n```\n\n<!-- docs-test: run, check=stats -->\n"
        '```python\n--8<-- "examples/fastapi_app.py"\n```\n\n'
        "<!-- docs-test: compile (needs a cluster) -->\n```python\ny = 2\n```\n\n"
        "- item\n\n    ```console\n    pip install x\n    ```\n",
    )
    blocks = collect(path)
    assert [(b.line, b.language, b.mode, b.check) for b in blocks] == [
        (3, "python", "run", None),
        (8, "python", "run", "stats"),
        (13, "python", "compile", None),
        (19, "console", "run", None),
    ]
    assert blocks[0].code == "x = 1\n"
    assert blocks[1].included == ROOT / "examples" / "fastapi_app.py"
    assert "EventStreamResponse" in blocks[1].code
    assert blocks[2].reason == "needs a cluster"
    assert blocks[3].code == "pip install x\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- docs-test: compile -->\n```python\nx\n```\n", "must say why"),
        ("<!-- docs-test: skip (later) -->\n```python\nx\n```\n", "not understood"),
        ("```\nx\n```\n", "without a language"),
        ("```pyhton\nx\n```\n", "unknown language"),
        ('```python\n--8<-- "examples/none.py"\n```\n', "does not exist"),
        ("```python\nx = 1\n", "never closes"),
    ],
)
def test_the_collector_refuses_what_it_would_skip(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DocsBlockError, match=message):
        collect(page(tmp_path, text))


@pytest.mark.redis_server
def test_a_broken_block_fails_its_run(tmp_path: Path, redis_url: str) -> None:
    """What `test_block_runs` does to a block that raises, at top level or inside an awaited
    coroutine, and to a check that finds the app wrong."""
    (block,) = collect(page(tmp_path, "```python\nimport resumable_stream as rs\nrs.nope()\n```\n"))
    with pytest.raises(AttributeError, match="nope"):
        run(block, tmp_path, redis_url)
    awaiting = "```python\nimport anyio\nawait anyio.sleep(0)\nraise RuntimeError('late')\n```\n"
    (block,) = collect(page(tmp_path, awaiting))
    with pytest.raises(RuntimeError, match="late"):
        run(block, tmp_path, redis_url)
    wrong_app = BLOCKS_BY_CHECK["fastapi_chat"][0].code.replace("Here is the answer", "Nope")
    (block,) = collect(page(tmp_path, f"```python\n{wrong_app}```\n"))
    module = run(block, tmp_path, redis_url)
    with pytest.raises(BaseExceptionGroup) as raised:  # the driver's task groups wrap it
        anyio.run(CHECKS["fastapi_chat"], module)
    assert any(isinstance(e, AssertionError) for e in leaves(raised.value)), raised.value


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions in `error`, exception groups opened."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def test_a_broken_block_fails_type_checking(tmp_path: Path) -> None:
    bad = (
        "import resumable_stream as rs\n\nctx = rs.create_resumable_stream_context()\nctx.nope()\n"
    )
    path = tmp_path / "block_0.py"
    path.write_text(f"# page.md:1\n{bad}")
    assert '"ResumableStreamContext" has no attribute "nope"' in mypy(tmp_path, [path])


# Checks: what the pages say the apps do.


async def sse_text(app: Any, path: str, query: str = "", **headers: str) -> tuple[str, list[Any]]:
    async with serve(app) as client, client.request(path, query=query, headers=headers) as r:
        assert r.status == 200, r.status
        assert (r.header("content-type") or "").startswith("text/event-stream")
        with anyio.fail_after(STEP):
            events = await r.events()
        return "".join(e.data for e in events if e.event == "message"), events


async def check_fastapi_chat(module: ModuleType) -> None:
    """The Getting started app: a stream, then a reconnect from an event's id gets the rest."""
    stream_id = rs.new_stream_id()
    async with serve(module.app) as client:
        async with client.request(f"/chat/{stream_id}", query="prompt=hi") as r:
            assert r.status == 200
            with anyio.fail_after(STEP):
                events = await r.events()
        text = "".join(e.data for e in events if e.event == "message")
        assert text.startswith("You asked 'hi'. Here is the answer"), text
        middle = [e for e in events if e.data][2]
        async with client.request(f"/chat/{stream_id}", headers={"last-event-id": middle.id}) as r:
            assert r.status == 200  # the producer lingers with the tail
            with anyio.fail_after(STEP):
                rest = await r.events()
        assert "".join(e.data for e in rest if e.event == "message") == text[int(middle.id) :]


async def check_fastapi_chat_stop(module: ModuleType) -> None:
    """The FastAPI guide's app: the same, and its stop endpoint stops a stream from outside."""
    await check_fastapi_chat(module)
    stream_id = rs.new_stream_id()
    async with serve(module.app) as client:
        async with client.request(f"/chat/{stream_id}", query="prompt=hi") as r:
            with anyio.fail_after(STEP):
                assert await r.events(2)
            async with client.request(f"/stop/{stream_id}", method="POST") as stop:
                assert stop.status == 204
            with anyio.fail_after(STEP):
                events = await r.events()
        assert events[-1].event == "error"
        assert json.loads(events[-1].data)["code"] == "cancelled"


async def check_asgi_chat(module: ModuleType) -> None:
    """A framework example: GET /chat/<id>?prompt=hi streams an answer to its end."""
    text, events = await sse_text(module.app, f"/chat/{rs.new_stream_id()}", "prompt=hi")
    assert text
    assert events[-1].event == "message"


async def check_authorize(module: ModuleType) -> None:
    user = SimpleNamespace(id="u1")
    mine = module.new_stream_id_for("u1")
    assert module.authorize({"user": user}, mine) is True
    assert module.authorize({"user": user}, module.new_stream_id_for("u2")) is False


async def check_python_api(module: ModuleType) -> None:
    assert module.state in (True, "DONE")
    assert module.resolved == module.stream_id  # the alias, from the backend


async def check_sync_api(module: ModuleType) -> None:
    assert module.text == "Hello"
    assert module.state == "DONE"


async def check_sync_close(module: ModuleType) -> None:
    """The background jobs' sync context: the job's stream is done; then it is closed (the page
    leaves that to the interpreter's exit)."""
    try:
        assert module.streams.has_existing_stream(module.job_id) == "DONE"
    finally:
        await anyio.to_thread.run_sync(module.streams.close)


async def check_ai_sdk_chat(module: ModuleType) -> None:
    """The AI SDK page's app: a message streams as UI message chunks, then is not resumed."""
    chat = rs.new_stream_id()
    body = {"id": chat, "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
    async with serve(module.app) as client:
        request = client.request(
            "/api/chat",
            method="POST",
            body=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        async with request as r:
            assert r.status == 200
            assert r.header("x-vercel-ai-ui-message-stream") == "v1"
            with anyio.fail_after(STEP):
                frames = [e.data for e in await r.events()]
        assert frames[-1] == "[DONE]"
        chunks = [json.loads(f) for f in frames[:-1]]
        text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
        assert text == "You said hi, and here is the answer, word by word. "
        async with client.request(f"/api/chat/{chat}/stream") as r:
            assert r.status == 204


async def check_compat_raw(module: ModuleType) -> None:
    """The Next.js page's Python route: raw text, and from an offset (UTF-16 units)."""
    stream_id = rs.new_stream_id()
    async with serve(module.app) as client:
        async with client.request(f"/api/answer/{stream_id}", query="prompt=hi") as r:
            assert r.status == 200
            with anyio.fail_after(STEP):
                text = (await r.read()).decode()
        assert text.startswith("You asked 'hi'."), text
        async with client.request(f"/api/answer/{stream_id}", query="resumeAt=4") as r:
            assert r.status == 200
            with anyio.fail_after(STEP):
                assert (await r.read()).decode() == text[4:]


async def check_task_app(module: ModuleType) -> None:
    """The long task example: wait events, then one settle with the result."""
    body = json.dumps({"month": "2026-11"}).encode()
    async with (
        serve(module.app) as client,
        client.request("/tasks/report", method="POST", body=body) as r,
    ):
        assert r.status == 200
        task_id = r.header("x-task-id")
        with anyio.fail_after(STEP):
            events = await r.events()
    assert events[-1].event == "settle"
    assert json.loads(events[-1].data) == {"month": "2026-11", "total": 42, "task": task_id}
    assert {e.event for e in events[:-1]} <= {"wait", "message"}


async def check_stats(module: ModuleType) -> None:
    async with serve(module.app) as client, client.request("/health") as r:
        assert r.status == 200
        with anyio.fail_after(STEP):
            health = json.loads(await r.read())
    assert health["ok"] is True
    assert health["producers"] == 0


CHECKS: dict[str, Callable[[ModuleType], Awaitable[None]]] = {
    name.removeprefix("check_"): value
    for name, value in dict(globals()).items()
    if name.startswith("check_")
}


def _by_check() -> dict[str, list[Block]]:
    found: dict[str, list[Block]] = {}
    for block in BLOCKS:
        if block.check is not None:
            found.setdefault(block.check, []).append(block)
    return found


BLOCKS_BY_CHECK = _by_check()


def test_every_check_is_used_and_every_named_check_exists() -> None:
    assert set(BLOCKS_BY_CHECK) == set(CHECKS)
