"""scripts/stress_kernels: how it tells a hang from a slow cell, and where a run's time went."""

from importlib.machinery import SourceFileLoader
from pathlib import Path

import nbformat
import pytest

stress = SourceFileLoader("stress_kernels", str(Path(__file__).resolve().parents[1] / "scripts" / "stress_kernels")).load_module()


def test_classify_tells_a_lost_reply_a_lost_request_and_a_slow_cell():
    assert stress.classify(["iopub.status.busy", "iopub.execute_input", "iopub.status.idle"]) == "reply lost"
    assert stress.classify([]) == "request lost"
    assert stress.classify(["iopub.status.busy", "iopub.execute_input"]) == "slow"


def test_slowest_cell_and_time_in_cells(tmp_path):
    def cell(source, start, end):
        c = nbformat.v4.new_code_cell(source)
        c.metadata["execution"] = {"iopub.execute_input": f"2026-01-01T00:00:{start:06.3f}Z",
                                   "shell.execute_reply": f"2026-01-01T00:00:{end:06.3f}Z"}
        return c

    nb = nbformat.v4.new_notebook(cells=[cell("a = 1", 0, 0.5), nbformat.v4.new_markdown_cell("text"),
                                          cell("train()\nmore()", 1, 4), nbformat.v4.new_code_cell("never ran")])
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    seconds, index, first, total = stress.slowest_cell(path)
    assert (index, first) == (2, "train()")
    assert seconds == pytest.approx(3.0) and total == pytest.approx(3.5)
    assert stress.where_it_stopped(path)[0] == 3     # the first code cell without a reply
