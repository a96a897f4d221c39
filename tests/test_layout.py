"""The package's import structure: no module imports itself back through others, and the
ground floors import nothing from adainfer. Imports inside functions count: they only delay
a circle until the first call."""

import ast
from pathlib import Path

import adainfer

PACKAGE = Path(adainfer.__file__).parent
GROUND = ("_version", "files", "schema", "taskdata", "timing")


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module in the package ("adainfer" is __init__)."""
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from . import features` names a module; `from . import __version__` a name
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                for a in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert "adainfer.persist" in graph and "adainfer.prefill" in graph["adainfer"]
    assert cycles(graph) == [], "modules that import each other, directly or through others"


def test_ground_floors_import_nothing_from_adainfer():
    graph = import_graph()
    for name in GROUND:
        assert graph[f"adainfer.{name}"] == set(), name


def test_the_checker_sees_circles_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '1'\nfrom .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import __version__\nimport pkg.c\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    files = {"pkg": pkg / "__init__.py", **{f"pkg.{m}": pkg / f"{m}.py" for m in "abc"}}
    graph = {name: imports_of(name, path, files) for name, path in files.items()}
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg", "pkg.c"},
        "pkg.c": {"pkg.a"},
    }
    assert cycles(graph) == [["pkg", "pkg.a", "pkg.b", "pkg.c"]]


# The floors a newcomer should see, bottom up; a module imports only from its own floor or
# below (arrows point down). A new module must be placed here, or this test fails.
FLOORS = [
    ("ground", {"_version", "files", "schema", "timing", "taskdata"}),
    ("models and data", {"arch", "autodtype", "models", "tasks", "benchmarks"}),
    ("stepper and lens", {"stepper", "lens"}),
    (
        "features and policies",
        {"features", "policies", "flops", "offline", "checks", "persist", "risk"},
    ),
    ("engine clients", {"prefill", "generation", "drafting", "lossy"}),
    (
        "evaluate, bench, reproduce",
        {
            "collect",
            "summary",
            "evaluate",
            "bench",
            "reproduce",
            "report",
            "claims",
            "pipeline",
            "demo",
            "headroom",
            "lmeval",
        },
    ),
    ("command line and package", {"cli", "adainfer"}),
]


def test_imports_point_down_the_floors():
    floor = {
        f"adainfer.{m}" if m != "adainfer" else m: i for i, (_, ms) in enumerate(FLOORS) for m in ms
    }
    graph = import_graph()
    unplaced = sorted(set(graph) - set(floor))
    assert not unplaced, f"place these modules on a floor in FLOORS: {unplaced}"
    upward = [
        f"{a} ({FLOORS[floor[a]][0]}) imports {b} ({FLOORS[floor[b]][0]})"
        for a, targets in graph.items()
        for b in targets
        if floor[b] > floor[a]
    ]
    assert not upward, upward
