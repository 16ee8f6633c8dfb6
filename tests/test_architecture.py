"""The layout ARCHITECTURE.md describes, checked: no import circle, a core that imports no I/O,
formats that need nothing from the runtime, and a sync driver generated from the async one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "metrion_fixture"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it: top level, inside functions, under TYPE_CHECKING."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {other for other in imports_of(path) if other in modules and other != name}
        for name, path in modules.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_among_the_package_modules() -> None:
    edges = graph()
    assert len(edges) > 40  # the walk found the package
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_no_io_and_nothing_outside_core_and_formats() -> None:
    allowed_prefixes = ("metrion_fixture.core", "metrion_fixture.formats", "metrion_fixture.errors")
    io_modules = {"httpx", "httpx2", "aiohttp", "grpc", "redis", "sqlite3", "socket", "asyncio", "select", "os"}
    for path in (PACKAGE / "core").glob("*.py"):
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if imported.startswith("metrion_fixture"):
                assert imported.startswith(allowed_prefixes), f"{path.name} imports {imported}"
            assert top not in io_modules, f"{path.name} imports {imported}"


def test_formats_need_nothing_from_the_runtime_or_the_integrations() -> None:
    for path in (PACKAGE / "formats").glob("*.py"):
        for imported in imports_of(path):
            if imported.startswith("metrion_fixture."):
                assert imported.startswith(("metrion_fixture.formats", "metrion_fixture.core.records")), (
                    f"{path.name} imports {imported}"
                )


def test_the_simulated_provider_is_independent_of_the_formats() -> None:
    # The conversion tests compare the cache's formats with the provider's answers: they must not share code.
    for imported in imports_of(PACKAGE / "testing" / "provider.py"):
        assert not imported.startswith("metrion_fixture."), imported


def test_the_sync_driver_is_generated_from_the_async_one() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "unasync.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
