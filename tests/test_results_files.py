import json

import pytest
import torch

import qatlab
from qatlab import files, results
from qatlab.runner import format_table, merge_results


@pytest.fixture
def build(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path))
    return tmp_path


def test_record_writes_per_notebook_json(build, capsys):
    qatlab.begin_notebook("99_demo")
    qatlab.record("acc", torch.tensor(97.5))
    qatlab.record("flag", True)
    assert json.loads((build / "results" / "99_demo.json").read_text()) == {
        "acc": 97.5, "flag": 1, "torch_threads": torch.get_num_threads()}
    torch.set_num_threads(1)
    try:
        qatlab.record("later", 2.0)  # the threads in force at the last record
        assert json.loads((build / "results" / "99_demo.json").read_text())["torch_threads"] == 1
    finally:
        torch.set_num_threads(2)
    assert capsys.readouterr().out == ""  # quiet: the notebook states its numbers in sentences
    assert qatlab.record("shown", 97.5, show=True) == 97.5
    assert capsys.readouterr().out == "recorded 99_demo.shown = 97.5\n"
    assert json.loads((build / "results" / "99_demo.json").read_text())["shown"] == 97.5
    qatlab.begin_notebook("99_demo")  # a new run starts clean
    assert not (build / "results" / "99_demo.json").exists()


def test_record_rejects_bad_values(build):
    qatlab.begin_notebook("99_demo")
    with pytest.raises(ValueError, match="nan"):
        qatlab.record("acc", float("nan"))
    with pytest.raises(ValueError, match="'high'"):
        qatlab.record("acc", "high")
    with pytest.raises(ValueError, match="'my metric'"):
        qatlab.record("my metric", 1.0)
    with pytest.raises(ValueError, match="'a/b'"):
        qatlab.begin_notebook("a/b")


def test_record_before_begin_says_what_to_do(monkeypatch):
    monkeypatch.setitem(results._state, "notebook", None)
    with pytest.raises(RuntimeError, match="begin_notebook"):
        qatlab.record("x", 1.0)


def test_cmp_returns_exactness_and_logs(capsys):
    results.comparisons.clear()
    a = torch.tensor([1.0, 2.0])
    assert qatlab.cmp("same", a, a.clone()) is True
    assert qatlab.cmp("off", a, a + 1e-7) is False
    assert results.comparisons[-1][1:3] == (False, True)
    with pytest.raises(ValueError, match=r"\(2,\) vs ref \(3,\)"):
        qatlab.cmp("shape", a, torch.zeros(3))


def test_atomic_path_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_merge_results_and_table(build):
    (build / "results").mkdir()
    (build / "results" / "00_a.json").write_text(json.dumps({"acc": 97.0}))
    merged = merge_results(build, ["00_a", "01_b"], {"00_a": 12.34})
    assert merged == {"00_a": {"acc": 97.0, "seconds": 12.3}, "01_b": {}}
    assert json.loads((build / "results.json").read_text()) == merged
    table = format_table(merged)
    assert "00_a" in table and "97" in table and "seconds" in table


def test_shown_path_hides_this_machines_folders(tmp_path, monkeypatch):
    import os

    from qatlab.files import shown_path

    (tmp_path / "notebooks").mkdir()
    target = tmp_path / "build" / "train_qat" / "checkpoint.pt"
    monkeypatch.chdir(tmp_path)
    assert shown_path(target) == os.path.join("build", "train_qat", "checkpoint.pt")
    monkeypatch.chdir(tmp_path / "notebooks")     # where a notebook's kernel runs
    assert shown_path(target) == os.path.join("..", "build", "train_qat", "checkpoint.pt")
    assert shown_path(str(target)) == os.path.join("..", "build", "train_qat", "checkpoint.pt")
    elsewhere = tmp_path.anchor   # far above the current folder: shown as given
    assert shown_path(elsewhere) == elsewhere
