"""The notebooks' own reference solutions, for the exercise tests.

``solution(stem, grade_id)`` executes the code cell of ``notebooks/<stem>.ipynb`` whose
nbgrader ``grade_id`` is ``grade_id`` (the instructor version, solution blocks included),
after the top-level ``import`` statements of the cells before it, and returns the names it
defines. The checks are then run on exactly what the notebook runs.
"""

import ast
import functools
from pathlib import Path

import nbformat
from IPython.core.inputtransformer2 import TransformerManager

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _cells(stem):
    return nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4).cells


def solution_source(stem, grade_id):
    """The source of the cell with nbgrader ``grade_id`` in ``notebooks/<stem>.ipynb``."""
    for cell in _cells(stem):
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            return cell.source
    raise KeyError(f"{stem}: no cell with grade_id {grade_id!r}")


def solution(stem, grade_id):
    """``{name: value}`` defined by the solution cell ``grade_id`` of ``notebooks/<stem>.ipynb``."""
    namespace = {"__name__": f"notebook_{stem}"}
    for cell in _cells(stem):
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            exec(compile(cell.source, f"{stem}:{grade_id}", "exec"), namespace)  # noqa: S102
            return namespace
        if cell.cell_type != "code":
            continue
        tree = ast.parse(TransformerManager().transform_cell(cell.source))  # magics -> Python
        imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        if imports:
            exec(compile(ast.Module(body=imports, type_ignores=[]), stem, "exec"), namespace)  # noqa: S102
    raise KeyError(f"{stem}: no cell with grade_id {grade_id!r}")
