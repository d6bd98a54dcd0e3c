import pytest


@pytest.mark.notebook
def test_start_here_with_another_seed(run_notebook):
    r = run_notebook("00_start_here", seed=1)
    assert r["fp32_acc"] >= 96.5  # measured 98.4 for seed 1 (97.9 for seed 0)
    assert r["train_seconds"] > 0
