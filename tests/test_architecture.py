"""The layout's rules, checked on the source (docs/design.md):

- the import graph of fused_resnet has no cycles, and each layer imports
  only from the layers below it;
- `import fused_resnet` imports neither the tools nor the Triton kernels;
- only dispatch.py (and config.py, which validates the setting) compares
  backend names;
- no module imports or reaches into another module's private names;
- every FUSED_RESNET_* variable the repository reads is in config's table.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "fused_resnet"

# Lower numbers are lower layers; a module may import its own layer or below.
LAYERS = [
    (0, ("fused_resnet._compat", "fused_resnet.config", "fused_resnet.numerics", "fused_resnet._C")),
    (1, ("fused_resnet.dispatch",)),
    (2, ("fused_resnet.ops",)),
    (3, ("fused_resnet.backends",)),
    (4, ("fused_resnet.nn",)),
    (5, ("fused_resnet.optimize", "fused_resnet.export")),
    (6, ("fused_resnet",)),  # the package's __init__: the public API
    (7, ("fused_resnet.tools", "fused_resnet.__main__")),
]
# Extension modules, imported by name but not Python files here.
EXTENSIONS = {"fused_resnet._C"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, str | None, ast.AST]]:
    """(imported module, imported name or None, node) for every import of a
    fused_resnet module anywhere in the file (functions included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node) for a in node.names if a.name.split(".")[0] == "fused_resnet"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fused_resnet":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES or sub in EXTENSIONS:
                    out.append((sub, None, node))
                else:
                    out.append((target, alias.name, node))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m, p) if t != m and (t in MODULES or t in EXTENSIONS)}
            for m, p in MODULES.items()}


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py's LAYERS"
    return best[0]


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_only_downward():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in _graph().items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_importing_the_package_imports_neither_tools_nor_triton_kernels():
    # (torch._dynamo imports Triton itself; our kernels load on first launch.)
    code = ("import sys, fused_resnet\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('fused_resnet.tools',\n"
            "    'fused_resnet.backends.triton.launch', 'fused_resnet.backends.triton.conv2d_fwd')))\n"
            "print(bad)\n"
            "raise SystemExit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


BACKEND_ONLY_NAMES = {"reference", "cudnn", "triton"}  # "cpu" and "cuda" are device types too


def _string_constants(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_string_constants(e) for e in node.elts)) if node.elts else set()
    return set()


def _mentions_backend(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "backend" in name.lower()


def test_only_dispatch_compares_backend_names():
    allowed = {"fused_resnet.dispatch", "fused_resnet.config"}
    found = []
    for module, path in MODULES.items():
        if module in allowed or module.startswith("fused_resnet.tools"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            constants = set().union(*(_string_constants(o) for o in operands))
            if constants & BACKEND_ONLY_NAMES or (constants and any(_mentions_backend(o) for o in operands)):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "backend names compared outside dispatch.py:\n" + "\n".join(found)


def test_no_module_uses_another_modules_private_names():
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, name, node in _imports(module, path):
            if name is not None:
                if name.startswith("_") and not name.startswith("__") and target != module:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: imports {target}.{name}")
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if target.endswith("." + alias.name):
                        aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and f"{aliases[node.value.id]}.{node.attr}" not in MODULES | dict.fromkeys(EXTENSIONS)):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def _variables_read_in_the_repository() -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    globs = ["fused_resnet/**/*.py", "tests/**/*.py", "benchmarks/**/*.py", "examples/**/*.py", "tools/**/*",
             "csrc/**/*", "setup.py", "Makefile", ".ci/*"]
    for pattern in globs:
        for path in REPO.glob(pattern):
            if not path.is_file() or path == Path(__file__).resolve():
                continue
            for name in re.findall(r"FUSED_RESNET_[A-Z0-9_]+", path.read_text(errors="replace")):
                seen.setdefault(name, []).append(str(path.relative_to(REPO)))
    return seen


def test_every_environment_variable_is_in_the_configuration_table():
    from fused_resnet import config

    known = {s.env for s in config.SETTINGS} | {name for name, _, _ in config.OTHER_VARIABLES}
    seen = _variables_read_in_the_repository()
    assert seen, "found no FUSED_RESNET_ variable at all: the scan is broken"
    missing = {name: files[:3] for name, files in seen.items() if name not in known}
    assert not missing, f"variables missing from fused_resnet/config.py's tables: {missing}"
    documented = (REPO / "docs" / "configuration.md").read_text()
    assert all(f"`{name}`" in documented for name in known), "docs/configuration.md is out of date"


@pytest.mark.parametrize("layer_module", ["fused_resnet.dispatch", "fused_resnet.ops.add_relu",
                                          "fused_resnet.nn.paths.block", "fused_resnet.tools.cli"])
def test_layer_map_covers_the_package(layer_module):
    # Every module falls in a layer (a new top-level module must be placed).
    assert all(_layer(m) >= 0 for m in MODULES)
    assert layer_module in MODULES
