"""The dependency direction, read from the source: engine -> kernels -> codegen, and inside engine
compare -> app -> modes -> {evolution, fitness} -> {exec, tasks} -> rundir.

Every import counts, at the top of a module or inside a function (a function-level import is
still a dependency, only a later one); an import under `if TYPE_CHECKING:` does not, since it
never runs. `compare` sits on top, beside the run's own CLI rather than under it: it is a second
application (tune and compare optimizers) that reuses app's command-line conventions
(engine.app.cli) and reads run directories, while nothing in app needs it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("codegen", "kernels", "engine")
# engine's layers, top first. Subpackages in one layer are peers: neither imports the other.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"run", "show", "api"}),  # the `python -m engine.run|show` shims, engine.search()
    frozenset({"compare"}),
    frozenset({"app"}),
    frozenset({"modes"}),
    frozenset({"evolution", "fitness"}),
    frozenset({"exec", "tasks"}),
    frozenset({"rundir"}),
)
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}
OUTER = {"engine": 0, "kernels": 1, "codegen": 2}  # a package imports only those ranked after it

Graph = dict[str, set[tuple[str, int]]]  # module -> {(imported module, line)}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]):
    """(imported module, line) for every import that runs, at any depth but TYPE_CHECKING's."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (i for child in node.orelse for i in _imports(child, module, is_package,
                                                                     known))
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[:len(here) - node.level + 1]
                base = ".".join(here + ([base] if base else []))
            for alias in node.names:
                # `from engine import modes` imports the module engine.modes.
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno
        yield from _imports(node, module, is_package, known)


def import_graph(root: Path) -> Graph:
    """Every module of codegen/, kernels/ and engine/ under `root`, with what it imports from
    those three packages."""
    files = [p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))]
    known = {module_name(p, root) for p in files}
    graph: Graph = {}
    for path in files:
        name = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = {(target, line) for target, line in
                       _imports(tree, name, path.name == "__init__.py", known)
                       if target.split(".")[0] in PACKAGES}
    return graph


