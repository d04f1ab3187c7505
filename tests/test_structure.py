"""The package's shape, as the engine redesign left it: dependencies point one way (no import
circle), and no module imports another's underscore names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "resumable_stream"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names) for every import of the package's own modules, wherever it is:
    at the top, under `if TYPE_CHECKING:`, inside a function (a lazy import is a dependency
    too, and an import circle through one is still a circle)."""
    name = _module_name(path)
    return _imports_in(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")


def _imports_in(source: str, name: str, is_package: bool) -> list[tuple[str, list[str]]]:
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
            names = [alias.name for alias in node.names]
            if node.module is None:  # from . import x: each x is a module
                found.extend((f"{target}.{n}", []) for n in names)
            else:
                found.append((target, names))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "resumable_stream"
        ):
            found.append((node.module or "", [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend(
                (alias.name, [])
                for alias in node.names
                if alias.name.startswith("resumable_stream")
            )
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for target, names in _imports(path):
            # `from . import x` names a module x, or a name of the package's `__init__`.
            if target not in modules and target.rpartition(".")[0] in modules:
                target = target.rpartition(".")[0]
            # `from .pkg import name`: the package's `__init__`, and its module `name` if any.
            targets.add(target)
            targets.update(f"{target}.{n}" for n in names if f"{target}.{n}" in modules)
        graph[name] = {t for t in targets if t in modules} - {name}
    return graph


def test_no_import_circle() -> None:
    graph = _graph()
    assert "resumable_stream._context" in graph  # the walk found the engine
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)


def test_every_kind_of_import_counts() -> None:
    source = """
from typing import TYPE_CHECKING
from . import _a
if TYPE_CHECKING:
    from .b import B
def f():
    from ._c import C
    import resumable_stream.d
try:
    from .e import E
except ImportError:
    pass
"""
    found = {target for target, _ in _imports_in(source, "resumable_stream.m", False)}
    assert found == {
        "resumable_stream._a",
        "resumable_stream.b",
        "resumable_stream._c",
        "resumable_stream.d",
        "resumable_stream.e",
    }
    # The package's own lazy import, as the walk sees it.
    assert "resumable_stream._otel" in _graph()["resumable_stream._telemetry_setup"]


def test_the_engine_depends_one_way() -> None:
    graph = _graph()
    engine = "resumable_stream."
    # Producers and followers see their context only through the hub.
    for module in ("_producer", "_follower", "_store", "_hub", "_reader", "_buffer"):
        assert f"{engine}_context" not in graph[f"{engine}{module}"], module
    assert f"{engine}_producer" not in graph[f"{engine}_follower"]
    # The protocol and the backend know nothing of the streams that use them.
    for module in ("_protocol", "_backend", "_options", "_event", "_exceptions"):
        assert not graph[f"{engine}{module}"] & {
            f"{engine}{m}" for m in ("_context", "_producer", "_follower", "_hub", "_store")
        }, module


def test_no_module_imports_another_modules_underscore_names() -> None:
    offenders = [
        f"{_module_name(path)} imports {name} from {target}"
        for path in PACKAGE.rglob("*.py")
        for target, names in _imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert offenders == []
