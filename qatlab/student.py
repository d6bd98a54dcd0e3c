"""Student copies of the notebooks: every solution block replaced by a stub, as nbgrader does.

Students: ``make lab`` runs ``python -m qatlab.student --out student --keep`` and opens
JupyterLab on ``student/``. ``--keep`` never overwrites a copy that is already there (it
holds the student's work); delete a copy to get a fresh one.

Teachers (README "For teachers"): ``make student`` or
``python -m qatlab.student [--out build/student] [notebooks...]`` writes
``build/student/<notebook>.ipynb`` for every ``notebooks/*.ipynb``.

The glossary the notebooks link to (``notebooks/glossary.md``) is copied beside the copies.

In each code cell, every block from a ``### BEGIN SOLUTION`` line to its
``### END SOLUTION`` line becomes two lines at the indentation of the BEGIN line::

    # YOUR CODE HERE
    raise NotImplementedError()

A block at the top level of a cell that defines names a later cell uses keeps those
names, so the student knows what to define and a check cell never meets a NameError:
``k = 109`` becomes ``k = None  # replace None with your answer``, and a ``def`` keeps
its signature (and docstring) with ``raise NotImplementedError()`` as its body.

In a cell marked ``nbgrader.solution``, an ``import`` that only the solution used
(nothing left in the copy refers to the name it binds) is dropped: it would hint at
the answer (``import itertools`` above a search over subsets).

Outputs and execution counts are cleared; nothing else changes (metadata, the
nbgrader markup and every other line stay as they are), so the instructor
notebooks also work directly with ``nbgrader generate_assignment``.
"""

import argparse
import ast
import copy
import sys
from pathlib import Path

from .files import atomic_path, build_dir, repo_root

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")


class SolutionMarkupError(ValueError):
    """A malformed solution block; the message names the notebook and the cell."""


def strip_solutions(source, where="cell"):
    """Return ``(student_source, n_blocks)``: each solution block replaced by the stub.

    ``where`` names the cell in error messages. The stub keeps the BEGIN line's
    indentation, so the code around it stays valid:

    >>> src = "def f(x):\\n    ### BEGIN SOLUTION\\n    return 2 * x\\n    ### END SOLUTION\\n"
    >>> out, n = strip_solutions(src)
    >>> print(out)
    def f(x):
        # YOUR CODE HERE
        raise NotImplementedError()
    <BLANKLINE>
    >>> n
    1
    """
    if not isinstance(source, str):
        raise TypeError(f"{where}: source must be a str, got {type(source).__name__}")
    out, begin_line, n_blocks, block, indent = [], None, 0, [], ""
    lines = source.split("\n")
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text.startswith(BEGIN):
            if begin_line is not None:
                raise SolutionMarkupError(
                    f"{where}: line {number} opens a solution block inside the one opened at "
                    f"line {begin_line} (nested {BEGIN!r}; close the first with {END!r})")
            begin_line, block = number, []
            indent = line[: len(line) - len(line.lstrip())]
        elif text.startswith(END):
            if begin_line is None:
                raise SolutionMarkupError(
                    f"{where}: line {number} has {END!r} without a {BEGIN!r} before it")
            out.extend(_stub(block, indent))
            begin_line = None
            n_blocks += 1
        elif begin_line is None:
            out.append(line)
        else:
            block.append(line)
    if begin_line is not None:
        raise SolutionMarkupError(
            f"{where}: the solution block opened at line {begin_line} has no {END!r}")
    return "\n".join(out), n_blocks


def _stub(block, indent):
    """The stub lines for one solution block (its lines without the markers) at ``indent``.

    At the top level of a cell the names the block defines survive: an assignment as
    ``name = None  # replace None with your answer``, a function as its signature and
    docstring with ``raise NotImplementedError()`` as its body. Inside a function or a
    class method the names are local, and the plain stub replaces the block.
    """
    stub = [indent + line for line in STUB]
    if indent:
        return stub
    try:
        tree = ast.parse("\n".join(block))
    except SyntaxError:
        return stub
    keep, seen = [], set()
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and name.id not in seen:
                        seen.add(name.id)
                        keep.append(f"{name.id} = None  # replace None with your answer")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            header = block[node.lineno - 1: node.body[0].lineno - 1]
            first = node.body[0]
            doc = (block[first.lineno - 1: first.end_lineno]
                   if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                   and isinstance(first.value.value, str) else [])
            body_indent = block[first.lineno - 1][: len(block[first.lineno - 1])
                                                   - len(block[first.lineno - 1].lstrip())]
            if node.decorator_list or not header:
                continue
            keep.extend(header + doc + [body_indent + line for line in STUB])
    if not keep:
        return stub
    if any(line.startswith("def ") or line.startswith("async def ") for line in keep):
        return [STUB[0]] + keep
    return [STUB[0]] + keep + [STUB[1]]


