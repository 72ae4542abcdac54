"""metacore's imports run only downward (DESIGN.md section 10).

Every ``import`` in the package is read with ``ast``: at module level and inside functions (imports deferred for
start-up time count as much as any), but not under ``if TYPE_CHECKING:`` (those never run). Each module belongs to
one layer, named by its folder; an import of a module in a higher layer fails the test, naming both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import metacore

ROOT = Path(metacore.__file__).parent

# low to high; a module's layer is that of the longest prefix that names it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("interfaces", ("metacore.core.errors", "metacore.core.hookspecs", "metacore.core.hparams",
                    "metacore.core.options", "metacore.core.state", "metacore.core.controller",
                    "metacore.core.task", "metacore.core.metrics", "metacore.core.values", "metacore.core.registry",
                    "metacore.core")),
    ("engine", ("metacore.core.driver", "metacore.core.trainer", "metacore.core.guard", "metacore.core.rng",
                "metacore.core.checkpoint", "metacore.core.flat", "metacore.core.progress")),
    ("store", ("metacore.core.store", "metacore.core.tracking", "metacore.core.store_link")),
    ("plugins", ("metacore.plugins", "metacore.controllers", "metacore.controllers.ppo.residual",
                 "metacore.controllers.hypergrad_memory", "metacore.controllers.hypergrad_optimizers",
                 "metacore.optimizers")),
    ("analysis", ("metacore.analysis",)),
    ("application", ("metacore.app", "metacore.app.plan", "metacore.app.meta_checkpoint", "metacore.app.meta_request",
                     "metacore.app.meta_callback", "metacore.app.meta_warm_start", "metacore.app.meta_state",
                     "metacore.app.meta_policy_spec", "metacore.app.meta_eval", "metacore.app.meta_train")),
    ("entry points", ("metacore.cli", "metacore.commands", "metacore.integrations", "metacore.testing",
                      "metacore.__main__", "metacore")),
]


def layer_of(module: str) -> tuple[int, str]:
    best: tuple[int, int, str] | None = None  # (prefix length, rank, layer)
    for rank, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank, name)
    assert best is not None, f"module {module} is in no layer: add it to LAYERS"
    return best[1], best[2]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, imported metacore module, names taken from it) for every import that runs, at any depth."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str, tuple[str, ...]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target, tuple(alias.name for alias in node.names)))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [f for f in found if f[1] == "metacore" or f[1].startswith("metacore.")]


def _targets(name: str, names: tuple[str, ...], modules: set[str]) -> list[str]:
    """The modules an import reaches: ``from x import y`` is module ``x.y`` where that is one, else ``x``. The root
    package's own metadata (``from metacore import __version__``) is not a dependency on the public API."""
    if name == "metacore" and names and all(n.startswith("__") for n in names):
        return []
    out = set()
    for n in names or ("",):
        sub = f"{name}.{n}" if n else name
        target = sub if sub in modules else name
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            out.add(target)
    return sorted(out)


def upward_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import in ``sources`` ({module: (source, is_package)}) that runs from a lower layer to a higher one."""
    modules = set(sources)
    problems = []
    for module, (source, is_package) in sorted(sources.items()):
        rank, layer = layer_of(module)
        for line, name, names in imports_of(source, module, is_package):
            for target in _targets(name, names, modules):
                t_rank, t_layer = layer_of(target)
                if t_rank > rank:
                    problems.append(f"{module}:{line} ({layer}) imports {target} ({t_layer})")
    return sorted(set(problems))


def package_sources() -> dict[str, tuple[str, bool]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path.read_text(), is_package)
    return out


def test_imports_run_only_downward():
    problems = upward_imports(package_sources())
    assert not problems, "imports that run upward (DESIGN.md section 10):\n" + "\n".join(problems)


def test_every_module_is_in_a_layer():
    for module in package_sources():
        layer_of(module)


@pytest.mark.parametrize("source", [
    "from metacore.analysis.plots import log_comparison_plot\n",  # the import core/runner.py once had
    "def execute():\n    from metacore.analysis.plots import log_comparison_plot\n",  # deferred: counts too
    "from metacore.analysis import plots\n",
    "def f():\n    from ..analysis import plots\n",
])
def test_the_check_catches_an_upward_import(source):
    sources = {"metacore.core.runner": (source, False), "metacore.analysis": ("", True),
               "metacore.analysis.plots": ("", False)}
    problems = upward_imports(sources)
    assert problems == ["metacore.core.runner:{} (interfaces) imports metacore.analysis.plots (analysis)".format(
        source.count("\n"))]


def test_type_checking_imports_and_downward_ones_pass():
    source = ("from typing import TYPE_CHECKING\nfrom metacore.core.errors import UsageError\n"
              "if TYPE_CHECKING:\n    from metacore.analysis.plots import x\n")
    sources = {"metacore.core.trainer": (source, False), "metacore.core.errors": ("", False),
               "metacore.analysis.plots": ("", False)}
    assert upward_imports(sources) == []
