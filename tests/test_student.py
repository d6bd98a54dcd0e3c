"""Student copies (qatlab.student): the transformation on small synthetic notebooks, and
on every real notebook: valid nbformat, no solution text, nbgrader markup intact, and
executed, the copy stops with NotImplementedError at its first exercise.

Execution cost is bounded: each student copy is truncated right after its first
exercise (the first solution cell and the check cell that follows it) before it is
run, so only the cells a student runs before reaching that exercise are executed.
"""

import ast
import os
import re
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from qatlab import student
from qatlab.student import SolutionMarkupError, make_student_notebook, strip_solutions

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STUB = "# YOUR CODE HERE\nraise NotImplementedError()"


def nbgrader(cell):
    return cell.get("metadata", {}).get("nbgrader", {})


def solution_meta(grade_id):
    return {"nbgrader": {"grade": False, "grade_id": grade_id, "locked": False,
                         "schema_version": 3, "solution": True, "task": False}}


def check_meta(grade_id):
    return {"nbgrader": {"grade": True, "grade_id": grade_id, "locked": True, "points": 1,
                         "schema_version": 3, "solution": False, "task": False}}


# --- the transformation on synthetic sources -------------------------------------------

def test_block_at_top_level():
    out, n = strip_solutions("x = 1\n### BEGIN SOLUTION\ny = 2 * x\n### END SOLUTION\nprint(y)")
    assert n == 1
    # the name the block defined stays, so the code below it (a check) still finds it
    assert out == ("x = 1\n# YOUR CODE HERE\ny = None  # replace None with your answer\n"
                   "raise NotImplementedError()\nprint(y)")
    # a block of statements that defines nothing gets the plain stub
    assert strip_solutions("### BEGIN SOLUTION\nprint(1)\n### END SOLUTION")[0] == STUB


def test_nested_indentation_keeps_the_begin_lines_indent():
    src = ("class Q:\n"
           "    def f(self, x):\n"
           "        if x > 0:\n"
           "            ### BEGIN SOLUTION\n"
           "            y = x\n"
           "            return y\n"
           "            ### END SOLUTION\n"
           "        return 0\n")
    out, n = strip_solutions(src)
    assert n == 1
    assert out == ("class Q:\n"
                   "    def f(self, x):\n"
                   "        if x > 0:\n"
                   "            # YOUR CODE HERE\n"
                   "            raise NotImplementedError()\n"
                   "        return 0\n")
    ast.parse(out)


def test_several_blocks_per_cell():
    src = ("def a(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\n"
           "def b(x):\n\t### BEGIN SOLUTION\n\treturn x - 1\n\t### END SOLUTION\n")
    out, n = strip_solutions(src)
    assert n == 2
    assert "x + 1" not in out and "x - 1" not in out
    assert out.count("raise NotImplementedError()") == 2
    assert "\n\t# YOUR CODE HERE\n\traise NotImplementedError()\n" in out
    ast.parse(out)


def test_source_without_blocks_is_unchanged():
    src = "print('### not a block')\n# BEGIN SOLUTION without the three hashes\n"
    assert strip_solutions(src) == (src, 0)


@pytest.mark.parametrize("src, message", [
    ("### BEGIN SOLUTION\nx = 1\n", r"nb\.ipynb: cell 3: the solution block opened at line 1 has no '### END SOLUTION'"),
    ("x = 1\n### END SOLUTION\n", r"nb\.ipynb: cell 3: line 2 has '### END SOLUTION' without a '### BEGIN SOLUTION'"),
    ("### BEGIN SOLUTION\n  ### BEGIN SOLUTION\n### END SOLUTION\n", r"line 2 opens a solution block inside the one opened at line 1"),
])
def test_malformed_block_names_notebook_and_cell(src, message):
    with pytest.raises(SolutionMarkupError, match=message):
        strip_solutions(src, where="nb.ipynb: cell 3")


