"""The codebase's own rules: no import cycle in tulip/, no module over 400 lines, and a project that
speaks for itself (no file points at issue numbers or at notes outside the repository)."""
import ast
import re
import subprocess

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
