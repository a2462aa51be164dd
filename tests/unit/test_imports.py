"""The package's import structure: no module imports another that (directly or not) imports it
back, and the background parts of the shell load without the mitmproxy addon."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "addon" / "kmi_rotor"
ROOT = "kmi_rotor"


def module_name(path: Path) -> str:
    parts = [ROOT, *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported(path: Path, known: set[str]) -> set[str]:
    """The package's modules `path` imports: every import statement, wherever it is (inside a
    function, under TYPE_CHECKING: a cycle of types is a cycle of ideas all the same)."""
    here = module_name(path)
    base = here if is_package(path) else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # `from . import module`
    # A module's own packages are imported before it, whatever it says: not an edge.
    ancestors = {here.rsplit(".", n)[0] for n in range(1, here.count(".") + 1)}
    return {m for m in out if m in known and m != here and m not in ancestors}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported(f, known) for f in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (or a module importing itself),
    by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges.get(v, ()):
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_package() -> None:
    """The check below is only worth something if the graph holds the real imports."""
    g = graph()
    assert "kmi_rotor.addon" in g and "kmi_rotor.core.limiter" in g
    assert "kmi_rotor.engine" in g["kmi_rotor.addon"]
    assert "kmi_rotor.core.limiter" in g["kmi_rotor.engine"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert found == [], "modules that import each other: " + "; ".join(
        " <-> ".join(group) for group in found
    )


def test_no_part_of_the_shell_imports_the_addon() -> None:
    """The addon is assembled from parts that are given what they need: none reaches back."""
    assert sorted(m for m, deps in graph().items() if "kmi_rotor.addon" in deps) == []


def test_the_core_imports_nothing_of_the_shell() -> None:
    g = graph()
    reach = {
        m: sorted(d for d in deps if not d.startswith("kmi_rotor.core")) for m, deps in g.items()
    }
    outside = {m: deps for m, deps in reach.items() if m.startswith("kmi_rotor.core.") and deps}
    assert outside == {}


@pytest.mark.parametrize("module", ["kmi_rotor.failover", "kmi_rotor.usage_poller"])
def test_loads_without_the_addon(module: str) -> None:
    """A fresh interpreter: importing the module brings in neither the addon nor anything that
    needs it."""
    code = (
        "import json, sys, importlib\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kmi_rotor'))))\n"
    )
    loaded = _fresh_interpreter(code)
    assert module in loaded
    assert "kmi_rotor.addon" not in loaded


def test_nothing_the_proxy_loads_installs_an_audit_hook() -> None:
    """A Python audit hook runs on every audited call in the process (`id()`, sockets...),
    mitmproxy's included: about 45 per request. filelock 3.30 and later install one, hence the
    pin; this finds any module the proxy loads that calls `sys.addaudithook`."""
    code = (
        "import json, sys\n"
        "import kmi_rotor.addon, kmi_rotor.store, kmi_rotor.cluster.state\n"
        "import mitmproxy.tools.main, mitmproxy.tools.dump\n"
        "hits = []\n"
        "for name, m in list(sys.modules.items()):\n"
        "    f = getattr(m, '__file__', None) or ''\n"
        "    if f.endswith('.py'):\n"
        "        with open(f, encoding='utf-8', errors='replace') as fh:\n"
        "            if 'addaudithook(' in fh.read():\n"
        "                hits.append(name)\n"
        "print(json.dumps([len(sys.modules), sorted(hits)]))\n"
    )
    loaded, hits = _fresh_interpreter(code)
    assert loaded > 200  # the addon, mitmproxy and their dependencies were read
    assert hits == []


def _fresh_interpreter(code: str) -> Any:
    """What `code`, run in a fresh interpreter with the package on its path, prints last (as
    JSON)."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PACKAGE.parent,
        env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
