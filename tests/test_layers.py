"""The package layout stays layered: imports run one way, privately named things stay private.

An AST check over ``jaxcompress/`` (no import needed, so it also sees code that is never
run) enforces four rules:

- ``layers``: a module imports only its own subpackage and subpackages in lower layers of
  :data:`LAYERS`; siblings on one layer do not import each other. Only the top-level
  ``jaxcompress/__init__.py``, the curated public API, may import anything.
- ``private``: no module imports another module's underscore name (``from a import _x``
  or ``a._x``); what is shared gets a public name in an internal module.
- ``inner-import``: every ``jaxcompress`` import sits at module level, not inside a
  function or class (only optional third-party packages are imported lazily). The public
  API's module ``__getattr__``, which loads the examples and ``training`` on first use, is
  the one exception.
- ``cycle``: the module import graph, counting imports inside functions, has no cycles.

The checker is tested on small fixture packages, so each rule is shown to fail. The same
layers are also an ``import-linter`` contract in ``pyproject.toml``, run by ``lint-imports``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

# The subpackages of jaxcompress, lowest layer first. A module may import its own
# subpackage and any subpackage on a lower line; names on one line are siblings that
# must not import each other. Keep pyproject.toml's [tool.importlinter] contract in step.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),  # checks, bitpack, progress, mesh, paths: jax and numpy only
    ("arrays",),  # the compressed leaf types; arrays.tree: materialize, nbytes
    ("transforms", "numerics", "jaxpr"),  # Transform and combinators | plain-array math | jaxprs
    ("calibration",),  # calibrate, InputStats
    ("methods",),  # prune, nm, blocks, quantize, cluster, lowrank, projections
    ("training", "structure"),  # optax wrappers | coupling, thinning, units, sensitivity
    ("runtime",),  # sharding, parallel, kernels, accelerate, report
    ("io", "hybrid"),  # the file format, interop, checkpoints | auto: formats per weight
    ("examples",),  # demo models, classifier, pipeline, MiniLM, decoder LM, data
    ("cli",),  # the command line
)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "jaxcompress"


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


@dataclass(frozen=True)
class Import:
    """One import of a package module, found in the AST."""

    importer: str  # the importing module's dotted name
    target: str  # the imported module's dotted name
    path: Path
    line: int
    module_level: bool


def module_names(package_dir: Path) -> dict[str, Path]:
    """Every module of the package under ``package_dir``, by dotted name."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module that ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(path):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_module_call(node: ast.AST) -> str | None:
    """The constant module name of ``importlib.import_module("...")`` or ``__import__("...")``."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    first = node.args[0]
    if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
        return first.value if isinstance(first.value, str) else None
    return None


class _Scanner(ast.NodeVisitor):
    """Collects one module's package imports and its uses of other modules' private names."""

    def __init__(self, module: str, path: Path, modules: dict[str, Path], package: str):
        self.module, self.path, self.modules, self.package = module, path, modules, package
        self.imports: list[Import] = []
        self.violations: list[Violation] = []
        self.depth = 0  # how many function, lambda or class bodies enclose the node
        self.aliases: dict[str, str] = {}  # local name -> package module it is bound to

    def _ours(self, name: str) -> bool:
        return name == self.package or name.startswith(self.package + ".")

    def _record(self, target: str, node: ast.AST) -> None:
        found = Import(self.module, target, self.path, node.lineno, module_level=self.depth == 0)
        if found not in self.imports:  # `from a import x, y` imports a once
            self.imports.append(found)

    def _private(self, node: ast.AST, name: str, owner: str) -> None:
        self.violations.append(
            Violation(
                self.path,
                node.lineno,
                "private",
                f"{self.module} uses {name!r}, a private name of {owner}; "
                "give it a public name in an internal module",
            )
        )

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _nested

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not self._ours(alias.name):
                continue
            self._record(alias.name, node)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:  # `import a.b.c` binds `a`; attribute chains are resolved below
                self.aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _absolute(self.module, self.path, node)
        if not self._ours(source):
            return
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.modules:  # `from package import module`
                self._record(submodule, node)
                self.aliases[alias.asname or alias.name] = submodule
                continue
            self._record(source, node)
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                self._private(node, alias.name, source)

    def visit_Call(self, node: ast.Call) -> None:
        target = _import_module_call(node)
        if target is not None and self._ours(target):
            self._record(target, node)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = [node.attr]
        value = node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in self.aliases:
            dotted = [self.aliases[value.id], *reversed(chain)]
            # Walk down the chain while it names modules; the next name is an attribute.
            owner = dotted[0]
            for name in dotted[1:]:
                if f"{owner}.{name}" in self.modules:
                    owner = f"{owner}.{name}"
                    continue
                if name.startswith("_") and not name.startswith("__"):
                    self._private(node, name, owner)
                break
            return  # the whole chain is handled; don't revisit its inner attributes
        self.generic_visit(node)


def scan(package_dir: Path) -> tuple[dict[str, Path], list[Import], list[Violation]]:
    """The package's modules, its imports of its own modules, and its private-name uses."""
    modules = module_names(package_dir)
    imports: list[Import] = []
    violations: list[Violation] = []
    for module, path in modules.items():
        scanner = _Scanner(module, path, modules, package_dir.name)
        scanner.visit(ast.parse(path.read_text(), filename=str(path)))
        imports += scanner.imports
        violations += scanner.violations
    return modules, imports, violations


