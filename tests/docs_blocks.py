"""The code blocks of the documentation: collected from the Markdown, run, and type-checked.

`collect(path)` finds every fenced block of a Markdown file. A Python block (```` ```python ````)
is run as it stands, unless the HTML comment on the line before it (which the site does not show)
says otherwise:

    <!-- docs-test: run -->                 run it (the default)
    <!-- docs-test: run, check=NAME -->     run it, then the test's check NAME on what it made
    <!-- docs-test: compile (why) -->       compile and type-check it only; the reason is required

A block that includes a file (`--8<-- "examples/x.py"`, pymdownx.snippets, relative to the
repository's root as in mkdocs.yml) is that file's text. A directive this module does not know,
and a compile-only block without its reason, are errors: a block is never skipped silently.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# The kinds of fenced block the documentation may hold besides Python: shown, not run (shell
# sessions, other languages, wire examples, diagrams). Anything else is an error, so that no
# Python hides under another name.
OTHER_LANGUAGES = frozenset({"console", "text", "js", "ts", "tsx", "mermaid", "toml", "yaml"})
PYTHON = frozenset({"python", "py", "python3", "pycon"})

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")
_SPEC = re.compile(
    r"^\s*(?P<mode>run|compile)\s*(?:,\s*check=(?P<check>\w+))?\s*(?:\((?P<why>.+)\))?\s*$"
)
_SNIPPET = re.compile(r'^\s*--8<--\s+"(?P<path>[^"]+)"\s*$')


class DocsBlockError(ValueError):
    """A block the collector cannot take as it stands (a bad directive, a missing file)."""


@dataclass(frozen=True)
class Block:
    path: Path  # the Markdown file
    line: int  # the line of its opening fence (1-based)
    language: str
    code: str
    mode: str = "run"  # "run" or "compile"
    check: str | None = None
    reason: str | None = None
    included: Path | None = None  # the file a snippet line stands for

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def is_python(self) -> bool:
        return self.language in PYTHON


def sources() -> list[Path]:
    """Every Markdown file whose blocks are tested: the site's pages and the README."""
    return [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


def collect(path: Path) -> list[Block]:
    """Every fenced block of `path`, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip()
        language = info.split()[0].lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        else:
            raise DocsBlockError(f"{path}:{i + 1}: a fence that never closes")
        blocks.append(_block(path, i + 1, language, body, _directive(lines, i)))
        i = j + 1
    return blocks


def _directive(lines: list[str], fence_index: int) -> str | None:
    """The docs-test comment on the line before the fence, if any."""
    if fence_index == 0:
        return None
    match = _DIRECTIVE.match(lines[fence_index - 1])
    return None if match is None else match["body"]


def _block(path: Path, line: int, language: str, body: list[str], directive: str | None) -> Block:
    where = f"{path}:{line}"
    if not language:
        raise DocsBlockError(f"{where}: a fence without a language")
    if language not in PYTHON:
        if language not in OTHER_LANGUAGES:
            raise DocsBlockError(f"{where}: a block of an unknown language {language!r}")
        if directive is not None:
            raise DocsBlockError(f"{where}: a docs-test directive on a {language} block")
        return Block(path, line, language, "\n".join(body) + "\n")
    mode, check, reason = "run", None, None
    if directive is not None:
        spec = _SPEC.match(directive)
        if spec is None:
            raise DocsBlockError(f"{where}: a docs-test directive not understood: {directive!r}")
        mode, check, reason = spec["mode"], spec["check"], spec["why"]
        if mode == "compile" and not reason:
            raise DocsBlockError(f"{where}: a compile-only block must say why it cannot run")
        if mode == "compile" and check:
            raise DocsBlockError(f"{where}: a compile-only block has nothing to check")
    included = None
    if len(body) == 1 and (snippet := _SNIPPET.match(body[0])):
        included = ROOT / snippet["path"]
        if not included.is_file():
            raise DocsBlockError(f"{where}: includes {snippet['path']}, which does not exist")
        code = included.read_text(encoding="utf-8")
    else:
        if any(_SNIPPET.match(text) for text in body):
            raise DocsBlockError(f"{where}: a snippet line among other lines")
        code = "\n".join(body) + "\n"
    return Block(path, line, language, code, mode, check, reason, included)


def python_blocks() -> list[Block]:
    return [block for path in sources() for block in collect(path) if block.is_python]


def has_top_level_await(code: str, filename: str = "<block>") -> bool:
    compiled = compile(code, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return bool(compiled.co_flags & inspect.CO_COROUTINE)


def for_type_checking(code: str) -> str:
    """The block as a module mypy takes: top-level `await`, `async with` and `async for` go into
    a coroutine function (mypy refuses them at module level), `__future__` imports stay first."""
    if not has_top_level_await(code):
        return code
    lines = code.splitlines()
    future = [line for line in lines if line.startswith("from __future__ import")]
    rest = [line for line in lines if not line.startswith("from __future__ import")]
    body = textwrap.indent("\n".join(rest), "    ")
    return "\n".join([*future, "async def __block__() -> None:", body, ""])


def load(block: Block, code: str, file: Path, name: str) -> tuple[types.ModuleType, Any]:
    """Compile `code` (the block, perhaps with its Redis URL replaced) as module `name` whose
    source is `file` (tracebacks show its lines), registered in `sys.modules` while it runs, as
    frameworks that look their app's module up expect; returns the module and its code."""
    file.write_text(code, encoding="utf-8")
    compiled = compile(code, str(file), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    module = types.ModuleType(name)
    module.__file__ = str(file)
    return module, compiled


def execute(module: types.ModuleType, compiled: Any) -> Any:
    """Run the module's code: None, or for a block with top-level `await` the coroutine to
    await (its names land in the module either way)."""
    sys.modules[module.__name__] = module
    result = eval(compiled, module.__dict__)  # an exec that hands back a top-level coroutine
    return result if inspect.iscoroutine(result) else None
