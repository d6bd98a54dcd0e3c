"""Time limits of notebook execution (qatlab.runner): a hung cell fails with a message naming the
notebook, the cell and the limit, under papermill and under nbval, and no kernel is left behind."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from qatlab.runner import NotebookTimeoutError, _kernel_children, execute, time_limits

ROOT = Path(__file__).resolve().parents[1]


def _notebook(path, *sources):
    cells = [nbformat.v4.new_code_cell("seed = 0", metadata={"tags": ["parameters"]})]
    cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.notebook
def test_a_hung_cell_fails_with_its_notebook_cell_and_limit(tmp_path):
    nb = _notebook(tmp_path / "hang.ipynb", "x = 1", "import time\ntime.sleep(600)", "y = 2")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(NotebookTimeoutError, match=r"hang\.ipynb: cell 2 did not finish within the "
                                                   r"cell limit of 3 s"):
        execute(nb, out, {}, cell_timeout=3, notebook_timeout=300)
    assert _kernel_children() == []
    executed = nbformat.read(out / "hang.ipynb", as_version=4)
    assert "shell.execute_reply" in executed.cells[1].metadata["execution"]  # cell 1 finished


@pytest.mark.notebook
def test_the_notebook_limit_counts_every_cell(tmp_path):
    nb = _notebook(tmp_path / "slow.ipynb", "import time\ntime.sleep(4)", "time.sleep(4)", "time.sleep(600)")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(NotebookTimeoutError, match=r"slow\.ipynb: cell \d did not finish within the "
                                                   r"notebook limit of 6 s"):
        execute(nb, out, {}, cell_timeout=100, notebook_timeout=6)
    assert _kernel_children() == []


@pytest.mark.notebook
def test_nbval_gets_the_same_cell_limit(tmp_path):
    nb = _notebook(tmp_path / "hang.ipynb", "import time\ntime.sleep(600)")
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    env = {**os.environ, "QATLAB_CELL_TIMEOUT": "3", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider",
                        "-o", "addopts=", str(nb)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 1, r.stdout[-2000:]
    assert "hang.ipynb::Cell 1" in r.stdout and "Timeout of 3 seconds exceeded" in r.stdout, r.stdout[-3000:]
    assert _kernel_children() == []


@pytest.mark.parametrize("env, message", [({"QATLAB_CELL_TIMEOUT": "soon"}, "QATLAB_CELL_TIMEOUT"),
                                          ({"QATLAB_NOTEBOOK_TIMEOUT": "-5"}, "QATLAB_NOTEBOOK_TIMEOUT")])
def test_time_limits_from_the_environment_are_validated(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=f"{message} \\(environment\\) must be a positive number"):
        time_limits()


def test_time_limits_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("QATLAB_CELL_TIMEOUT", raising=False)
    monkeypatch.setenv("QATLAB_NOTEBOOK_TIMEOUT", "900")
    from qatlab.runner import CELL_TIMEOUT

    assert time_limits() == (CELL_TIMEOUT, 900.0)
    assert time_limits(10, 20) == (10.0, 20.0)


def test_nbval_waits_longer_than_5_s_for_a_busy_kernels_output(tmp_path):
    """nbval fails a cell whose output message is 5 s late (its fixed default); the conftest raises that wait."""
    import types

    import conftest

    class IPyNbCell:   # what the hook sees of nbval's item
        output_timeout = 5
        name = "Cell 0"
        fspath = tmp_path / "busy.ipynb"
        config = types.SimpleNamespace(option=types.SimpleNamespace(nbval_cell_timeout=2000))

    item = IPyNbCell()
    conftest.pytest_runtest_setup(item)
    assert item.output_timeout == conftest.NBVAL_OUTPUT_TIMEOUT >= 30
    assert 1 <= item.config.option.nbval_cell_timeout <= 2000


@pytest.mark.notebook
def test_notebooks_run_side_by_side_each_kernel_with_its_share_of_threads(tmp_path, monkeypatch, capsys):
    """``--jobs 2``: every notebook runs in a kernel of its own with CPUs // 2 threads; a failed and a
    timed-out notebook are reported by name while the others finish; no kernel is left behind."""
    from qatlab.runner import run_notebooks

    monkeypatch.delenv("QATLAB_THREADS", raising=False)
    record = "import os, pathlib\npathlib.Path(f'{name}.threads').write_text(os.environ.get('QATLAB_THREADS', ''))"
    nbs = [_notebook(tmp_path / "00_ok.ipynb", "name = '00_ok'", record),
           _notebook(tmp_path / "01_fails.ipynb", "raise RuntimeError('broken on purpose')"),
           _notebook(tmp_path / "02_hangs.ipynb", "import time\ntime.sleep(600)"),
           _notebook(tmp_path / "03_ok.ipynb", "name = '03_ok'", record)]
    out, html = tmp_path / "out", tmp_path / "html"
    out.mkdir()
    html.mkdir()
    seconds, cpu, failed = run_notebooks(nbs, out, html, {}, (5, 60), jobs=2)
    assert sorted(seconds) == ["00_ok", "03_ok"] and sorted(failed) == ["01_fails", "02_hangs"]
    assert all(s > 0 for s in seconds.values()) and all(c >= 0 for c in cpu.values())
    from qatlab.threads import available_cpus

    assert {(tmp_path / f"{n}.threads").read_text() for n in ("00_ok", "03_ok")} == {str(max(1, available_cpus() // 2))}
    printed = capsys.readouterr().out
    assert "4 notebook(s), 2 at a time" in printed
    assert "01_fails: FAILED: PapermillExecutionError" in printed
    assert "02_hangs: FAILED: NotebookTimeoutError: 02_hangs.ipynb: cell 1 did not finish within the cell limit of 5 s" \
        in printed
    assert (html / "00_ok.html").exists() and (out / "02_hangs.ipynb").exists()
    assert _kernel_children() == []
    assert "QATLAB_THREADS" not in os.environ   # set in the workers only


def test_jobs_and_threads_are_validated(monkeypatch):
    from qatlab.runner import default_jobs, main

    monkeypatch.setenv("QATLAB_JOBS", "many")
    with pytest.raises(ValueError, match="QATLAB_JOBS \\(environment\\) must be a positive integer, got 'many'"):
        default_jobs()
    monkeypatch.delenv("QATLAB_JOBS")
    with pytest.raises(SystemExit):
        main(["--jobs", "0", "--only", "00"])


@pytest.mark.notebook
def test_a_single_notebook_runs_alone_with_every_cpu(tmp_path, monkeypatch):
    """More jobs than notebooks: the one notebook runs in this process's way, its kernel choosing its own threads."""
    from qatlab.runner import run_notebooks

    monkeypatch.delenv("QATLAB_THREADS", raising=False)
    record = "import os, pathlib\npathlib.Path('alone.threads').write_text(os.environ.get('QATLAB_THREADS', 'unset'))"
    nb = _notebook(tmp_path / "00_alone.ipynb", record)
    (tmp_path / "out").mkdir()
    (tmp_path / "html").mkdir()
    seconds, _, failed = run_notebooks([nb], tmp_path / "out", tmp_path / "html", {}, (60, 120), jobs=4)
    assert list(seconds) == ["00_alone"] and failed == []
    assert (tmp_path / "alone.threads").read_text() == "unset"
