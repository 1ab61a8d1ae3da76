"""The package's layering, checked statically: every import of every module (those inside functions included)
against the layer table of docs/design.md, no import circle, no private name taken from another module.

Each check reads the source with :mod:`ast` and runs nothing, so an import made lazily inside a function is seen as
well as one at the top of a module. The checks take a folder, so the tests below also run them on small planted
packages and watch each kind of violation fail.
"""
from __future__ import annotations

import ast
import os
import textwrap
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import pytest

pytestmark = pytest.mark.unit

PACKAGE = "nnunet_varaug"
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# layer -> the layers it may import besides itself (docs/design.md, "Layers")
LOWER = ("utilities", "training", "evaluation", "inference", "launch", "report")
ALLOWED: Dict[str, Set[str]] = {
    "utilities": set(),
    "training": {"utilities"},
    "evaluation": {"utilities"},
    "inference": {"utilities", "training", "evaluation"},
    "launch": {"utilities", "training"},
    "report": {"utilities", "evaluation", "inference"},
    "experiments": set(LOWER),
    "commands": set(LOWER) | {"experiments"},
    "cli": {"commands", "utilities"},
    "_lookup": {"training", "utilities"},
    "": {"training"},  # the package's face: lazy re-exports of the documented Python names
}
ARGPARSE_LAYERS = {"commands", "cli"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module imported (a module of the package, or an outside one)
    names: Tuple[str, ...]  # names taken with "from ... import"
    line: int


def module_names(package_dir: str) -> Dict[str, str]:
    """Dotted module name -> file, for every .py file of the package."""
    root = os.path.dirname(package_dir)
    out = {}
    for folder, _, files in os.walk(package_dir):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


def imports_of(module: str, path: str, modules: Dict[str, str]) -> List[Import]:
    """Every import statement of the file, wherever it stands; relative imports resolved."""
    tree = ast.parse(open(path).read(), path)
    is_package = path.endswith("__init__.py")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(module, a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            # "from pkg import sub": an import of the submodule pkg.sub
            subs = [n for n in names if f"{base}.{n}" in modules]
            if subs:
                out += [Import(module, f"{base}.{n}", (), node.lineno) for n in subs]
            rest = tuple(n for n in names if n not in subs)
            if rest or not subs:
                out.append(Import(module, base, rest, node.lineno))
    return out


def layer_of(module: str, package: str) -> Optional[str]:
    if module != package and not module.startswith(package + "."):
        return None
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(package_dir: str) -> List[str]:
    package = os.path.basename(package_dir)
    modules = module_names(package_dir)
    found = []
    for module, path in sorted(modules.items()):
        mine = layer_of(module, package)
        for imp in imports_of(module, path, modules):
            if imp.target == "argparse" and mine not in ARGPARSE_LAYERS:
                found.append(f"{module}:{imp.line} imports argparse (only commands/ and cli.py parse arguments)")
            theirs = layer_of(imp.target, package)
            if theirs is None or theirs == mine:
                continue
            if theirs not in ALLOWED.get(mine, set()):
                found.append(f"{module}:{imp.line} ({mine or 'package root'}) imports {imp.target} ({theirs}), "
                             f"which its layer may not import")
    return found


def import_graph(package_dir: str) -> Dict[str, Set[str]]:
    package = os.path.basename(package_dir)
    modules = module_names(package_dir)
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for imp in imports_of(module, path, modules):
            if imp.target in modules and imp.target != module and layer_of(imp.target, package) is not None:
                graph[module].add(imp.target)
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def private_imports(folder: str, package: str, modules: Dict[str, str]) -> List[str]:
    """``from <package module> import _name`` and ``<imported package module>._name`` in any file under folder."""
    found = []
    for dirpath, _, files in os.walk(folder):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            tree = ast.parse(open(path).read(), path)
            aliases = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package) and not node.level:
                    for a in node.names:
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            found.append(f"{path}:{node.lineno} imports private {node.module}.{a.name}")
                        elif f"{node.module}.{a.name}" in modules:
                            aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.startswith(package) and a.asname:
                            aliases[a.asname] = a.name
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in aliases and node.attr.startswith("_")
                        and not node.attr.startswith("__")):
                    found.append(f"{path}:{node.lineno} uses private {aliases[node.value.id]}.{node.attr}")
    return found


