"""The example's `create_app` around a test model, for the AI SDK client tests under uvicorn.

The model answers `tokens(prompt)`, one every `RS_TEST_TOKEN_DELAY` seconds; a prompt starting
with `fail` raises after two tokens, with `SECRET` in its message; one starting with `pause`
waits `PAUSE` seconds first. Chat ids starting with
`denied` are refused (`authorize`). The library's log goes to
the file `RS_TEST_LOG` (not stderr, where a traceback would fail the test), so a test can check
that the exception's details reached the log and nothing else.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio

# Imported by name: mypy checks examples/ as files of their own, not as a package.
example = importlib.import_module("examples.ai_sdk_chat")

DELAY = float(os.environ.get("RS_TEST_TOKEN_DELAY", "0.02"))
PAUSE = 0.3
SECRET = "sk-secret-4f2a"  # what a provider's error may carry: it must never reach a client

TEXT = (
    "Here is a simulated answer, one token at a time, with Ünïcödé, emoji 😀, a line\nbreak, "
    '"quotes", a backslash \\ and data: lookalikes, so the JSON framing is put to work.'
)


def tokens(prompt: str) -> list[str]:
    return re.findall(r"\S+\s*", f"You said {prompt!r}. {TEXT}")


async def model(messages: list[dict[str, Any]]) -> AsyncIterator[str]:
    prompt = example.last_user_text(messages)
    if prompt.startswith("pause"):
        await anyio.sleep(PAUSE)  # thinking: the response is idle, keep-alives go out
    for index, token in enumerate(tokens(prompt)):
        if prompt.startswith("fail") and index == 2:
            raise RuntimeError(f"the provider refused the key {SECRET}")
        await anyio.sleep(DELAY)
        yield token


if os.environ.get("RS_TEST_LOG"):
    handler = logging.FileHandler(os.environ["RS_TEST_LOG"])
    library_log = logging.getLogger("resumable_stream")
    library_log.addHandler(handler)
    library_log.propagate = False


def authorize(request: object, chat_id: str) -> bool:
    return not chat_id.startswith("denied")


app = example.create_app(model, authorize=authorize)
