"""The package's shape: layers whose imports only point down, no import cycle, no module over
400 lines, and a README Layout section that lists every module. Read from the source files
(ast), not by importing them, so a lazy import inside a function counts too."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "powergrad"
MAX_LINES = 400

# Lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS = [
    ("powergrad", "powergrad.transform", "powergrad.gpas", "powergrad.errors"),  # the methods
    ("powergrad.config",),
    ("powergrad.system",),
    ("powergrad.data",),
    ("powergrad.training",),
    ("powergrad.report",),
    ("powergrad.study",),
    ("powergrad.commands", "powergrad.__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "powergrad" and module.startswith(prefix + ".")):
                best = index
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


@functools.cache
def syntax_tree(path: Path) -> ast.Module:
    """A module's tree, parsed once for every test here. CPython 3.11.7's AST constructor keeps
    its recursion count for the interpreter, not the thread (a bug later 3.11 releases fixed):
    a parse overlapping one in another thread of the xdist worker (left running by an earlier
    test) can fail with "recursion depth mismatch", seen once in `pytest -m "not slow"`, so
    that parse is tried again."""
    for attempt in range(3):
        try:
            return ast.parse(path.read_text())
        except SystemError as err:
            if "recursion depth mismatch" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def imports_of(module: str) -> set[str]:
    """The powergrad modules `module` imports, anywhere in its file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(syntax_tree(path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES and n != module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_import_points_to_the_same_or_a_lower_layer():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in GRAPH.items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert upward == []


def test_there_is_no_import_cycle():
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_is_longer_than_the_limit():
    long = {module: len(path.read_text().splitlines()) for module, path in MODULES.items()}
    assert {m: n for m, n in long.items() if n > MAX_LINES} == {}


def test_no_module_reaches_into_another_modules_private_names():
    reaching = []
    for module, path in MODULES.items():
        for node in ast.walk(syntax_tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("powergrad"):
                reaching += [f"{module}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert reaching == []


def readme_layout() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    entries = {}
    for line in block.splitlines():
        match = re.match(r"(powergrad/\S*)\s+(.*)", line)
        if match:
            entries[match.group(1)] = match.group(2).strip()
    return entries


def test_the_readme_layout_lists_every_module_and_package_with_its_job():
    listed = readme_layout()
    files = {str(p.relative_to(ROOT)) for p in MODULES.values()
             if p.name not in ("__init__.py", "__main__.py")}
    packages = {f"{p.parent.relative_to(ROOT)}/" for p in PACKAGE.rglob("__init__.py")
                if p.parent != PACKAGE}
    assert sorted(files | packages) == sorted(listed)
    assert [name for name, job in listed.items() if len(job.split()) < 3] == []