def _part(module: str) -> str:
    """engine's subpackage (or top-level module) that `module` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(graph: Graph) -> list[str]:
    """Each import that goes against the direction, as 'importer:line -> imported (why)'."""
    found = []
    for module, targets in sorted(graph.items()):
        for target, line in sorted(targets):
            outer, inner = module.split(".")[0], target.split(".")[0]
            where = f"{module}:{line} -> {target}"
            if OUTER[inner] < OUTER[outer]:
                found.append(f"{where} ({outer} must not import {inner})")
            if outer != "engine" or inner != "engine":
                continue
            a, b = _part(module), _part(target)
            if a == b or not b:
                continue  # inside one subpackage, or the bare `engine` package
            if not a:  # the bare package forwards `engine.search` to the API, and nothing else
                if b != "api":
                    found.append(f"{where} (engine/__init__.py imports only engine.api)")
                continue
            for part in (a, b):
                if part not in RANK:
                    found.append(f"{where} (engine.{part} has no layer: add it to LAYERS in "
                                 "tests/test_layout.py and to docs/architecture.md)")
            if a in RANK and b in RANK and RANK[a] >= RANK[b]:
                kind = "a peer" if RANK[a] == RANK[b] else "a higher layer"
                found.append(f"{where} (engine.{a} imports {kind}, engine.{b})")
    return found


def cycles(graph: Graph) -> list[list[str]]:
    """Circles between engine's subpackages (each as the path that closes it)."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module.startswith("engine."):
            for target, _ in targets:
                if target.startswith("engine.") and _part(target) != _part(module):
                    edges.setdefault(_part(module), set()).add(_part(target))
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [node, nxt] if nxt in path else
                             [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


# -- the tree as it is ---------------------------------------------------------------------------

def test_the_code_follows_the_dependency_direction():
    graph = import_graph(ROOT)
    assert len(graph) > 50 and "engine.fitness.evaluator" in graph  # the walk found the tree
    assert violations(graph) == []
    assert cycles(graph) == []


def test_every_engine_subpackage_has_a_layer():
    parts = {p.name for p in (ROOT / "engine").iterdir()
             if (p / "__init__.py").exists()} | \
        {p.stem for p in (ROOT / "engine").glob("*.py") if p.stem != "__init__"}
    assert parts == set(RANK)


# -- the checker catches what it is for ----------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.name != "engine" and path.parent != tmp_path:
            (path.parent / "__init__.py").touch()
        path.write_text(text)
    return tmp_path


def test_a_planted_upward_import_inside_a_function_is_caught(tmp_path):
    root = _tree(tmp_path, {
        "engine/rundir.py": "def f():\n    from engine.app import session\n",
        "engine/app/session.py": "from engine import rundir\n",
        "engine/tasks/data.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "    from engine.modes import Mode\n",
        "engine/modes/__init__.py": "from . import export\n",
        "engine/modes/export.py": "",
    })
    graph = import_graph(root)
    assert ("engine.app.session", 2) in graph["engine.rundir"]
    assert graph["engine.tasks.data"] == set()  # TYPE_CHECKING-only: never runs
    assert ("engine.modes.export", 1) in graph["engine.modes"]  # a relative import resolves
    assert violations(graph) == ["engine.rundir:2 -> engine.app.session (engine.rundir imports "
                                 "a higher layer, engine.app)"]
    assert cycles(graph) == [["app", "rundir", "app"]]


@pytest.mark.parametrize("importer, imported, why", [
    ("kernels.zoo", "engine.modes", "kernels must not import engine"),
    ("codegen.ir", "kernels.runtime", "codegen must not import kernels"),
    ("engine.evolution.seeds", "engine.fitness.store", "imports a peer, engine.fitness"),
    ("engine.fitness.evaluator", "engine.modes", "imports a higher layer, engine.modes"),
    ("engine.tasks.data", "engine.widgets.x", "engine.widgets has no layer"),
])
def test_each_kind_of_wrong_import_is_named(importer, imported, why):
    graph = import_graph(ROOT)
    graph.setdefault(importer, set()).add((imported, 1))
    found = violations(graph)
    assert len(found) >= 1 and all(f.startswith(f"{importer}:1 -> {imported}") for f in found)
    assert any(why in f for f in found), found


# -- the docs name the tree as it is -------------------------------------------------------------

_PATH = re.compile(r"(?<![\w/.-])((?:codegen|kernels|engine|bench|tests|docs)(?:/[\w.-]+)*/?)")


def named_paths(text: str) -> set[str]:
    """Every repository path a document names (`engine/app/session.py`, `codegen/backends/`)."""
    return {m.rstrip(".") for m in _PATH.findall(text)}


def _readme_layout() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Layout\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


@pytest.mark.parametrize("where", ["docs/architecture.md", "README.md's Layout"])
def test_every_path_the_docs_name_exists(where):
    text = _readme_layout() if where.startswith("README") else (ROOT / where).read_text()
    paths = named_paths(text)
    assert len(paths) > 10, paths  # the pattern still finds them
    # A placeholder (`engine/exec/NAME.py`, a file to add) names an existing folder.
    missing = [p for p in paths if not (ROOT / p).exists() and not
               ("NAME" in Path(p).name and (ROOT / p).parent.is_dir())]
    assert sorted(missing) == []


def test_architecture_names_every_engine_module():
    named = named_paths((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "engine").rglob("*.py")}
    assert sorted(modules - named) == []


def test_the_path_check_catches_a_stale_name():
    paths = named_paths("`engine/exec/executors.py` and engine/app/session.py, then docs/.")
    assert paths == {"engine/exec/executors.py", "engine/app/session.py", "docs/"}
    assert not (ROOT / "engine/exec/executors.py").exists()


# Known exceptions, each with why (none today): add an entry only with the reason beside it.
LONG_MODULES_ALLOWED: set[str] = set()
LONG_FUNCTIONS_ALLOWED: set[str] = set()


def _source_files():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_no_module_over_500_lines():
    long = [f"{p.relative_to(ROOT).as_posix()} ({n})" for p in _source_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500
            and p.relative_to(ROOT).as_posix() not in LONG_MODULES_ALLOWED]
    assert long == []


def test_no_function_over_60_lines_without_a_reason():
    """A function over 60 lines says why in its docstring ("Over 60 lines because ...")."""
    long = []
    for path in _source_files():
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.end_lineno - node.lineno + 1 > 60 \
                    and "over 60 lines" not in " ".join((ast.get_docstring(node) or "").lower()
                                                        .split()) \
                    and f"{where}:{node.name}" not in LONG_FUNCTIONS_ALLOWED:
                long.append(f"{where}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