def _layer_of(layers: tuple[tuple[str, ...], ...]) -> dict[str, int]:
    return {name: index for index, line in enumerate(layers) for name in line}


def _subpackage(module: str) -> str | None:
    """``a.b.c`` -> ``b``; None for the top-level package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(
    package_dir: Path, layers: tuple[tuple[str, ...], ...] = LAYERS
) -> list[Violation]:
    """Imports that go up a layer or sideways to a sibling, and modules in no layer."""
    _, imports, _ = scan(package_dir)
    layer = _layer_of(layers)
    violations = []
    for imp in imports:
        source, target = _subpackage(imp.importer), _subpackage(imp.target)
        if source is None or source == target:
            continue  # the public API imports anything; a subpackage imports itself
        for name in (source, target):
            if name is not None and name not in layer:
                violations.append(
                    Violation(
                        imp.path, imp.line, "layers", f"{imp.importer}: {name!r} is in no layer"
                    )
                )
        if source not in layer or (target is not None and target not in layer):
            continue
        if target is None:
            why = f"imports the top-level {imp.target} (the public API, above every layer)"
        elif layer[target] > layer[source]:
            why = f"imports {imp.target} from the higher layer {target!r} ({source!r} is lower)"
        elif layer[target] == layer[source]:
            why = f"imports {imp.target} from its sibling {target!r} on the same layer"
        else:
            continue
        violations.append(Violation(imp.path, imp.line, "layers", f"{imp.importer} {why}"))
    return violations


def private_violations(package_dir: Path) -> list[Violation]:
    """Uses of another module's underscore names."""
    return scan(package_dir)[2]


def inner_import_violations(package_dir: Path) -> list[Violation]:
    """Package modules imported inside a function or class, not at module level."""
    _, imports, _ = scan(package_dir)
    top = package_dir / "__init__.py"  # its module __getattr__ loads heavy parts lazily
    return [
        Violation(
            imp.path,
            imp.line,
            "inner-import",
            f"{imp.importer} imports {imp.target} inside a function or class; "
            "import package modules at module level",
        )
        for imp in imports
        if not imp.module_level and imp.path != top
    ]


