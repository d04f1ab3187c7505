"""Headless Chromium for the browser tests: Debian's binary, driven by Playwright."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .machine import missing

CHROMIUM = os.environ.get("RESUMABLE_STREAM_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling out, which this machine's
# closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A launched browser; without Chromium the test is skipped, or fails if all is required."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing("the browser tests need playwright (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        missing(
            f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium, or set "
            "RESUMABLE_STREAM_CHROMIUM)"
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()
