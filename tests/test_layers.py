"""The package's house rules, read from its own source: no import cycle, no upward import, modules and
functions of bounded size."""

from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "stand"
# floors, lowest first: a module may import only from its own floor or below
FLOORS = [
    {"errors", "methods", "params"},
    {"core"},
    {"backends"},
    {"drafters"},
    {"integrations"},
    {"engine"},
    {"api"},
    {"tts", "server"},
    {"lab"},
    {"cli", "__init__", "__main__"},
]
# integrations (stand's drafters inside other engines) sit above drafters but off the main line: only these import them
INTEGRATION_USERS = {"integrations", "lab", "cli"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def floor(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(FLOORS) if top in names)


def imports(path: pathlib.Path) -> set[str]:
    """stand modules imported anywhere in the file (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stand"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("stand"))
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    return {m.removeprefix("stand.") for m in out if m.removeprefix("stand.") in modules}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in SRC.rglob("*.py")}


def test_every_module_has_a_floor():
    for m in graph():
        floor(m)


def test_no_upward_import():
    upward = [f"{m} -> {d}" for m, deps in graph().items() for d in deps if floor(d) > floor(m)]
    assert not upward, "imports that run upward: " + ", ".join(sorted(upward))


def test_integrations_are_a_side_branch():
    """core, backends, drafters, the engine and everything on the main line work without any integration."""
    wrong = [f"{m} -> {d}" for m, deps in graph().items() for d in deps
             if d.split(".")[0] == "integrations" and m.split(".")[0] not in INTEGRATION_USERS]
    assert not wrong, "imports of an integration outside lab and cli: " + ", ".join(sorted(wrong))


def test_no_import_cycle():
    g, state, cycles = graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if d not in g or d.startswith("__init__"):
                continue
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for p in SRC.rglob("*.py"):
        m = module_name(p)
        text = p.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{m} ({len(text.splitlines())})")
        if m.split(".")[0] == "cli":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{m}.{node.name} ({n})")
    assert not long_modules, "modules over 400 lines: " + ", ".join(long_modules)
    assert not long_functions, "functions over 60 lines: " + ", ".join(long_functions)
