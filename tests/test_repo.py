"""Repository rules: notebooks stored clean, pins in sync, README's commands present."""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS][:1] == ["00"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs_and_has_parameters(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs; clear them before committing"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_header_and_bookends(path):
    nb = json.loads(path.read_text())
    first = "".join(nb["cells"][0]["source"])
    assert re.match(rf"# {path.name[:2]} · .+\n\*[^*]+\*", first), f"{path.name}: header/summary line"
    src = "".join("".join(c["source"]) for c in nb["cells"])
    assert f'qatlab.begin_notebook("{path.stem}")' in src


def _pins(lines):
    return {re.split("==", s)[0].strip().lower(): s.split("==")[1].strip()
            for s in lines if "==" in s}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py_pins = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = (ROOT / "environment.yml").read_text()
    env_pins = _pins(re.findall(r"^\s*-\s*([A-Za-z0-9_.\-]+==[^\s#]+)", env, flags=re.M))
    assert env_pins == py_pins
    assert re.search(r"^\s*-\s*python=3\.11\s*$", env, flags=re.M)
    assert project["requires-python"].startswith(">=3.11")
    for name in ("torch", "torchvision", "torchao", "executorch"):
        assert name in py_pins, f"{name} must be pinned"


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


def test_a_file_lock_makes_a_second_process_wait(tmp_path):
    """qatlab.files.locked: while one process holds the lock of a path, another blocks on it."""
    import subprocess
    import sys
    import time

    from qatlab.files import locked

    target = tmp_path / "baseline.pt"
    code = ("import sys, time; from qatlab.files import locked\n"
            f"t = time.monotonic()\nwith locked({str(target)!r}):\n    print(time.monotonic() - t)\n")
    with locked(target):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert child.poll() is None, "the second process did not wait for the lock"
    waited = float(child.communicate(timeout=60)[0])
    assert waited >= 1.0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_cell_has_its_own_stored_id(path):
    """nbformat 4.5 cells carry an ``id``; a cell stored without one gets a random id on every read,
    so the student copy (and any diff) of that notebook changes from run to run."""
    nb = json.loads(path.read_text())
    ids = [c.get("id") for c in nb["cells"]]
    assert None not in ids, f"{path.name}: cells {[i for i, x in enumerate(ids) if x is None]} have no id"
    assert len(set(ids)) == len(ids), f"{path.name}: repeated cell ids"