def _bound_names(tree):
    """Names an import statement in ``tree``'s top level binds, as ``{name: node}``."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                out.setdefault((alias.asname or alias.name).split(".")[0], []).append(node)
    return out


def _used_names(source):
    """Every name read anywhere in ``source`` (IPython magics turned into Python first)."""
    try:
        tree = ast.parse(_as_python(source))
    except SyntaxError:
        return None
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _as_python(source):
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def _drop_answer_imports(source, used_elsewhere):
    """``source`` without the top-level imports whose names neither it nor another cell reads."""
    try:
        tree = ast.parse(_as_python(source))
    except SyntaxError:
        return source
    used = _used_names(source) | used_elsewhere
    drop = set()
    for name, nodes in _bound_names(tree).items():
        if name in used:
            continue
        for node in nodes:
            if all((alias.asname or alias.name).split(".")[0] not in used for alias in node.names):
                drop.add(node.lineno)
    if not drop:
        return source
    lines = source.split("\n")
    text = "\n".join(line for number, line in enumerate(lines, start=1) if number not in drop)
    # an import at the top goes with the blank lines that separated it from the code below
    return text.lstrip("\n") if 1 in drop else text


def _is_solution_cell(cell):
    return bool(cell.get("metadata", {}).get("nbgrader", {}).get("solution"))


def make_student_notebook(nb, name="notebook"):
    """Return a student copy of the nbformat notebook ``nb`` (``nb`` is not modified).

    Solution blocks in code cells become stubs, code outputs and execution
    counts are cleared. A cell marked ``nbgrader.solution = true`` must hold at
    least one solution block: otherwise the whole answer would be handed out.
    """
    student = copy.deepcopy(nb)
    for index, cell in enumerate(student.cells):
        if cell.cell_type != "code":
            continue
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        where = f"{name}: cell {index}" + (f" ({grade_id})" if grade_id else "")
        cell.source, n_blocks = strip_solutions(cell.source, where)
        if _is_solution_cell(cell) and n_blocks == 0:
            raise SolutionMarkupError(
                f"{where} is marked nbgrader solution=true but has no {BEGIN!r} … {END!r} block")
        cell.outputs = []
        cell.execution_count = None
    for index, cell in enumerate(student.cells):
        if cell.cell_type == "code" and _is_solution_cell(cell):
            elsewhere = set()
            for other_index, other in enumerate(student.cells):
                if other.cell_type == "code" and other_index != index:
                    used = _used_names(other.source)
                    if used is None:  # a cell we cannot read might use the import: keep them all
                        break
                    elsewhere |= used
            else:
                cell.source = _drop_answer_imports(cell.source, elsewhere)
    return student


def write_student_notebooks(notebooks=None, out=None, keep_existing=False):
    """Write a student copy of each notebook into ``out``; return the written paths.

    ``notebooks`` defaults to every ``notebooks/*.ipynb`` of the checkout and
    ``out`` to ``build/student``. Every file is written atomically, and all
    notebooks are transformed before the first one is written, so a malformed
    block anywhere leaves ``out`` untouched. With ``keep_existing``, a copy that
    already exists in ``out`` is left as it is (it may hold a student's answers).
    The ``glossary.md`` beside the notebooks, which they link to, is copied too
    (also kept when it exists and ``keep_existing`` is set).
    """
    import nbformat

    if notebooks is None:
        notebooks = sorted((repo_root() / "notebooks").glob("*.ipynb"))
        if not notebooks:
            raise FileNotFoundError(f"no notebooks found in {repo_root() / 'notebooks'}")
    out = Path(out) if out is not None else build_dir() / "student"
    copies, sources = [], set()
    for path in map(Path, notebooks):
        if path.suffix != ".ipynb" or not path.is_file():
            raise ValueError(f"not a notebook file: {str(path)!r}")
        nb = nbformat.read(path, as_version=4)
        copies.append((out / path.name, make_student_notebook(nb, path.name)))
        sources.add(path.parent)
    written = []
    for target, nb in copies:
        if keep_existing and target.exists():
            continue
        with atomic_path(target) as tmp:
            nbformat.write(nb, tmp)
        written.append(target)
    for folder in sorted(sources):
        glossary = folder / "glossary.md"
        target = out / glossary.name
        if glossary.is_file() and not (keep_existing and target.exists()):
            with atomic_path(target) as tmp:
                tmp.write_bytes(glossary.read_bytes())
            written.append(target)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m qatlab.student",
        description="Write student copies of the notebooks (solution blocks replaced by stubs).")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: build/student)")
    parser.add_argument("--keep", action="store_true",
                        help="leave copies that already exist untouched (they hold your work)")
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to convert (default: notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    try:
        written = write_student_notebooks(args.notebooks or None, args.out, keep_existing=args.keep)
    except (SolutionMarkupError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if args.keep:
        out = args.out or build_dir() / "student"
        kept = sorted(set(Path(out).glob("*.ipynb")) - set(written))
        if kept:
            print(f"kept {len(kept)} existing copies in {out} (your work); delete one to get it fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
