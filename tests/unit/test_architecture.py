"""The codebase's own rules: no import cycle in tulip/, each layer importing only the layers below it,
no module over 400 lines, docs/architecture.md naming every module, and a project that speaks for
itself (no file points at issue numbers or at notes outside the repository)."""
import ast
import re
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = ROOT / "tulip"


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tulip_imports(path) -> set[str]:
    """Every tulip module `path` imports, at any depth of the file (late imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("tulip")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tulip"):
            # `from tulip import metric_keys` imports the module tulip.runs.metric_keys
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in tulip_imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_tulip():
    graph = import_graph()
    # a package's __init__ importing its own submodules is not a cycle of jobs: leave those edges out
    graph = {name: {m for m in targets if not m.startswith(name + ".")} for name, targets in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert "tulip.evaluate.final" not in graph["tulip.train.loop"] and "tulip.train.loop" not in graph["tulip.evaluate.final"]


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_400_lines():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert not {path: n for path, n in lengths.items() if n > 400}


def test_no_file_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"NOTES(\.md)?\b|§\s*\d|\b[Ii]ssue\s*#?\d+")
    offending = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".py", ".yaml", ".md", ".cfg", ".sh", ".toml", "") and path.is_file():
            offending += [f"{name}:{i}" for i, line in enumerate(path.read_text(errors="ignore").splitlines(), 1)
                          if pattern.search(line) and path.name != "test_architecture.py"]
    assert not offending


# Each layer and the only other parts of tulip its modules may import (its own modules always). The
# run-folder layer is files only: it builds no data or model (tulip.build does) and knows no training;
# nn/ is plain torch modules and math; launching a sweep never needs the report's plotting stack.
LAYER_MAY_IMPORT = {
    "tulip.schema": (),  # the rules every config value is checked against
    "tulip.stats": (),  # intervals and paired tests: numbers in, numbers out
    "tulip.runs": (),
    "tulip.nn": ("tulip.schema",),
    "tulip.launch": ("tulip.runs", "tulip.schema"),
    "tulip.report": ("tulip.runs", "tulip.stats"),
    # judging a model needs no training: the evaluation runs on any checkpoint
    "tulip.evaluate": ("tulip.nn", "tulip.runs", "tulip.schema", "tulip.stats", "tulip.config", "tulip.data", "tulip.build",
                       "tulip.seeding"),
    # training measures every epoch with the evaluation's per-epoch measures, and nothing else of it
    "tulip.train": ("tulip.nn", "tulip.evaluate.measures", "tulip.runs", "tulip.schema", "tulip.stats", "tulip.config",
                    "tulip.data", "tulip.build", "tulip.seeding"),
}
# Entry points and tools: nothing inside the package depends on them
ON_TOP = ("tulip.main", "tulip.run", "tulip.bench", "tulip.report")


def within(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def test_each_layer_imports_only_what_it_may():
    broken = [f"{name} imports {target}"
              for name, targets in import_graph().items()
              for layer, allowed in LAYER_MAY_IMPORT.items() if within(name, layer)
              for target in targets
              if not within(target, layer) and not any(within(target, a) for a in allowed)]
    assert not broken


def test_nothing_in_the_package_imports_its_entry_points_or_tools():
    broken = [f"{name} imports {target}"
              for name, targets in import_graph().items()
              for target in targets
              for top in ON_TOP if within(target, top) and not within(name, top)
              if not (top == "tulip.main" and name == "tulip.run")]  # tulip.run is the entry point to main
    assert not broken


def test_the_layer_rules_catch_a_forbidden_import(monkeypatch):
    graph = import_graph()
    graph["tulip.runs.folder"] = graph["tulip.runs.folder"] | {"tulip.data"}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    with pytest.raises(AssertionError):
        test_each_layer_imports_only_what_it_may()


ARCHITECTURE = ROOT / "docs" / "architecture.md"
MODULE_PATH = re.compile(r"`((?:tulip|hydra_plugins)/[\w/]*?(?:\.py|/))`")


def test_the_architecture_map_names_every_module_and_only_real_ones():
    """docs/architecture.md is the map of the folders: every module under tulip/ is named there by its
    path (`tulip/runs/folder.py`), and every path it names exists."""
    named = set(MODULE_PATH.findall(ARCHITECTURE.read_text()))
    assert named, "no `tulip/...` paths found in docs/architecture.md"
    missing = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
                     if p.name != "__init__.py" and p.relative_to(ROOT).as_posix() not in named)
    invented = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing and not invented, f"not in the map: {missing}; in the map but not in tulip/: {invented}"