def synthetic_notebook():
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        new_markdown_cell("# 99 · Synthetic\n*One line.*\n\n### BEGIN SOLUTION stays in markdown"),
        new_code_cell("import math", execution_count=3,
                      outputs=[nbformat.v4.new_output("stream", text="hi\n")]),
        new_code_cell("def area(r):\n    ### BEGIN SOLUTION\n    return math.pi * r ** 2\n    ### END SOLUTION",
                      metadata=solution_meta("ex99_area")),
        new_code_cell("assert area(1) == math.pi", metadata=check_meta("ex99_area_check")),
    ]
    return nb


def test_student_notebook_clears_outputs_and_changes_nothing_else():
    nb = synthetic_notebook()
    before = nbformat.writes(nb)
    out = make_student_notebook(nb, "99_synthetic.ipynb")
    assert nbformat.writes(nb) == before, "the instructor notebook must not be modified"
    nbformat.validate(out)
    assert out.cells[0] == nb.cells[0]  # markdown untouched, even a BEGIN line in it
    assert out.cells[1].outputs == [] and out.cells[1].execution_count is None
    assert out.cells[1].source == nb.cells[1].source
    assert out.cells[2].source == "def area(r):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    assert out.cells[2].metadata == nb.cells[2].metadata
    assert out.cells[3] == nb.cells[3]
    assert out.metadata == nb.metadata


def test_solution_cell_without_block_is_an_error():
    nb = synthetic_notebook()
    nb.cells[2].source = "def area(r):\n    return math.pi * r ** 2"
    with pytest.raises(SolutionMarkupError, match=r"99_x\.ipynb: cell 2 \(ex99_area\) is marked nbgrader solution=true"):
        make_student_notebook(nb, "99_x.ipynb")


def test_malformed_notebook_error_names_cell_and_writes_nothing(tmp_path):
    good, bad = synthetic_notebook(), synthetic_notebook()
    bad.cells[2].source = bad.cells[2].source.replace("    ### END SOLUTION", "")
    nbformat.write(good, tmp_path / "01_good.ipynb")
    nbformat.write(bad, tmp_path / "02_bad.ipynb")
    out = tmp_path / "student"
    with pytest.raises(SolutionMarkupError, match=r"02_bad\.ipynb: cell 2 \(ex99_area\): the solution block opened at line 2"):
        student.write_student_notebooks([tmp_path / "01_good.ipynb", tmp_path / "02_bad.ipynb"], out)
    assert not out.exists() or not list(out.iterdir())
    # the command line reports it and exits non-zero
    assert student.main(["--out", str(out), str(tmp_path / "02_bad.ipynb")]) == 1


def test_command_line_writes_copies(tmp_path, capsys):
    nbformat.write(synthetic_notebook(), tmp_path / "99_synthetic.ipynb")
    out = tmp_path / "student"
    assert student.main(["--out", str(out), str(tmp_path / "99_synthetic.ipynb")]) == 0
    assert f"wrote {out / '99_synthetic.ipynb'}" in capsys.readouterr().out
    copy = nbformat.read(out / "99_synthetic.ipynb", as_version=4)
    assert "math.pi * r ** 2" not in copy.cells[2].source
    assert [p.name for p in out.iterdir()] == ["99_synthetic.ipynb"]  # no temp files left


# --- every real notebook ----------------------------------------------------------------

