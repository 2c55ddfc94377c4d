"""The package's layering (docs/architecture.md §1), checked on the source with ``ast``.

Every module under ``src/cxr_explain`` is parsed and each ``import`` / ``from ... import`` (also
those inside functions) is resolved to a module of the package. Units are the subpackages
(``data``, ``models``, ``attribution``, ``metrics``, ``results``, ``evaluation``, ``report``,
``training``, ``batch``) and the top-level modules (``errors``, ``runtime``, ``progress``, ``api``,
``commands``, ``demo``, ``cli``). The checks: a unit imports only units of a lower layer (``errors`` is free to all);
evaluation and report, the two readers / writers of a results folder, do not import each other;
nothing but the CLI imports the trainer; there is no import circle between units; and no module
imports a leading-underscore name (or reads one as an attribute of an imported module) from
another module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "cxr_explain"

#: Layer of each unit; a unit may import units of a strictly lower layer (and itself).
LAYER = {
    "errors": 0, "runtime": 0, "progress": 0,
    "__init__": 0,  # the package root: __version__, errors, a lazy API table
    "data": 1,
    "models": 2,
    "attribution": 3,
    "metrics": 4,
    "results": 5,
    "evaluation": 6, "report": 6, "training": 6,
    "api": 7, "demo": 7,
    "commands": 8, "batch": 8,
    "cli": 9,
}
#: The only units allowed to import the trainer.
MAY_IMPORT_TRAINING = {"cli", "training"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / PKG).rglob("*.py")):
        rel = p.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name a ``from`` import refers to."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` of every import of ``module`` inside the package."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == PKG]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] == PKG:
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


def _edges() -> dict[str, set[tuple[str, str, int]]]:
    """Unit -> {(imported unit, importing module, line)} over every import of the package."""
    edges: dict[str, set] = {}
    for module in MODULES:
        for target, names, line in _imports(module):
            targets = [target]
            # ``from cxr_explain import training`` / ``from . import x`` import submodules
            targets += [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for t in targets:
                u, v = _unit(module), _unit(t) if t != PKG else "__init__"
                if u != v:
                    edges.setdefault(u, set()).add((v, module, line))
    return edges


EDGES = _edges()


def test_every_module_has_a_layer():
    assert len(MODULES) > 50
    assert {_unit(m) for m in MODULES} <= set(LAYER), {_unit(m) for m in MODULES} - set(LAYER)


def test_imports_go_down_the_layers():
    bad = [f"{mod}:{line} ({u} imports {v})" for u, es in EDGES.items() for v, mod, line in es
           if v != "errors" and LAYER[v] >= LAYER[u]]
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_evaluation_and_report_do_not_know_each_other():
    bad = [f"{mod}:{line}" for u, es in EDGES.items() for v, mod, line in es
           if {u, v} == {"evaluation", "report"}]
    assert not bad, bad


def test_only_the_cli_imports_the_trainer():
    bad = [f"{mod}:{line} ({u})" for u, es in EDGES.items() for v, mod, line in es
           if v == "training" and u not in MAY_IMPORT_TRAINING]
    assert not bad, bad
    # the CLI does so lazily, by module name, only for the train / auroc commands
    cli_edges = {v for v, _, _ in EDGES.get("cli", set())}
    assert "training" not in cli_edges


def test_no_import_circle_between_units():
    graph = {u: {v for v, _, _ in es} for u, es in EDGES.items()}
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in graph.get(u, ()):
            if state.get(v) == 1:
                pytest.fail("import circle: " + " -> ".join(path + [u, v]))
            if not state.get(v):
                visit(v, path + [u])
        state[u] = 2

    for u in list(graph):
        if not state.get(u):
            visit(u, [])


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                if target.split(".")[0] != PKG or target == module:
                    continue
                for a in node.names:
                    if f"{target}.{a.name}" in MODULES:
                        module_aliases.add(a.asname or a.name)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{module}:{node.lineno} imports {target}.{a.name}")
                if any(p.startswith("_") and not p.startswith("__") for p in target.split(".")):
                    bad.append(f"{module}:{node.lineno} imports from private module {target}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == PKG and a.asname:
                        module_aliases.add(a.asname)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{module}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """The resolver sees relative, nested and function-level imports (so the checks above are not vacuous)."""
    runner = "cxr_explain.evaluation.runner"
    targets = {t for t, _, _ in _imports(runner)}
    assert {"cxr_explain.results.store", "cxr_explain.attribution", "cxr_explain.runtime"} <= targets
    assert ("results", runner) in {(v, m) for v, m, _ in EDGES["evaluation"]}
    demo = {t for t, _, _ in _imports("cxr_explain.demo")}  # imports inside demo()
    assert "cxr_explain.report.html" in demo and "cxr_explain.evaluation" in demo
    node = ast.parse("from ..report import html").body[0]
    assert _resolve("cxr_explain.evaluation.runner", node) == "cxr_explain.report"
    assert _resolve("cxr_explain.evaluation", ast.parse("from .runner import x").body[0]) == \
        "cxr_explain.evaluation.runner"
