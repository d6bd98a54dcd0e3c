"""Shared fixtures. Notebook runs share one scratch build folder per session, so the
baseline checkpoint is trained once (by notebook 00, or by the first notebook that
needs it) and reused."""

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(scope="session")
def notebook_build(tmp_path_factory):
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="session")
def run_notebook(notebook_build):
    """``run_notebook(stem, **params) -> dict`` of the metrics that run recorded.

    Executes ``notebooks/<stem>.ipynb`` with papermill and the given parameters
    into the session's scratch build folder, and returns
    ``build/results/<stem>.json`` plus ``seconds``.
    """
    import papermill as pm

    def run(stem, **params):
        out = notebook_build / "executed" / f"{stem}.ipynb"
        out.parent.mkdir(parents=True, exist_ok=True)
        old = os.environ.get("QATLAB_BUILD")
        os.environ["QATLAB_BUILD"] = str(notebook_build)
        try:
            start = time.time()
            pm.execute_notebook(str(NOTEBOOKS / f"{stem}.ipynb"), str(out), parameters=params,
                                cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
            seconds = time.time() - start
        finally:
            if old is None:
                os.environ.pop("QATLAB_BUILD")
            else:
                os.environ["QATLAB_BUILD"] = old
        results = json.loads((notebook_build / "results" / f"{stem}.json").read_text())
        results["seconds"] = seconds
        print(f"{stem} {params}: {results}")
        return results

    return run


def pytest_collection_modifyitems(config, items):
    """Run notebook 00's papermill test first: it trains the baseline checkpoint in the
    shared scratch build folder, which every later notebook test then reuses."""
    items.sort(key=lambda item: 0 if "test_nb00_papermill" in item.nodeid else 1)
