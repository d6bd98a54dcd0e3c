"""Shared fixtures.

Every notebook run of a session shares the cached baselines (the SmallCNN of notebook 00,
TinyMobileNet, TinyViT, ResNet-20, the byte-level Llama): each is trained once, by the first
run that needs it, and reused by the papermill runs, the student copies and nbval alike. They
live in ``checkpoints/`` of the session's build folder, ``$QATLAB_BUILD`` when it is set
(``make test`` sets ``build/test``, where nbval's kernels write too), else a scratch one. Two
test workers (``make test`` runs pytest-xdist) that need the same missing baseline take turns
on a file lock (:func:`qatlab.files.locked`): one trains it, the other loads it.

The papermill runs write everything else (executed copies, results, artifacts, runs of
``train_qat``) into ``papermill/`` of that folder, the student copies into ``student/`` and the
JupyterLab test into ``browser/`` (:func:`own_build`), apart from nbval's kernels, which may run
the same notebook at the same moment in the other worker. A cheaper pretraining asked for by
a test gets a checkpoint file of its own (:func:`qatlab.lm.checkpoint_path`)."""

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture
def one_thread():
    """torch at one thread for the test (exports and lowerings gain nothing from a second), restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def notebook_build(tmp_path_factory):
    shared = os.environ.get("QATLAB_BUILD")
    if shared:
        path = Path(shared).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("build")


def own_build(notebook_build, name):
    """``<build>/<name>``: a build folder of its own (results, executed copies, artifacts) whose
    ``checkpoints`` is a link to the session's shared one. Kernels that run a notebook while nbval
    runs the same notebook in the other worker must not share ``results/<notebook>.json``: each
    kernel's ``begin_notebook`` starts that file afresh, and the other kernel's summary then reads a
    file without its own records (seen in CI: a KeyError in 09's summary cell)."""
    path = notebook_build / name
    path.mkdir(exist_ok=True)
    (notebook_build / "checkpoints").mkdir(exist_ok=True)
    link = path / "checkpoints"
    try:
        link.symlink_to(notebook_build / "checkpoints", target_is_directory=True)
    except FileExistsError:  # made by an earlier session, or by the other worker a moment ago
        pass
    return path


@pytest.fixture(scope="session")
def papermill_build(notebook_build):
    """``<build>/papermill``: the papermill runs' own build folder (:func:`own_build`)."""
    return own_build(notebook_build, "papermill")


@pytest.fixture(scope="session")
def student_build(notebook_build):
    """``<build>/student``: the student copies' own build folder (:func:`own_build`)."""
    return own_build(notebook_build, "student")


@pytest.fixture(scope="session")
def browser_build(notebook_build):
    """``<build>/browser``: the JupyterLab test's own build folder (:func:`own_build`)."""
    return own_build(notebook_build, "browser")


@pytest.fixture(scope="session")
def run_notebook(papermill_build):
    """``run_notebook(stem, **params) -> dict`` of the metrics that run recorded.

    Executes ``notebooks/<stem>.ipynb`` with papermill and the given parameters with
    ``QATLAB_BUILD`` set to :func:`papermill_build`, and returns its
    ``results/<stem>.json`` plus ``seconds``.
    """
    from qatlab.runner import execute

    def run(stem, **params):
        out_dir = papermill_build / "executed"
        out_dir.mkdir(parents=True, exist_ok=True)
        old = os.environ.get("QATLAB_BUILD")
        os.environ["QATLAB_BUILD"] = str(papermill_build)
        try:
            # the path of `make run`: per-cell and per-notebook time limits, no kernel left behind
            _, seconds = execute(NOTEBOOKS / f"{stem}.ipynb", out_dir, params)
        finally:
            if old is None:
                os.environ.pop("QATLAB_BUILD")
            else:
                os.environ["QATLAB_BUILD"] = old
        results = json.loads((papermill_build / "results" / f"{stem}.json").read_text())
        results["seconds"] = seconds
        print(f"{stem} {params}: {results}")
        assert_verdicts_agree(out_dir / f"{stem}.ipynb")
        return results

    return run


def assert_verdicts_agree(path):
    """Every verdict this executed notebook printed agrees with the numbers printed beside it
    (``test_prose.verdict_contradictions``): checked on each papermill run as it ends."""
    import nbformat
    from test_prose import _outputs_text, verdict_contradictions

    nb = nbformat.read(path, as_version=4)
    problems = [f"{path.name} cell {i}: {p}" for i, text in _outputs_text(nb) for p in verdict_contradictions(text)]
    assert not problems, "printed verdicts contradict their numbers:\n" + "\n".join(problems)


def pytest_collection_modifyitems(config, items):
    """Run notebook 00's papermill test first: it trains the baseline checkpoint in the
    shared scratch build folder, which every later notebook test then reuses."""
    items.sort(key=lambda item: 0 if "test_nb00_papermill" in item.nodeid else 1)


def pytest_configure(config):
    """Kernels that nbval and papermill start here are headless: no front end draws widgets
    (qatlab.interactive draws each explorer once instead). The browser test unsets it.

    With ``QATLAB_THREADS`` set (``make test`` sets 1: one torch thread per xdist worker, so two
    workers on two cores do not fight over them), this process uses that many torch threads
    too, as the kernels it starts do (:func:`qatlab.set_threads`)."""
    os.environ["QATLAB_HEADLESS"] = "1"
    if os.environ.get("QATLAB_THREADS"):
        from qatlab.threads import set_threads

        set_threads()


# --- nbval: the same time limits as `make run` (qatlab.runner.time_limits) ------------------------

_nbval_started = {}
NBVAL_OUTPUT_TIMEOUT = 60   # seconds nbval waits for each output message once a cell has replied


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
    # After a cell's reply, nbval reads the kernel's output messages with a fixed 5 s timeout per
    # message (nbval 0.11, IPyNbCell.output_timeout) and fails the cell when one is late. On a busy
    # machine the kernel's iopub thread can lag that much behind its reply (seen in CI: "Timeout of 5
    # seconds exceeded waiting for output" after a plotting cell whose work had finished). A kernel that
    # never sends its output is still caught, NBVAL_OUTPUT_TIMEOUT seconds later.
    item.output_timeout = max(getattr(item, "output_timeout", 0), NBVAL_OUTPUT_TIMEOUT)


def pytest_sessionfinish(session, exitstatus):
    """No kernel process outlives the test session, whatever failed."""
    from qatlab.runner import reap_kernels

    killed = reap_kernels()
    if killed:
        print(f"\nconftest: killed {len(killed)} kernel process(es) left behind: {killed}")
