"""The documentation site: it builds with `--strict`, its API reference lists every public name,
and its Mermaid diagrams render in Chromium from the site's own copy of Mermaid, with no network.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

import resumable_stream as rs

from .browser import chromium
from .conftest import npm_ci

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
MERMAID = ROOT / "docs" / "assets" / "javascripts" / "mermaid.min.js"
MERMAID_PACKAGE = Path(__file__).parent / "mermaid"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Playwright runs on asyncio


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as CI builds it: any warning (a broken link, a missing reference) fails."""
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # (Material's banner about MkDocs 2)
    )
    assert build.returncode == 0, build.stderr
    return out


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site over HTTP on a free loopback port, as `mkdocs serve` would serve it."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_the_api_reference_lists_every_public_name(site: Path) -> None:
    page = (site / "reference" / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="(resumable_stream\.[A-Za-z_]+)"', page))
    missing = {f"resumable_stream.{name}" for name in rs.__all__} - anchors
    assert not missing, sorted(missing)


def test_the_site_has_the_pages_the_issue_asks_for(site: Path) -> None:
    for page in [
        "getting-started",
        "concepts/streams",
        "concepts/offsets",
        "concepts/endings",
        "concepts/durable",
        "guides/fastapi",
        "guides/asgi",
        "guides/django",
        "guides/quart",
        "guides/falcon",
        "guides/ai-sdk",
        "guides/nextjs",
        "guides/long-tasks",
        "guides/background-jobs",
        "guides/clients",
        "operations/redis",
        "operations/cluster",
        "operations/telemetry",
        "operations/logs-and-health",
        "operations/deploying",
        "benchmarks",
        "reference/api",
        "changelog",
    ]:
        assert (site / page / "index.html").is_file(), page
    changelog = (site / "changelog" / "index.html").read_text()
    assert "Unreleased" in changelog  # CHANGELOG.md, included
    for chart in ("versus-node", "capacity", "writers", "durable"):
        assert (site / "assets" / "charts" / f"{chart}.svg").is_file(), chart


def test_the_mermaid_copy_is_the_pinned_package() -> None:
    """docs/assets/javascripts/mermaid.min.js is the file of the npm package pinned in
    tests/mermaid (installed here with `npm ci`), not an edited or unknown build."""
    folder = npm_ci(MERMAID_PACKAGE, "the Mermaid copy's check")
    pinned = folder / "node_modules" / "mermaid" / "dist" / "mermaid.min.js"
    assert MERMAID.read_bytes() == pinned.read_bytes()


# Material renders a diagram into a *closed* shadow root, out of reach of the page's scripts and
# of Playwright's selectors; this runs before the page's own scripts and opens it, so that the
# test can see the SVG inside. Nothing else on the page changes.
OPEN_SHADOW_ROOTS = """
const attach = Element.prototype.attachShadow;
Element.prototype.attachShadow = function (init) {
  return attach.call(this, { ...init, mode: "open" });
};
"""


@pytest.mark.parametrize(
    ("page", "participants"),
    [
        ("concepts/streams/", ["Context A (request 1)", "Follower (worker B)", "Producer"]),
        ("concepts/durable/", ["Follower (worker B)", "Redis", "Producer (worker A)"]),
        ("getting-started/", ["Browser (EventSource)", "Worker A", "Worker B"]),
    ],
)
async def test_the_diagrams_render_with_no_network(
    served: str, site: Path, page: str, participants: list[str]
) -> None:
    """Each Mermaid block of the page becomes an SVG holding its participants, drawn by the
    site's copy of Mermaid: a request for anything off this machine fails the test."""
    source = (site / page / "index.html").read_text()
    blocks = source.count('<pre class="mermaid">')
    assert blocks > 0, page
    external: list[str] = []
    errors: list[str] = []
    async with chromium() as browser:
        context = await browser.new_context()
        await context.add_init_script(OPEN_SHADOW_ROOTS)

        async def local_only(route: Any) -> None:
            if route.request.url.startswith(served):
                await route.continue_()
            else:
                external.append(route.request.url)
                await route.abort()

        await context.route("**/*", local_only)
        tab = await context.new_page()
        tab.on("pageerror", lambda error: errors.append(str(error)))
        await tab.goto(f"{served}/{page}")
        svgs = tab.locator("div.mermaid svg")
        # Bounded: Playwright's own timeout on the wait (rendering takes well under a second).
        await svgs.nth(blocks - 1).wait_for(state="attached", timeout=20_000)
        assert await svgs.count() == blocks
        assert await tab.locator('pre.mermaid, pre[class="mermaid"]').count() == 0
        drawn = " ".join(await svgs.all_text_contents())
        await context.close()
    for participant in participants:
        assert participant in drawn, participant
    assert not errors, errors
    assert not external, external


def test_the_charts_are_drawn_from_the_recorded_results(tmp_path: Path) -> None:
    """benchmarks/charts.py draws every chart the Benchmarks page shows from the results files,
    and the page shows every chart it draws."""
    charts = _charts_module()
    assert charts.main(["--out", str(tmp_path)]) == 0
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for chart in charts.CHARTS:
        svg = (tmp_path / f"{chart.name}.svg").read_text()
        ElementTree.fromstring(svg)  # a whole SVG document
        assert f"(assets/charts/{chart.name}.svg)" in page, chart.name
        assert (ROOT / "docs" / "assets" / "charts" / f"{chart.name}.svg").is_file(), chart.name
    # The figures are the recorded ones: the Node comparison's ratios, say.
    versus = (tmp_path / "versus-node.svg").read_text()
    data = json.loads((ROOT / "benchmarks" / "results" / "compare.json").read_text())
    for figure, ratio in charts.versus_node(data):
        assert f"{ratio:.2f}x" in versus, figure


def _charts_module() -> Any:
    spec = importlib.util.spec_from_file_location("charts", ROOT / "benchmarks" / "charts.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["charts"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["charts"]
    return module
