"""The house: every evalab module imports alone in a fresh interpreter state, and the layers hold.

Rooms are the top-level entries of evalab/ (a subpackage is one room). Floors, bottom up (``FLOORS``): the ground
(_checks, _files, _moved, _shipped, _version), estimators, inputs, testing, measure, sweep, report, cli, and the
package face (evalab/__init__.py). No module imports a higher floor at module level (an import inside a function
may reach up: the command line loads its machinery lazily), and the module-level import graph has no circle.

Run as a script, ``python tests/test_imports.py [REPO]`` prints the house's measures for the checkout at REPO:
rooms, floors (the longest chain of room-to-room imports), arrows (distinct room-to-room imports), circles and
arrows back up (imports against the floor order), module-level and with the imports inside functions too.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = (("_checks", "_files", "_moved", "_shipped", "_version"), ("estimators",), ("inputs",), ("testing",), ("measure",), ("sweep",),
          ("report",), ("cli", "__main__"), ("__init__",))
#: modules from before the layered layout -> their room today (their floor, to measure an old checkout)
OLD_ROOMS = {**{name: "measure" for name in ("monte_carlo", "attribution", "gradient_gap", "model_gap", "theory",
                                             "cost", "intervals")},
             **{name: "report" for name in ("figures", "reproduce", "bench", "widgets")}, "registry": "estimators"}


def modules(repo: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the evalab package at ``repo``."""
    out = {}
    for path in sorted((repo / "evalab").rglob("*.py")):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _statements(body: list, lazy: bool):
    """The import statements run when the module loads (``lazy``: also those inside functions); the body of an
    ``if TYPE_CHECKING:`` never runs."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if lazy:
                yield from _statements(node.body, lazy)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _statements(inner, lazy)


def imports(repo: Path, *, lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the evalab modules it imports (module level only unless ``lazy``). ``from pkg import name`` is
    an import of ``pkg.name`` when that is a module, else of ``pkg``."""
    known = modules(repo)
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _statements(ast.parse(path.read_text()).body, lazy):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
                names = [None]
            else:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                base = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                bases, names = [base], [alias.name for alias in node.names]
            for base in bases:
                for item in names:
                    target = f"{base}.{item}" if item and f"{base}.{item}" in known else base
                    while target not in known and "." in target:
                        target = target.rpartition(".")[0]
                    if target in known and target != name:
                        targets.add(target)
        graph[name] = targets
    return graph


def third_party(repo: Path) -> list[str]:
    """The libraries outside evalab and the standard library that evalab modules import at module level."""
    out = set()
    for path in modules(repo).values():
        for node in _statements(ast.parse(path.read_text()).body, lazy=False):
            bases = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] * (node.level == 0)
            out.update(b for b in bases if b.split(".")[0] not in sys.stdlib_module_names and b.split(".")[0] != "evalab")
    return sorted(out)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor(room_name: str) -> int:
    room_name = OLD_ROOMS.get(room_name, room_name)
    for level, names in enumerate(FLOORS):
        if room_name in names:
            return level
    raise KeyError(f"room {room_name!r} has no floor in FLOORS")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(1000, 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(room(a), set()).update(room(b) for b in targets if room(b) != room(a))
    return out


def storeys(rooms: dict[str, set[str]]) -> int:
    """The number of floors the room graph needs: its longest chain of imports (circles contracted), plus one."""
    component = {}
    for i, members in enumerate(circles(rooms)):
        component.update({m: f"circle{i}" for m in members})
    dag: dict[str, set[str]] = {}
    for a, targets in rooms.items():
        dag.setdefault(component.get(a, a), set()).update(component.get(b, b) for b in targets)
    for a in dag:
        dag[a].discard(a)
    depth: dict[str, int] = {}

    def height(v):
        if v not in depth:
            depth[v] = 1 + max((height(w) for w in dag.get(v, ())), default=0)
        return depth[v]

    return max(height(v) for v in dag)


def back_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Module imports that reach a higher floor."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if floor(room(b)) > floor(room(a)))


def measure(repo: Path) -> dict:
    out = {}
    for scope, lazy in (("module level", False), ("with lazy imports", True)):
        graph = imports(repo, lazy=lazy)
        rooms = room_graph(graph)
        out[scope] = {
            "rooms": len(rooms), "floors": storeys(rooms), "arrows": sum(map(len, rooms.values())),
            "room circles": len(circles(rooms)), "module circles": len(circles(graph)),
            "arrows back up": len({(room(a), room(b)) for a, b in back_arrows(graph)}),
        }
    return out


# --- tests ------------------------------------------------------------------------------------------------


def test_no_module_imports_a_higher_floor_at_module_level():
    graph = imports(ROOT)
    assert {room(m) for m in graph} <= {r for names in FLOORS for r in names}, "a room without a floor"
    assert back_arrows(graph) == []


def test_no_import_circles():
    graph = imports(ROOT)
    assert circles(graph) == []
    assert circles(room_graph(graph)) == []


def test_the_graph_sees_imports():
    """The analysis itself: it finds known arrows, and a circle and a back arrow when there is one."""
    graph = imports(ROOT)
    assert "evalab.estimators.draw" in graph["evalab.estimators.rfa"]
    assert "evalab._checks" in graph["evalab.estimators.rfa"]
    assert "evalab.sweep.runner" in graph["evalab.sweep"]
    assert "evalab.testing" in imports(ROOT, lazy=True)["evalab.cli"] and "evalab.testing" not in graph["evalab.cli"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert back_arrows({"evalab.estimators.rfa": {"evalab.measure.monte_carlo"}}) == [
        ("evalab.estimators.rfa", "evalab.measure.monte_carlo")]


def test_every_module_imports_alone_in_a_fresh_interpreter_state():
    """One process imports the third-party libraries, then forks a child per evalab module; each child starts
    with no evalab module loaded and imports only that one (so a module that works only after another has
    been imported fails here)."""
    names = sorted(name for name in modules(ROOT) if name != "evalab.__main__")
    script = textwrap.dedent("""
        import os, sys, traceback
        for library in os.environ["EVALAB_LIBRARIES"].split():  # shared by every child, loaded once
            try:
                __import__(library)
            except ImportError:  # e.g. tomli, imported on Python 3.10 only: the child imports what it needs
                pass
        assert not any(m == "evalab" or m.startswith("evalab.") for m in sys.modules)
        failed = 0
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    __import__(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status:
                failed += 1
                print(f"FAILED: import {name}", file=sys.stderr, flush=True)
        sys.exit(1 if failed else 0)
    """)
    env = {**os.environ, "EVALAB_LIBRARIES": " ".join(third_party(ROOT)), "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(names) > 40


if __name__ == "__main__":
    repo = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for scope, numbers in measure(repo).items():
        print(f"{scope:<18} " + ", ".join(f"{key} {value}" for key, value in numbers.items()))
    for a, b in back_arrows(imports(repo)):
        print(f"  back up: {a} -> {b}")
    for component in circles(imports(repo)):
        print(f"  circle: {' -> '.join(component)}")