needs_notebooks = pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks/*.ipynb yet")


@pytest.fixture(scope="module")
def student_copies(tmp_path_factory):
    """{name: (instructor nb, student nb)} written by the real command into a scratch folder."""
    out = tmp_path_factory.mktemp("student")
    assert student.main(["--out", str(out)]) == 0
    return {path.name: (nbformat.read(path, as_version=4), nbformat.read(out / path.name, as_version=4))
            for path in NOTEBOOKS}


def solution_only_lines(nb):
    """Stripped lines found strictly inside solution blocks and nowhere else in ``nb``."""
    inside, outside = set(), set()
    for cell in nb.cells:
        in_block = False
        for line in cell.source.split("\n"):
            text = line.strip()
            if cell.cell_type == "code" and text.startswith(student.BEGIN):
                in_block = True
            elif cell.cell_type == "code" and text.startswith(student.END):
                in_block = False
            elif text:
                (inside if in_block else outside).add(text)
    return inside - outside


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_student_copy_is_valid_and_has_no_solution_text(student_copies, path):
    instructor, copy = student_copies[path.name]
    nbformat.validate(copy)
    secret = solution_only_lines(instructor)
    student_lines = {line.strip() for cell in copy.cells for line in cell.source.split("\n")}
    leaked = secret & student_lines
    assert not leaked, f"{path.name}: solution lines left in the student copy: {sorted(leaked)}"
    assert len(copy.cells) == len(instructor.cells)
    for i, (a, b) in enumerate(zip(instructor.cells, copy.cells)):
        assert a.metadata == b.metadata, f"{path.name} cell {i}: metadata changed"
        if b.cell_type == "code":
            assert b.outputs == [] and b.execution_count is None
            if nbgrader(a).get("solution"):
                assert "raise NotImplementedError()" in b.source
            # every student cell still parses (IPython magics turned into Python first)
            ast.parse(TransformerManager().transform_cell(b.source), filename=f"{path.name} cell {i}")
        else:
            assert a == b


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_instructor_notebook_has_nbgrader_markup_and_a_check_after_each_solution(path):
    import qatlab.exercises

    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    grade_ids = [nbgrader(c)["grade_id"] for c in cells if nbgrader(c)]
    assert len(grade_ids) == len(set(grade_ids)), f"{path.name}: duplicate nbgrader grade_id {grade_ids}"
    for i, cell in enumerate(cells):
        meta = nbgrader(cell)
        if not meta.get("solution"):
            continue
        assert cell.cell_type == "code" and meta.get("schema_version") == 3 and meta.get("grade_id")
        following = [c for c in cells[i + 1:] if c.cell_type == "code"]
        assert following, f"{path.name} cell {i} ({meta['grade_id']}): no check cell after it"
        check = following[0]
        check_meta_ = nbgrader(check)
        assert check_meta_.get("grade") and check_meta_.get("locked") and check_meta_.get("points"), \
            f"{path.name} cell {i} ({meta['grade_id']}): the next code cell is not a locked, graded nbgrader cell"
        calls = re.findall(r"qatlab\.exercises\.(check_\w+)\s*\(", check.source)
        assert calls, f"{path.name} cell {i} ({meta['grade_id']}): its check cell calls no qatlab.exercises.check_*"
        for name in calls:
            assert callable(getattr(qatlab.exercises, name)), f"{path.name}: {name} is not in qatlab.exercises"


def first_exercise(nb):
    """Index of the first nbgrader solution cell, or None."""
    return next((i for i, c in enumerate(nb.cells) if nbgrader(c).get("solution")), None)


EXERCISE_NOTEBOOKS = [p for p in NOTEBOOKS if first_exercise(nbformat.read(p, as_version=4)) is not None]


def run_until_first_exercise(nb, build, cwd):
    """Execute ``nb`` truncated after its first exercise; return (first, check, errors).

    ``first`` is the first solution cell, ``check`` the code cell after it, and
    ``errors`` the (cell index, error output) pairs in cell order.
    """
    from nbclient import NotebookClient

    first = first_exercise(nb)
    check = next(i for i in range(first + 1, len(nb.cells)) if nb.cells[i].cell_type == "code")
    nb.cells = nb.cells[: check + 1]  # bounded cost: nothing after the first exercise runs
    env = {"QATLAB_BUILD": str(build),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    return first, check, errors


def assert_stops_at_first_exercise(name, first, check, errors):
    assert errors, f"{name}: the student copy ran its first exercise without an error"
    index, error = errors[0]
    assert error.ename == "NotImplementedError", \
        f"{name} cell {index}: first error is {error.ename}: {error.evalue}, not NotImplementedError"
    assert index in (first, check), \
        f"{name}: NotImplementedError in cell {index}, but the first exercise is cell {first} (check cell {check})"


@pytest.mark.notebook  # starts two kernels: a few seconds
def test_synthetic_student_copy_stops_at_its_exercise(tmp_path):
    nb = synthetic_notebook()
    nb.cells.append(new_code_cell("raise RuntimeError('must not run: after the first exercise')"))
    copy = make_student_notebook(nb, "99_synthetic.ipynb")
    first, check, errors = run_until_first_exercise(copy, tmp_path, tmp_path)
    assert (first, check) == (2, 3) and len(copy.cells) == 4
    assert_stops_at_first_exercise("99_synthetic", first, check, errors)
    assert errors[0][0] == 3  # area() is only defined in cell 2; the check cell calls it
    # and the assertion can fail: an earlier broken cell is reported as such
    nb.cells[1].source = "1 / 0"
    first, check, errors = run_until_first_exercise(make_student_notebook(nb), tmp_path, tmp_path)
    with pytest.raises(AssertionError, match="cell 1: first error is ZeroDivisionError"):
        assert_stops_at_first_exercise("99_synthetic", first, check, errors)


@pytest.mark.notebook
@pytest.mark.skipif(not EXERCISE_NOTEBOOKS, reason="no notebook with exercises yet")
@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=[p.stem for p in EXERCISE_NOTEBOOKS])
def test_student_copy_stops_at_its_first_exercise(student_copies, student_build, path):
    """Run the student copy up to its first exercise: the first error is NotImplementedError,
    raised by the first solution cell itself or, when that cell only defines the function,
    by the check cell right after it (which calls it). Nothing before it fails."""
    _, nb = student_copies[path.name]
    first, check, errors = run_until_first_exercise(nb, student_build, ROOT / "notebooks")
    assert_stops_at_first_exercise(path.name, first, check, errors)


def test_keep_never_overwrites_a_students_work_and_the_glossary_comes_along(tmp_path, capsys):
    src = tmp_path / "notebooks"
    src.mkdir()
    nbformat.write(synthetic_notebook(), src / "99_synthetic.ipynb")
    (src / "glossary.md").write_text('<a id="ptq"></a>\n## PTQ\n')
    out = tmp_path / "student"
    assert student.main(["--out", str(out), "--keep", str(src / "99_synthetic.ipynb")]) == 0
    assert (out / "glossary.md").read_text() == (src / "glossary.md").read_text()  # links resolve
    work = nbformat.read(out / "99_synthetic.ipynb", as_version=4)
    work.cells[2].source = "def area(r):\n    return math.pi * r * r  # my answer"
    nbformat.write(work, out / "99_synthetic.ipynb")
    capsys.readouterr()
    assert student.main(["--out", str(out), "--keep", str(src / "99_synthetic.ipynb")]) == 0
    assert "my answer" in nbformat.read(out / "99_synthetic.ipynb", as_version=4).cells[2].source
    assert "kept 1 existing copies" in capsys.readouterr().out
    # without --keep (the teachers' handout) the copy is regenerated
    assert student.main(["--out", str(out), str(src / "99_synthetic.ipynb")]) == 0
    assert "my answer" not in nbformat.read(out / "99_synthetic.ipynb", as_version=4).cells[2].source


def test_makefile_gives_students_a_lab_on_their_own_copies():
    makefile = (ROOT / "Makefile").read_text()
    lab = re.search(r"^lab: setup\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert lab, "make lab is missing"
    assert "qatlab.student --out student --keep" in lab[1] and "jupyter lab student/" in lab[1]
    assert re.search(r"^lab-instructor: setup\n\t.*jupyter lab notebooks/", makefile, flags=re.M)
    readme = (ROOT / "README.md").read_text()
    assert readme.index("Students start here") < readme.index("For teachers")
    assert "make lab" in readme.split("For teachers")[0]


# --- names: a check cell never meets a NameError in the student copy ---------------------

def module_bindings(tree):
    """Names a cell binds at module level (what later cells can use), statically."""
    names = set()

    def visit(node):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            for inner in ast.walk(node):  # `global x` inside a function binds x at module level
                if isinstance(inner, ast.Global):
                    names.update(inner.names)
            return
        if isinstance(node, ast.Lambda | ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
            for inner in ast.walk(node):  # only a walrus leaks out of a comprehension
                if isinstance(inner, ast.NamedExpr):
                    names.add(inner.target.id)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            names.add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            names.add(node.name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def names_read_before_bound(tree):
    """Names a cell reads that it does not bind itself anywhere (parameters, loop variables,
    comprehension targets and assignments in the cell all count as its own)."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            own.add(node.id)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            own.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            own.add(node.name)
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return read - own


IPYTHON_NAMES = {"get_ipython", "display", "In", "Out", "exit", "quit"}


def undefined_names_in_check_cells(nb):
    """``[(cell index, sorted names)]``: names a graded check cell reads that no earlier cell
    (nor the check cell itself, nor Python or IPython) defines."""
    import builtins

    defined = set(dir(builtins)) | IPYTHON_NAMES
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tree = ast.parse(TransformerManager().transform_cell(cell.source))
        meta = nbgrader(cell)
        if meta.get("grade") and not meta.get("solution"):
            missing = names_read_before_bound(tree) - defined
            if missing:
                problems.append((index, sorted(missing)))
        defined |= module_bindings(tree)
    return problems


def test_undefined_names_analysis_catches_a_removed_definition():
    """The stub of a top-level block keeps its names; a plain stub would not (05's k_within_10pct)."""
    nb = synthetic_notebook()
    nb.cells[2].source = ("def area(r):\n    ### BEGIN SOLUTION\n    return math.pi * r ** 2\n"
                          "    ### END SOLUTION\n\n\n### BEGIN SOLUTION\nr_min = 3  # a decision\n"
                          "### END SOLUTION")
    nb.cells[3].source = "assert check(area, r_min)"
    nb.cells.insert(1, new_code_cell("from mod import check"))
    assert undefined_names_in_check_cells(nb) == []
    copy = make_student_notebook(nb, "99_synthetic.ipynb")
    assert "r_min = None  # replace None with your answer" in copy.cells[3].source
    assert "3" not in copy.cells[3].source.split("r_min")[1].split("\n")[0]
    assert undefined_names_in_check_cells(copy) == []
    # the analysis does find a name that no cell defines
    copy.cells[3].source = copy.cells[3].source.replace("r_min = None", "other = None")
    assert undefined_names_in_check_cells(copy) == [(4, ["r_min"])]


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_check_cells_of_the_student_copy_read_only_defined_names(student_copies, path):
    instructor, copy = student_copies[path.name]
    assert undefined_names_in_check_cells(instructor) == [], "the instructor notebook itself"
    assert undefined_names_in_check_cells(copy) == [], \
        f"{path.name}: a check cell reads a name the student copy no longer defines"


def test_top_level_function_block_keeps_its_signature_and_docstring():
    src = ('### BEGIN SOLUTION\ndef f(x, n: int = 2):\n    """Doc of f."""\n    return x ** n\n'
           'best = f(3)\n### END SOLUTION\nprint(best)')
    out, n = strip_solutions(src)
    assert n == 1
    assert out == ('# YOUR CODE HERE\ndef f(x, n: int = 2):\n    """Doc of f."""\n'
                   '    # YOUR CODE HERE\n    raise NotImplementedError()\n'
                   'best = None  # replace None with your answer\nprint(best)')
    ast.parse(out)


def test_solution_cell_drops_imports_only_the_answer_used():
    nb = synthetic_notebook()
    nb.cells[2].source = ("import itertools\nimport math\n\n\ndef area(r):\n    ### BEGIN SOLUTION\n"
                          "    return max(itertools.chain([math.pi * r ** 2]))\n    ### END SOLUTION")
    copy = make_student_notebook(nb, "99_synthetic.ipynb")
    assert "itertools" not in copy.cells[2].source
    # math stays: cell 3 (the check) reads it
    assert copy.cells[2].source.startswith("import math\n\n\ndef area(r):")
    # an import that a later cell reads stays too
    nb.cells.append(new_code_cell("print(itertools.count)"))
    assert "import itertools" in make_student_notebook(nb).cells[2].source


@needs_notebooks
def test_notebook_06_copy_has_no_itertools_hint(student_copies):
    name = next((p.name for p in NOTEBOOKS if p.name.startswith("06_")), None)
    if name is None:
        pytest.skip("no notebook 06")
    _, copy = student_copies[name]
    for cell in copy.cells:
        if nbgrader(cell).get("solution"):
            assert "import itertools" not in cell.source
