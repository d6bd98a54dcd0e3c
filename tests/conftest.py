"""Shared fixtures. Every notebook run of a session shares one build folder, so each cached
baseline (the SmallCNN of notebook 00, TinyMobileNet, TinyViT, ResNet-20, the byte-level
Llama) is trained once, by the first run that needs it, and reused by the papermill runs,
the student copies and nbval alike. That folder is ``$QATLAB_BUILD`` when it is set
(``make test`` sets ``build/test``, where nbval's kernels write too), else a scratch one.
A cheaper pretraining asked for by a test gets a checkpoint file of its own
(:func:`qatlab.lm.checkpoint_path`), so it never replaces the default one."""

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(scope="session")
def notebook_build(tmp_path_factory):
    shared = os.environ.get("QATLAB_BUILD")
    if shared:
        path = Path(shared).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="session")
def run_notebook(notebook_build):
    """``run_notebook(stem, **params) -> dict`` of the metrics that run recorded.

    Executes ``notebooks/<stem>.ipynb`` with papermill and the given parameters
    into the session's scratch build folder, and returns
    ``build/results/<stem>.json`` plus ``seconds``.
    """
    from qatlab.runner import execute

    def run(stem, **params):
        out_dir = notebook_build / "executed"
        out_dir.mkdir(parents=True, exist_ok=True)
        old = os.environ.get("QATLAB_BUILD")
        os.environ["QATLAB_BUILD"] = str(notebook_build)
        try:
            # the path of `make run`: per-cell and per-notebook time limits, no kernel left behind
            _, seconds = execute(NOTEBOOKS / f"{stem}.ipynb", out_dir, params)
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


def pytest_configure(config):
    """Kernels that nbval and papermill start here are headless: no front end draws widgets
    (qatlab.interactive draws each explorer once instead). The browser test unsets it."""
    os.environ["QATLAB_HEADLESS"] = "1"


# --- nbval: the same time limits as `make run` (qatlab.runner.time_limits) ------------------------

_nbval_started = {}


def pytest_runtest_setup(item):
    """Give each nbval cell the smaller of the per-cell limit and what is left of its notebook's
    limit, so a hung kernel fails the cell (nbval names the notebook and the cell) instead of
    blocking the session; a notebook already past its limit fails at its next cell."""
    if type(item).__name__ != "IPyNbCell":
        return
    from qatlab.runner import time_limits

    cell_limit, nb_limit = time_limits()
    nb = str(item.fspath)
    first = _nbval_started.setdefault(nb, time.monotonic())
    left = nb_limit - (time.monotonic() - first)
    if left <= 0:
        pytest.fail(f"{Path(nb).name}: past its notebook limit of {nb_limit:g} s before {item.name}",
                    pytrace=False)
    item.config.option.nbval_cell_timeout = max(1, int(min(cell_limit, left)))


def pytest_sessionfinish(session, exitstatus):
    """No kernel process outlives the test session, whatever failed."""
    from qatlab.runner import reap_kernels

    killed = reap_kernels()
    if killed:
        print(f"\nconftest: killed {len(killed)} kernel process(es) left behind: {killed}")
