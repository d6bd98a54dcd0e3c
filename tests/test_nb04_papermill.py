"""Notebook 04 runs end to end with another seed and records sane numbers."""

import math

import pytest


@pytest.mark.notebook
def test_nb04_runs_with_seed_1(run_notebook, notebook_build):
    r = run_notebook("04_qat_training", seed=1)
    for key in ("fp32_finetuned_acc", "ptq_int8_acc", "ptq_int8_histogram_acc", "qat_int8_acc",
                "pt2e_qat_int8_acc"):
        assert 95.0 < r[key] <= 100.0, (key, r[key])
    for key in ("ptq_w4_acc", "qat_w4_acc", "lsq_w4_acc", "freeze_none_w4_acc",
                "freeze_observers_w4_acc", "freeze_bn_w4_acc", "freeze_both_w4_acc"):
        assert 80.0 < r[key] <= 100.0, (key, r[key])
    assert r["freeze_both_w4_acc"] == r["qat_w4_acc"]  # the same run, reused
    for key in ("qat_w3_acc", "lsq_w3_acc", "ptq_w3_acc"):
        assert 50.0 < r[key] <= 100.0, (key, r[key])
    # QAT int8 and PT2E QAT int8 train the same model with the same recipe: close, not equal
    assert abs(r["qat_int8_acc"] - r["pt2e_qat_int8_acc"]) < 2.0
    # quantization-aware training must not lose badly to doing nothing at 4 bits
    assert r["qat_w4_acc"] > r["ptq_w4_acc"] - 1.0
    assert 0.5 < r["qat_epoch_over_fp32_epoch"] < 20 and math.isfinite(r["qat_epoch_over_fp32_epoch"])
    assert r["seeds"] == 1
    for goal in ("goal_qat_int8_met", "goal_speed_met"):
        assert r[goal] in (0, 1)
    artifact = notebook_build / "artifacts" / "pt2e_qat_int8.pt2"
    assert artifact.exists() and artifact.stat().st_size > 10_000
    assert (notebook_build / "artifacts" / "eager_qat_fakequant_state.pt").exists()