# ---- the package ------------------------------------------------------------------------------------------------
def test_every_import_respects_the_layer_table():
    assert layer_violations(PACKAGE_DIR) == []


def test_no_import_circle_between_modules():
    assert circles(import_graph(PACKAGE_DIR)) == []


def test_no_private_name_crosses_a_module_in_the_package_or_the_tests():
    modules = module_names(PACKAGE_DIR)
    found = private_imports(PACKAGE_DIR, PACKAGE, modules) + private_imports(TESTS_DIR, PACKAGE, modules)
    assert found == []


def test_every_subpackage_names_its_job_and_what_it_may_import():
    for layer in LOWER + ("experiments", "commands"):
        doc = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE_DIR, layer, "__init__.py")).read()))
        assert doc and "May import" in doc, layer


# ---- planted violations: each check must see them ---------------------------------------------------------------
def plant(tmp_path, files: Dict[str, str]) -> str:
    pkg = tmp_path / "pkg"
    for rel, text in files.items():
        target = pkg / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
    for folder in [pkg] + [p for p in pkg.rglob("*") if p.is_dir()]:
        (folder / "__init__.py").touch()
    return str(pkg)


def test_a_lazy_upward_import_inside_a_function_is_seen(tmp_path):
    pkg = plant(tmp_path, {"training/trainer.py": """
        def fix():
            from pkg.commands import analyze
            return analyze
        """, "commands/analyze.py": ""})
    found = layer_violations(pkg)
    assert len(found) == 1 and "pkg.training.trainer:3" in found[0] and "pkg.commands.analyze" in found[0]


def test_a_relative_import_across_layers_is_seen(tmp_path):
    pkg = plant(tmp_path, {"evaluation/metrics.py": "from ..inference import engine\n", "inference/engine.py": ""})
    assert len(layer_violations(pkg)) == 1


def test_argparse_outside_the_command_layer_is_seen(tmp_path):
    pkg = plant(tmp_path, {"utilities/flags.py": "import argparse\n", "commands/run.py": "import argparse\n"})
    found = layer_violations(pkg)
    assert len(found) == 1 and "pkg.utilities.flags" in found[0]


def test_a_circle_inside_one_layer_is_seen(tmp_path):
    pkg = plant(tmp_path, {"experiments/a.py": "from pkg.experiments import b\n",
                           "experiments/b.py": "def f():\n    from pkg.experiments.c import x\n",
                           "experiments/c.py": "from pkg.experiments.a import y\n"})
    assert circles(import_graph(pkg)) == [["pkg.experiments.a", "pkg.experiments.b", "pkg.experiments.c"]]


def test_a_private_import_and_a_private_attribute_are_seen(tmp_path):
    pkg = plant(tmp_path, {"inference/samples.py": "def _remove_stale():\n    pass\n",
                           "inference/oof.py": "from pkg.inference.samples import _remove_stale\n",
                           "inference/other.py": "from pkg.inference import samples as s\ns._remove_stale()\n"})
    found = private_imports(pkg, "pkg", module_names(pkg))
    assert len(found) == 2 and "_remove_stale" in found[0] and "_remove_stale" in found[1]


def test_the_documented_python_names_import_from_the_package_root_without_torch():
    import subprocess
    import sys

    code = ("import sys, nnunet_varaug; assert 'torch' not in sys.modules; "
            "from nnunet_varaug import MonteCarloArithmetic, VariabilitySampleTransform; "
            "from nnunet_varaug.training.numerics.mode import MonteCarloArithmetic as M; "
            "from nnunet_varaug.training.transforms import VariabilitySampleTransform as V; "
            "assert MonteCarloArithmetic is M and VariabilitySampleTransform is V")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
