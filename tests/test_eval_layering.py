"""The evaluation modules import each other in one direction: tables at the bottom, report at the top, no circle."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_cellmae.evaluation

EVALUATION = Path(hf_cellmae.evaluation.__file__).parent
PACKAGE = "hf_cellmae.evaluation"


def _imported_siblings(path: Path, modules: set[str]) -> set[str]:
    """The modules of evaluation/ that ``path`` imports anywhere in its code, inside functions included."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [alias.name for alias in node.names]
            elif node.level == 2 and node.module and node.module.startswith("evaluation."):  # from ..evaluation.x
                names = [node.module.removeprefix("evaluation.")]
            elif node.level == 0 and node.module and node.module.startswith(PACKAGE + "."):
                names = [node.module.removeprefix(PACKAGE + ".")]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix(PACKAGE + ".") for a in node.names if a.name.startswith(PACKAGE + ".")]
        else:
            continue
        imported.update(name.split(".")[0] for name in names if name.split(".")[0] in modules)
    return imported - {path.stem}


def _import_graph() -> dict[str, set[str]]:
    files = {path.stem: path for path in EVALUATION.glob("*.py") if path.stem != "__init__"}
    return {name: _imported_siblings(path, set(files)) for name, path in files.items()}


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as a path ``[a, b, ..., a]``, or None."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node)
        if found:
            return found
    return None


def test_no_evaluation_module_imports_another_in_a_circle():
    cycle = _a_cycle(_import_graph())
    assert cycle is None, "evaluation/ imports in a circle: " + " -> ".join(cycle)


def test_tables_is_imported_by_report_suite_probe_and_imports_none_of_them():
    graph = _import_graph()
    for user in ("report", "suite", "probe", "profiles", "cells"):
        assert "tables" in graph[user], f"{user} does not read tables through evaluation/tables.py"
    assert not graph["tables"] & {"report", "suite", "probe", "profiles", "cells"}
    assert "report" not in graph["suite"] | graph["probe"]
    assert "suite" not in graph["probe"]


def test_the_check_sees_an_import_inside_a_function_and_finds_the_circle_it_closes(tmp_path):
    (tmp_path / "report.py").write_text("from .suite import evaluate_suite\n")
    (tmp_path / "suite.py").write_text(
        "def f():\n    from .report import split_table\n    import hf_cellmae.evaluation.tables\n"
    )
    (tmp_path / "tables.py").write_text("import numpy\n")
    modules = {"report", "suite", "tables"}
    graph = {name: _imported_siblings(tmp_path / f"{name}.py", modules) for name in modules}
    assert graph == {"report": {"suite"}, "suite": {"report", "tables"}, "tables": set()}
    assert _a_cycle(graph) == ["report", "suite", "report"]
    assert _a_cycle({"report": {"tables"}, "tables": set()}) is None