def cycle_violations(package_dir: Path) -> list[Violation]:
    """One violation per import cycle (a strongly connected set of modules)."""
    _, imports, _ = scan(package_dir)
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target != imp.importer:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    violations = []
    for component in _strongly_connected(edges):
        cycle = _cycle_through(component, edges)
        first = edges[cycle[0]][cycle[1]]
        hops = ", ".join(
            f"{a} -> {b} (line {edges[a][b].line} of {edges[a][b].path.name})"
            for a, b in zip(cycle, cycle[1:], strict=False)
        )
        violations.append(
            Violation(
                first.path,
                first.line,
                "cycle",
                f"import cycle among {len(component)} modules ({', '.join(component)}); "
                f"one loop: {hops}",
            )
        )
    return violations


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; only components of two or more modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    nodes = sorted(set(edges) | {t for targets in edges.values() for t in targets})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _cycle_through(component: list[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """A shortest closed path from the component's first module back to itself."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges.get(node, {})):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def _report(violations: list[Violation]) -> str:
    return f"{len(violations)} violation(s):\n" + "\n".join(map(str, violations))


# ----------------------------------------------------------------------------------------
# The rules on jaxcompress itself.

PACKAGE_DIR = ROOT / PACKAGE


def test_every_subpackage_has_a_layer():
    layered = set(_layer_of(LAYERS))
    subpackages = {p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")}
    modules = {p.stem for p in PACKAGE_DIR.glob("*.py") if p.name != "__init__.py"}
    assert subpackages | modules <= layered, (
        f"add {sorted((subpackages | modules) - layered)} to LAYERS in tests/test_layers.py "
        "and to [tool.importlinter] in pyproject.toml"
    )


def test_imports_follow_the_layers():
    violations = layer_violations(PACKAGE_DIR)
    assert not violations, _report(violations)


def test_no_module_imports_another_modules_private_names():
    violations = private_violations(PACKAGE_DIR)
    assert not violations, _report(violations)


def test_package_modules_are_imported_at_module_level():
    violations = inner_import_violations(PACKAGE_DIR)
    assert not violations, _report(violations)


def test_no_import_cycles():
    violations = cycle_violations(PACKAGE_DIR)
    assert not violations, _report(violations)


def test_import_linter_layers_are_the_table():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    layers = [
        tuple(name.strip().removeprefix(f"{PACKAGE}.") for name in line.split("|"))
        for line in reversed(contract["layers"])  # import-linter lists the highest first
    ]
    assert layers == [tuple(line) for line in LAYERS]


def test_import_linter_contract_holds():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's jaxcompress, not another
    result = subprocess.run(
        [lint_imports, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------
# The checker on fixture packages: each rule catches what it should, and only that.

FIXTURE_LAYERS = (("low",), ("left", "right"), ("high",))


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    """Writes a fixture package ``pkg`` with the given module sources; returns its path."""
    root = tmp_path / "pkg"
    for name in ("__init__.py", "low/__init__.py", "left/__init__.py", "right/__init__.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    (root / "high").mkdir()
    (root / "high" / "__init__.py").write_text("")
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(source))
    return root


def _where(violations: list[Violation]) -> list[tuple[str, int, str]]:
    return sorted((v.path.name, v.line, v.rule) for v in violations)


def test_checker_accepts_a_clean_package(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.high.top import run\n"
            "def __getattr__(name):\n    import pkg.high.top\n    return pkg.high.top\n",
            "low/base.py": "import math\n_HIDDEN = 1\nPUBLIC = _HIDDEN\n",
            "low/_shared.py": "VALUE = 2\n",
            "left/a.py": "from pkg.low import base, _shared\nfrom . import b\n"
            "X = base.PUBLIC + _shared.VALUE + b.Y\n",
            "left/b.py": "from pkg.low.base import PUBLIC as Y\n__all__ = ['Y']\n",
            "right/c.py": "import pkg.low.base\nZ = pkg.low.base.PUBLIC\n"
            "def f():\n    import json  # third party or stdlib: lazy is fine\n    return json\n",
            "high/top.py": "from pkg.left import a\nfrom pkg.right.c import Z\n"
            "from pkg.low.base import __doc__ as doc\ndef run():\n    return a.X + Z\n",
        },
    )
    assert layer_violations(root, FIXTURE_LAYERS) == []
    assert private_violations(root) == []
    assert inner_import_violations(root) == []
    assert cycle_violations(root) == []


def test_checker_finds_upward_sideways_top_and_unlayered_imports(tmp_path):
    root = _package(
        tmp_path,
        {
            "low/up.py": "import os\nfrom pkg.high import top\n",
            "left/side.py": "\n\nfrom pkg.right.c import Z\n",
            "right/c.py": "Z = 1\n",
            "right/api.py": "import pkg\n",
            "high/top.py": "from ..low import up\n",  # downward, relative: fine
            "extra/thing.py": "from pkg.low import up\n",
        },
    )
    violations = layer_violations(root, FIXTURE_LAYERS)
    assert _where(violations) == [
        ("api.py", 1, "layers"),
        ("side.py", 3, "layers"),
        ("thing.py", 1, "layers"),
        ("up.py", 2, "layers"),
    ]
    messages = " | ".join(v.message for v in violations)
    assert "from the higher layer 'high'" in messages
    assert "from its sibling 'right'" in messages
    assert "top-level pkg" in messages
    assert "'extra' is in no layer" in messages
    assert all(str(v).startswith(f"{v.path}:{v.line}: [layers] ") for v in violations)


def test_checker_finds_private_names_imported_or_reached_through_a_module(tmp_path):
    root = _package(
        tmp_path,
        {
            "low/base.py": "_helper = 1\n",
            "left/a.py": "from pkg.low.base import _helper\n",
            "left/b.py": "from pkg.low import base\n\nX = base._helper\n",
            "left/c.py": "import pkg.low.base as m\nimport pkg.low.base\n"
            "X = m._helper\nY = pkg.low.base._helper\n",
            "left/d.py": "from ..low.base import _helper as h\n",
        },
    )
    violations = private_violations(root)
    assert _where(violations) == [
        ("a.py", 1, "private"),
        ("b.py", 3, "private"),
        ("c.py", 3, "private"),
        ("c.py", 4, "private"),
        ("d.py", 1, "private"),
    ]
    assert "'_helper', a private name of pkg.low.base" in violations[0].message


def test_checker_finds_package_imports_inside_functions_and_classes(tmp_path):
    root = _package(
        tmp_path,
        {
            "low/base.py": "X = 1\n",
            "left/a.py": "def f():\n    from pkg.low import base\n    return base\n",
            "left/b.py": "class C:\n    import pkg.low.base\n",
            "left/c.py": "import importlib\n"
            "def g():\n    return importlib.import_module('pkg.low.base')\n",
            "left/d.py": "f = lambda: __import__('pkg.low.base')\n",
            "left/e.py": "def h():\n    from ..low import base\n    return base\n",
        },
    )
    violations = inner_import_violations(root)
    assert _where(violations) == [
        ("a.py", 2, "inner-import"),
        ("b.py", 2, "inner-import"),
        ("c.py", 3, "inner-import"),
        ("d.py", 1, "inner-import"),
        ("e.py", 2, "inner-import"),
    ]


def test_checker_finds_cycles_hidden_inside_functions(tmp_path):
    root = _package(
        tmp_path,
        {
            "low/a.py": "from pkg.low import b\n",
            "low/b.py": "def f():\n    from pkg.low import c\n    return c\n",
            "low/c.py": "import pkg.low.a\n",
            "left/x.py": "import pkg.left.y\n",
            "left/y.py": "X = 1\n",
        },
    )
    violations = cycle_violations(root)
    assert _where(violations) == [("a.py", 1, "cycle")]
    assert "among 3 modules (pkg.low.a, pkg.low.b, pkg.low.c)" in violations[0].message
    assert "one loop: pkg.low.a -> pkg.low.b (line 1 of a.py)" in violations[0].message
    assert "pkg.low.c -> pkg.low.a (line 1 of c.py)" in violations[0].message
