"""The direction of dependencies: every module imports, model packages never import the converter,
no import cycle between modules or packages, and no import hidden inside a function in the packages.

    minivision  <-  minisam, miniflorence, convmae  <-  weights_convert, train  <-  bench, tests

`minivision`, the shared leaf, imports no other package of the project and no third-party package
beyond torch, numpy, pillow and safetensors; nothing in the packages imports tests or bench.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from helpers.paths import ROOT

PACKAGES = ("minivision", "minisam", "miniflorence", "convmae", "weights_convert", "train")
MODEL_PACKAGES = ("minisam", "miniflorence", "convmae")
FIRST_PARTY = (*PACKAGES, "tests", "bench", "conftest", "helpers")
# May import, at module level, these first-party packages (besides themselves).
ALLOWED = {
    "minivision": set(),
    "minisam": {"minivision"},
    "miniflorence": {"minivision"},
    "convmae": {"minivision"},
    "weights_convert": {"minivision", *MODEL_PACKAGES},
    "train": {"minivision", *MODEL_PACKAGES},
}
# The third-party packages the shared leaf may import (everything else it uses is the standard library).
LEAF_THIRD_PARTY = {"torch", "numpy", "PIL", "safetensors"}
# Optional extras ([onnx], [data]): the leaf may import them only inside the functions that need them.
LEAF_OPTIONAL = {"onnx", "onnxruntime", "onnxscript", "pyarrow"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imported_names(node: ast.AST, module: str, is_package: bool, files: dict[str, Path]) -> list[str]:
    """The first-party modules an import statement names (relative imports resolved;
    `from package import submodule` names the submodule, `from package import name` the package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join([*parent, base] if base else parent)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
    return [n for n in names if n.split(".")[0] in FIRST_PARTY]


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def module_level_imports(tree: ast.Module, module: str, is_package: bool, files: dict[str, Path]) -> set[str]:
    """First-party modules imported when the module runs (not in functions, not under TYPE_CHECKING)."""
    found = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(n for n in imported_names(node, module, is_package, files) if n in files)
            elif isinstance(node, (ast.If, ast.Try, ast.With)) and not is_type_checking_block(node):
                for child in ("body", "orelse", "finalbody", "handlers"):
                    for block in getattr(node, child, []):
                        visit(block.body if isinstance(block, ast.ExceptHandler) else [block])
    visit(tree.body)
    return found


def function_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports of first-party modules inside functions (optional third-party extras, such as onnx,
    are imported where they are needed on purpose)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    names = ["." if inner.level else inner.module or ""]
                else:
                    continue
                if any(n == "." or n.split(".")[0] in FIRST_PARTY for n in names):
                    found.append((inner.lineno, ast.unparse(inner)))
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    edges = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        edges[module] = module_level_imports(tree, module, path.name == "__init__.py", files) - {module}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_imports() -> None:
    for module in module_files():
        importlib.import_module(module)


def test_packages_depend_in_one_direction() -> None:
    edges = graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in edges.items()
        for target in targets
        if target.split(".")[0] != module.split(".")[0] and target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    )
    assert not wrong, wrong
    packages = {}
    for module, targets in edges.items():
        packages.setdefault(module.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    assert find_cycle({p: t - {p} for p, t in packages.items()}) is None


def test_no_import_cycle_between_modules() -> None:
    assert find_cycle(graph()) is None


def test_no_function_level_imports_of_project_modules() -> None:
    """A first-party import inside a function usually hides a cycle: every module imports the
    project's modules at the top."""
    files = module_files()
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for module, path in files.items()
        for line, text in function_level_imports(ast.parse(path.read_text()))
    ]
    assert not found, found


def test_model_packages_mention_the_converter_only_in_prose() -> None:
    for package in MODEL_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(n.split(".")[0] == "weights_convert" for n in names), f"{path}: {ast.unparse(node)}"


def test_the_shared_leaf_imports_only_torch_numpy_pillow_safetensors_and_the_standard_library() -> None:
    """...and, inside the functions that need them, the optional extras (onnx, pyarrow)."""
    found = []
    for path in sorted((ROOT / "minivision").rglob("*.py")):
        tree = ast.parse(path.read_text())
        in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for n in ast.walk(f)}
        for node in ast.walk(tree):
            allowed = LEAF_THIRD_PARTY | (LEAF_OPTIONAL if id(node) in in_functions else set())
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "minivision" and top not in allowed and top not in sys.stdlib_module_names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not found, found
