"""The shape of the package (docs/design.md): which package owns what, and which way imports go.

These are the rules the re-cut established; a change that breaks one should change the design, on
purpose, not by accident.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mpocompress"

#: the layers, lowest first; a module may import only from its own layer or lower ones
LAYERS = [
    {"mpocompress", "mpocompress.errors", "mpocompress.select"},
    {"mpocompress.codecs"},
    {"mpocompress.config"},
    {"mpocompress.core"},
    {"mpocompress.format", "mpocompress.report"},
    {"mpocompress.io"},
    {"mpocompress.nn", "mpocompress.render", "mpocompress.data"},
    {"mpocompress.jobs", "mpocompress.speech", "mpocompress.text"},
    {"mpocompress.cli", "mpocompress.__main__"},
]


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Every mpocompress module ``path`` imports, at the top or inside functions (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "mpocompress" or n.startswith("mpocompress."))
    return found


def layer_of(name: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None, f"{name} is in no layer: add it to LAYERS and docs/design.md"
    return best[0]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_no_import_cycle_lazy_imports_included():
    g = graph()
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(m):], m]))
            if m not in state:
                visit(m, [*stack, m])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])


def test_imports_only_go_down_the_layers():
    bad = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, deps in graph().items()
        for b in deps
        if layer_of(b) > layer_of(a)
    ]
    assert not bad, "\n".join(bad)


def test_the_core_and_codecs_touch_no_files_and_no_modules():
    for name, deps in graph().items():
        if name.startswith(("mpocompress.core", "mpocompress.codecs")):
            assert not {d for d in deps if d.startswith(("mpocompress.io", "mpocompress.nn", "mpocompress.jobs"))}, name
            source = modules()[name].read_text()
            assert "open(" not in source and "torch.nn.Module" not in source and "(nn.Module)" not in source, name


def test_format_version_is_defined_in_exactly_one_module():
    owners = [n for n, p in modules().items() if any(
        isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FORMAT_VERSION" for t in node.targets)
        for node in ast.walk(ast.parse(p.read_text())))]  # fmt: skip
    assert owners == ["mpocompress.format"]


def test_no_function_is_over_120_lines():
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 120
    ]
    assert not long, long


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if ast.get_docstring(node) is None:
                    missing.append(f"{name}.{node.name}")
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("_") and ast.get_docstring(item) is None:
                        if not any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                            missing.append(f"{name}.{node.name}.{item.name}")
    assert not missing, missing


def test_importing_the_package_and_cli_stays_cheap():
    import subprocess
    import sys

    code = "import sys, mpocompress, mpocompress.cli; assert 'torch' not in sys.modules and 'rich' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
